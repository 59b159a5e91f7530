"""Pre-training objectives (handbook Sec. 2.2.2, 2.3.1, 2.4.1, 2.5.1 and their summary Sec. 3.1).

Losses are plain functions of tensors and predictors (DESIGN.md block 3): they draw ``t`` and the
noise from a ``torch.Generator``, call ``predictor.predict`` and the process's ``q_sample``, and return
a scalar (``reduction="mean"``/``"sum"``) or one value per sample (``reduction="none"``, used by the
checks to get standard errors). There is no training loop here (see ``dstar_edu.training``).

Conventions, written once:

* ``||.||^2`` is the squared l2 norm summed over all non-batch dimensions (the handbook's
  ``||.||_2^2``); ``normalize_dims=True`` divides it by the number of entries per sample (the
  per-coordinate mean squared error of most code bases).
* Times are those of the predictor's process (``t = 0`` is data). Explicit ``t`` (scalar or
  ``(batch,)``) and explicit noise ``eps`` give common random numbers across losses.
* Every loss raises ``FloatingPointError`` when its value is NaN or infinite, naming the loss.

Score matching (Sec. 2.2.2): ``explicit_score_matching_loss`` (J_ESM), ``implicit_score_matching_loss``
(J_ISM, exact autograd divergence or Hutchinson's estimator) and denoising score matching, which is
``denoising_loss(target="score")``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..conversions import check_prediction, from_x0_eps, to_x0_eps
from ..process import Process, RectifiedFlow, TrigFlow, expand_like
from ..samplers.diffusion import ddim_update
from ..times import T_SAMPLERS, make_t_sampler, sample_t, t_from_edm_sigma  # noqa: F401  (re-exported)
from ..validation import check_choice, check_int, check_probability, check_real
from .common import batch_times, check_process, draw_times, reduce_loss
from .distances import get_pair_distance, squared_norm

Tensor = torch.Tensor

__all__ = [
    "T_SAMPLERS", "WEIGHTINGS", "sample_t", "make_t_sampler", "t_from_edm_sigma", "loss_weight",
    "denoising_loss", "flow_matching_loss", "trigflow_diffusion_loss",
    "explicit_score_matching_loss", "implicit_score_matching_loss", "divergence",
    "consistency_function", "consistency_training_loss", "consistency_distillation_loss", "ddim_denoise",
    "trigflow_ct_gradient_surrogate",
]

#: names accepted by ``weighting``
WEIGHTINGS = ("none", "snr", "min_snr", "edm")


# ---- small helpers -------------------------------------------------------------------------------------
def _check_x0(x0, name: str = "x0") -> Tensor:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape (batch, *shape), got "
                         f"{type(x0).__name__}{'' if not isinstance(x0, torch.Tensor) else ' ' + str(x0.dtype)}")
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch, *shape) with batch >= 1, got shape {tuple(x0.shape)}")
    return x0


def _sq_err(a: Tensor, b: Tensor, normalize_dims: bool) -> Tensor:
    e = squared_norm(a - b)
    if normalize_dims:
        e = e / (a[0].numel() if a.ndim > 1 else 1)
    return e


# ---- loss weights --------------------------------------------------------------------------------------------
def _x0_gain(target: str, t: Tensor, process: Process, dtype) -> Tensor:
    """Per-sample ``c(t)`` with ``x0_hat = c(t) * target + (terms in x_t)``: all conversions are affine."""
    z = torch.zeros(t.shape[0], 1, dtype=dtype, device=t.device)
    x0_one = to_x0_eps(target, torch.ones_like(z), z, t, process)[0]
    x0_zero = to_x0_eps(target, z, z, t, process)[0]
    return (x0_one - x0_zero)[:, 0]


def loss_weight(weighting, target: str, t: Tensor, process: Process, *, min_snr_gamma: float = 5.0,
                sigma_data: float = 0.5, dtype=torch.float64) -> Tensor:
    """Per-sample multiplier ``w(t)`` of ``||prediction - target||^2`` (shape ``(batch,)``).

    * ``none``: 1 (the handbook's unweighted losses, Sec. 3.1.1).
    * ``snr``: ``SNR(t) = alpha^2 / sigma^2`` as a raw multiplier (on the eps loss it gives the x0 loss).
    * ``min_snr``: Min-SNR-gamma (Hang et al. 2023): the x0-space weight ``min(SNR, gamma)`` carried to
      the target's space, ``min(SNR, gamma) * |d x0 / d target|^2``; e.g. ``min(SNR, gamma)/SNR`` for eps,
      ``min(SNR, gamma)/(SNR + 1)`` for ``v``.
    * ``edm``: EDM's ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` on the x0 error
      (Karras et al. 2022), ``sigma = sigma(t)/alpha(t)``, carried to the target's space likewise.
    * a callable ``w(t) -> (batch,)`` tensor: used as is.
    """
    t = t.to(dtype)
    if callable(weighting):
        w = torch.as_tensor(weighting(t), dtype=dtype, device=t.device)
        return w.expand(t.shape[0]) if w.ndim == 0 else w
    check_choice("weighting", weighting, WEIGHTINGS, also="a callable w(t)")
    if weighting == "none":
        return torch.ones_like(t)
    c = process.at(t, dtype=t.dtype)
    a, s = c.alpha, c.sigma
    snr = a * a / (s * s)
    if weighting == "snr":
        return snr
    gain2 = _x0_gain(target, t, process, dtype) ** 2
    if weighting == "min_snr":
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma={min_snr_gamma} must be positive")
        return torch.clamp(snr, max=min_snr_gamma) * gain2
    if not sigma_data > 0:
        raise ValueError(f"sigma_data={sigma_data} must be positive")
    sig = s / a
    return (sig * sig + sigma_data ** 2) / (sig * sigma_data) ** 2 * gain2


# ---- diffusion / flow losses (Sec. 3.1) -------------------------------------------------------------------------
def denoising_loss(predictor, x0: Tensor, *, generator: torch.Generator | None = None, t=None, t_sampler=None,
                   eps: Tensor | None = None, target: str | None = None, weighting="none", cond=None,
                   p_uncond: float = 0.0, uncond=None, reduction: str = "mean", normalize_dims: bool = False,
                   min_snr_gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """``E_{x0, t, eps}[ w(t) ||pred(x_t, t) - target(x0, eps, t)||^2 ]`` for any prediction target.

    Handbook Sec. 3.1.1 (L_DM for ``target="eps"``, L_DM-v for ``"v"``), Sec. 2.2.2 (the score-matching
    objective L_SM, i.e. denoising score matching, for ``"score"``: target ``-eps/sigma = grad log
    q(x_t | x0)``), Sec. 3.1.3 (rectified flow for ``"velocity"`` under ``RectifiedFlow``) and Sec. 3.1.4
    (TrigFlow diffusion loss for ``"velocity"`` under ``TrigFlow``). ``x_t = alpha x0 + sigma eps``
    (Eq. 6) comes from ``predictor.process.q_sample``; the prediction is
    ``predictor.predict(target, x_t, t, cond)``, so any network parameterisation trains any target.

    Args:
        predictor: a ``dstar_edu`` predictor (network or exact model).
        x0: clean data ``(batch, *shape)``.
        t: explicit times (scalar or ``(batch,)``); otherwise drawn with ``t_sampler`` (a name in
            ``T_SAMPLERS`` or a callable ``(n, generator) -> t``; default discrete for DDPM, uniform else).
        eps: explicit standard-normal noise (same shape as x0); otherwise drawn from ``generator``.
        target: one of ``conversions.PREDICTIONS`` (default: ``predictor.prediction``).
        weighting: ``"none"``, ``"snr"``, ``"min_snr"``, ``"edm"`` or a callable, see ``loss_weight``.
        reduction: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` for the per-sample values.
        normalize_dims: divide each squared norm by the number of entries per sample.
        cond, p_uncond, uncond: conditioning passed to the predictor; with ``p_uncond > 0`` each sample's
            ``cond`` is replaced by ``uncond`` with that probability (condition dropout, which trains the
            unconditional branch that classifier-free guidance, Eq. 23, needs). ``cond`` then has one entry
            per sample and ``uncond`` broadcasts against it (e.g. the MLP's null label ``num_classes``).
    """
    process = check_process(predictor, None, "denoising_loss")
    x0 = _check_x0(x0)
    target = check_prediction(predictor.prediction if target is None else target)
    t = draw_times(process, x0, t, t_sampler, generator)
    x_t, eps = process.q_sample(x0, t, eps=eps, generator=generator)
    if p_uncond:
        cond = _drop_condition(cond, uncond, p_uncond, x0.shape[0], generator)
    tgt = from_x0_eps(target, x0, eps, x_t, t, process)
    pred = predictor.predict(target, x_t, t, cond)
    w = loss_weight(weighting, target, t, process, min_snr_gamma=min_snr_gamma, sigma_data=sigma_data,
                    dtype=x0.dtype)
    return reduce_loss(w * _sq_err(pred, tgt, normalize_dims), reduction, f"denoising_loss(target={target!r})")


def _drop_condition(cond, uncond, p_uncond: float, B: int, generator):
    check_probability("p_uncond", p_uncond)
    if cond is None or uncond is None:
        raise ValueError(f"p_uncond={p_uncond} needs both cond (one entry per sample) and uncond (the null "
                         f"condition), got cond={type(cond).__name__}, uncond={uncond!r}")
    cond = torch.as_tensor(cond)
    if cond.ndim == 0 or cond.shape[0] != B:
        raise ValueError(f"cond has shape {tuple(cond.shape)}; condition dropout needs one entry per sample ({B},)")
    drop = torch.rand(B, generator=generator, dtype=torch.float64) < p_uncond
    drop = drop.to(cond.device).reshape(B, *([1] * (cond.ndim - 1)))
    return torch.where(drop, torch.as_tensor(uncond, dtype=cond.dtype, device=cond.device), cond)


def flow_matching_loss(predictor, x0: Tensor, sigma_min: float = 0.0, *, generator: torch.Generator | None = None,
                       t=None, t_sampler=None, eps: Tensor | None = None, cond=None, reduction: str = "mean",
                       normalize_dims: bool = False) -> Tensor:
    """Rectified flow / flow matching, handbook Eq. 28 and Sec. 3.1.3 (with the ``sigma_min`` path).

    The handbook writes ``y_t = t y_1 + (1 - (1 - sigma_min) t) y_0`` with data ``y_1`` at ``t = 1`` and
    target ``y_1 - (1 - sigma_min) y_0`` (Lipman et al. 2022; Movie Gen). In this library's time
    (``RectifiedFlow``: ``t = 0`` is data, ``s = 1 - t_handbook``) the same path and target read::

        x_s = (1 - s) x0 + (sigma_min + (1 - sigma_min) s) eps,    u = dx_s/ds = (1 - sigma_min) eps - x0

    and the loss is ``E ||v_theta(x_s, s) - u||^2``. At ``sigma_min = 0`` this is Eq. 28 and equals
    ``denoising_loss(target="velocity")`` on the same ``(x0, s, eps)``. For ``sigma_min > 0`` the path is
    not the ``RectifiedFlow`` process, so the predictor must output ``velocity`` itself (no conversion).
    """
    process = check_process(predictor, RectifiedFlow, "flow_matching_loss")
    x0 = _check_x0(x0)
    check_real("sigma_min", sigma_min, 0, 1, hi_open=True)
    if sigma_min > 0 and predictor.prediction != "velocity":
        raise ValueError(f"flow_matching_loss with sigma_min={sigma_min} > 0 needs a predictor whose prediction is "
                         f"'velocity' (got {predictor.prediction!r}): conversions assume the sigma_min = 0 path")
    t = draw_times(process, x0, t, t_sampler, generator)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif eps.shape != x0.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)} but x0 has shape {tuple(x0.shape)}")
    s = expand_like(t, x0)                                   # float64 time; only coefficients are cast
    x_s = (1 - s).to(x0.dtype) * x0 + (sigma_min + (1 - sigma_min) * s).to(x0.dtype) * eps
    u = (1 - sigma_min) * eps - x0
    if predictor.prediction == "velocity":
        pred = predictor(x_s, t, cond)
    else:
        pred = predictor.predict("velocity", x_s, t, cond)
    return reduce_loss(_sq_err(pred, u, normalize_dims), reduction, f"flow_matching_loss(sigma_min={sigma_min})")


def trigflow_diffusion_loss(predictor, x0: Tensor, *, generator: torch.Generator | None = None, t=None,
                            t_sampler=None, z: Tensor | None = None, cond=None, reduction: str = "mean",
                            normalize_dims: bool = False) -> Tensor:
    """TrigFlow diffusion loss, handbook Sec. 2.5.1 / 3.1.4: ``E ||sigma_d F_theta(x_t, t) - v_t||^2``.

    ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sigma_d^2 I)`` and ``v_t = cos(t) z - sin(t) x0``,
    ``t in [0, pi/2]``. The predictor receives ``x_t`` (a network that wants the handbook's input
    ``x_t / sigma_d`` divides inside its wrapper) and ``sigma_d F`` is its ``velocity`` prediction.
    ``z`` is the TrigFlow noise (std sigma_d), i.e. ``sigma_d * eps`` in the library's notation.
    """
    process = check_process(predictor, TrigFlow, "trigflow_diffusion_loss")
    x0 = _check_x0(x0)
    sd = process.sigma_data
    t = draw_times(process, x0, t, t_sampler, generator)
    if z is None:
        z = sd * torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif z.shape != x0.shape:
        raise ValueError(f"z has shape {tuple(z.shape)} but x0 has shape {tuple(x0.shape)}")
    co = process.at(t, x0, dtype=torch.float64)              # float64 time; only coefficients are cast
    c, s_ = co.alpha.to(x0.dtype), (co.sigma / sd).to(x0.dtype)
    x_t = c * x0 + s_ * z
    v_t = c * z - s_ * x0
    if predictor.prediction == "trigflow_F":
        pred = sd * predictor(x_t, t, cond)
    else:
        pred = predictor.predict("velocity", x_t, t, cond)
    return reduce_loss(_sq_err(pred, v_t, normalize_dims), reduction, "trigflow_diffusion_loss")


# ---- score matching (Sec. 2.2.2) -------------------------------------------------------------------------
def divergence(fn: Callable[[Tensor], Tensor], x: Tensor, *, method: str = "exact",
               generator: torch.Generator | None = None, n_probes: int = 1, create_graph: bool = True
               ) -> tuple[Tensor, Tensor]:
    """``(fn(x), div fn(x))`` per sample: ``div psi = Tr(grad_x psi)`` (handbook Sec. 2.2.2, J_ISM).

    ``exact``: one backward pass per input dimension (cheap in 2D). ``hutchinson``: the unbiased estimate
    ``E_v[v^T (grad_x psi) v]`` with ``n_probes`` Rademacher vectors ``v`` (any dimension).
    ``create_graph=True`` keeps the result differentiable in the parameters of ``fn`` (for training).
    """
    check_choice("method", method, ("exact", "hutchinson"))
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x)
        if out.shape != x.shape:
            raise ValueError(f"the score function returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}")
        B = x.shape[0]
        if method == "exact":
            flat_out = out.reshape(B, -1)
            D = flat_out.shape[1]
            div = torch.zeros(B, dtype=out.dtype, device=out.device)
            for i in range(D):
                (g,) = torch.autograd.grad(flat_out[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
                div = div + g.reshape(B, -1)[:, i]
            return out, div
        check_int("n_probes", n_probes, lo=1)
        div = torch.zeros(B, dtype=out.dtype, device=out.device)
        for _ in range(n_probes):
            v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
            (g,) = torch.autograd.grad((out * v).sum(), x, create_graph=create_graph, retain_graph=True)
            div = div + (g * v).reshape(B, -1).sum(1)
        return out, div / n_probes


def explicit_score_matching_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, true_score,
                                 reduction: str = "mean") -> Tensor:
    """J_ESM, handbook Sec. 2.2.2: ``E_q[ 1/2 ||psi(x) - grad log q(x)||^2 ]``.

    ``true_score`` is a tensor shaped like ``x`` or a callable ``x -> grad log q(x)`` (e.g. an exact
    mixture's ``score``).
    """
    x = _check_x0(x, "x")
    s = true_score(x) if callable(true_score) else true_score
    if s.shape != x.shape:
        raise ValueError(f"true_score has shape {tuple(s.shape)} but x has shape {tuple(x.shape)}")
    return reduce_loss(0.5 * squared_norm(score_fn(x) - s), reduction, "explicit_score_matching_loss")


def implicit_score_matching_loss(score_fn: Callable[[Tensor], Tensor], x: Tensor, *, divergence_method: str = "exact",
                                 generator: torch.Generator | None = None, n_probes: int = 1,
                                 reduction: str = "mean") -> Tensor:
    """J_ISM, handbook Sec. 2.2.2: ``E_q[ 1/2 ||psi(x)||^2 + div psi(x) ]`` (Hyvarinen 2005).

    Equal to J_ESM up to the constant ``1/2 E_q ||grad log q||^2`` (checked in ``training.esm_ism``).
    ``divergence_method``: ``exact`` (autograd trace) or ``hutchinson`` (unbiased, any dimension).
    """
    x = _check_x0(x, "x")
    out, div = divergence(score_fn, x, method=divergence_method, generator=generator, n_probes=n_probes)
    return reduce_loss(0.5 * squared_norm(out) + div, reduction, "implicit_score_matching_loss")


# ---- consistency models (Sec. 2.3.1, 2.5.1, 3.2.6) --------------------------------------------------------------
def consistency_function(model, x_t: Tensor, t, cond=None, parameterization: str = "cm_f") -> Tensor:
    """``f_theta(x_t, t)``: ``model.predict(parameterization, ...)``.

    ``cm_f`` is Eq. 19 / 24 (``c_skip x_t + c_out x0_hat`` at the EDM noise level, sigma_data 0.5,
    epsilon 0.002); ``x0`` is TrigFlow's Eq. 38 (``cos t x_t - sin t sigma_d F`` is exactly the x0 prediction
    of a ``trigflow_F`` model) and any x0-parameterised consistency model.
    """
    return model.predict(parameterization, x_t, t, cond)


def _check_grid(t_grid, process: Process, dtype, device) -> Tensor:
    g = torch.as_tensor(t_grid, dtype=torch.float64).flatten()
    if g.numel() < 2:
        raise ValueError(f"t_grid needs at least 2 times t_1 < ... < t_N, got {g.tolist()}")
    if not bool((g[1:] > g[:-1]).all()):
        raise ValueError(f"t_grid must be strictly increasing (t_1 = epsilon < ... < t_N = T), got {g.tolist()[:6]}...")
    process.check_t(g)
    return g.to(dtype=dtype, device=device)


def _grid_pair(grid: Tensor, B: int, m: int, n, generator) -> tuple[Tensor, Tensor, Tensor]:
    N = grid.numel()
    if N - 1 - m < 0:
        raise ValueError(f"m={m} steps need a t_grid of at least m + 1 = {m + 1} times, got {N}")
    if n is None:
        n = torch.randint(0, N - m, (B,), generator=generator)
    else:
        n = torch.as_tensor(n, dtype=torch.long).expand(B)
        if int(n.min()) < 0 or int(n.max()) > N - 1 - m:
            raise ValueError(f"n has values in [{int(n.min())}, {int(n.max())}]; allowed 0..{N - 1 - m} "
                             f"(0-based index of t_n in t_grid, with t_(n+m) inside the grid)")
    n = n.to(grid.device)
    return n, grid[n], grid[n + m]


def _weights_pair(weighting, t_lo: Tensor, t_hi: Tensor) -> Tensor:
    if weighting is None:
        return torch.ones_like(t_lo)
    if not callable(weighting):
        raise ValueError(f"weighting={weighting!r} must be None or a callable lambda(t_n, t_n+1) -> (batch,)")
    w = torch.as_tensor(weighting(t_lo, t_hi), dtype=t_lo.dtype, device=t_lo.device)
    return w.expand(t_lo.shape[0]) if w.ndim == 0 else w


def consistency_training_loss(model, ema_model, x0: Tensor, t_grid=None, *, t_pair=None, n=None,
                              generator: torch.Generator | None = None, eps: Tensor | None = None,
                              distance="l2", c: float | None = None, weighting=None, parameterization: str = "cm_f",
                              cond=None, reduction: str = "mean") -> Tensor:
    """Consistency training, handbook Eq. 25: ``E[ lambda(t_n) d(f_theta(x_{t_n+1}, t_n+1), f_theta-(x_{t_n}, t_n)) ]``.

    ``x_{t_n}`` and ``x_{t_n+1}`` share ``x0`` and ``eps`` (Sec. 3.2.6: both are forward-diffused from the
    same noise). The target network ``ema_model`` (theta-, the EMA of theta; ``None`` means theta itself)
    runs without gradient (stop-gradient).

    Times: ``t_grid`` is the increasing schedule ``t_1 = epsilon < ... < t_N`` of process times and
    ``n`` (0-based, ``0..N-2``; drawn uniformly when None) picks the pair ``(t_grid[n], t_grid[n+1])``;
    or ``t_pair=(t_lo, t_hi)`` gives the two times per sample directly (continuous-time CT).
    ``distance``: ``"l2"`` (``||x - y||^2``), ``"pseudo_huber"`` with constant ``c``, or a callable.
    ``weighting``: None (lambda = 1) or ``lambda(t_n, t_n+1) -> (batch,)``.
    """
    process = check_process(model, None, "consistency_training_loss")
    x0 = _check_x0(x0)
    ema_model = model if ema_model is None else ema_model
    d = get_pair_distance(distance, c)
    B = x0.shape[0]
    if (t_grid is None) == (t_pair is None):
        raise ValueError("give exactly one of t_grid (a schedule t_1 < ... < t_N) and t_pair=(t_lo, t_hi)")
    if t_pair is not None:
        if n is not None:
            raise ValueError("n indexes t_grid; it cannot be used with t_pair")
        t_lo, t_hi = (batch_times(process, tt, x0) for tt in t_pair)
        if not bool((t_hi > t_lo).all()):
            raise ValueError("t_pair=(t_lo, t_hi) needs t_hi > t_lo for every sample")
    else:
        grid = _check_grid(t_grid, process, x0.dtype, x0.device)
        _, t_lo, t_hi = _grid_pair(grid, B, 1, n, generator)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x_hi, _ = process.q_sample(x0, t_hi, eps=eps)
    x_lo, _ = process.q_sample(x0, t_lo, eps=eps)
    f_online = consistency_function(model, x_hi, t_hi, cond, parameterization)
    with torch.no_grad():
        f_target = consistency_function(ema_model, x_lo, t_lo, cond, parameterization)
    per = _weights_pair(weighting, t_lo, t_hi) * d(f_online, f_target)
    return reduce_loss(per, reduction, "consistency_training_loss")


def ddim_denoise(teacher, x: Tensor, t_from: Tensor, t_to: Tensor, cond=None, cfg_scale: float | None = None,
                 uncond=None) -> Tensor:
    """One deterministic DDIM step of the teacher, handbook Eq. 21 with ``sigma_{t_n+1} = 0``, for any process.

    ``x_{t_to} = alpha(t_to) x0_hat + sigma(t_to) eps_hat`` where ``(x0_hat, eps_hat)`` is the teacher's
    prediction at ``(x, t_from)`` (for DDPM: ``sqrt(ab_n) x0_hat + sqrt(1 - ab_n) eps_hat``, Eq. 21).
    With ``cfg_scale = w`` the prediction is guided, Eq. 23: ``eps_w = eps(c) + w (eps(c) - eps(uncond))``
    (the same affine combination of x0_hat, since both come from the same x_t). Times may be per sample.
    """
    process = teacher.process
    with torch.no_grad():
        x0_c, eps_c = to_x0_eps(teacher.prediction, teacher(x, t_from, cond), x, t_from, process)
        if cfg_scale is not None and cfg_scale != 0:
            x0_u, eps_u = to_x0_eps(teacher.prediction, teacher(x, t_from, uncond), x, t_from, process)
            x0_c = x0_c + cfg_scale * (x0_c - x0_u)
            eps_c = eps_c + cfg_scale * (eps_c - eps_u)
        a, s = process.coefficients(t_to, x)
        return ddim_update(x0_c, eps_c, a, s * s)


def consistency_distillation_loss(model, ema_model, teacher, x0: Tensor, t_grid, m: int = 1,
                                  cfg_scale: float | None = None, *, n=None, generator: torch.Generator | None = None,
                                  eps: Tensor | None = None, distance="l2", c: float | None = None, weighting=None,
                                  parameterization: str = "cm_f", cond=None, uncond=None, denoise=None,
                                  reduction: str = "mean") -> Tensor:
    """Consistency distillation, handbook Eq. 20-23 (and Eq. 46-47 of Sec. 3.2.6).

    ``L_CD = E[ lambda(t_n) d(f_theta(x_{t_n+m}, t_n+m), f_theta-(x_hat_{t_n}, t_n)) ]`` with
    ``x_{t_n+m} = alpha x0 + sigma eps`` (Eq. 6) and ``x_hat_{t_n} = Denoise^m(x_{t_n+m}, t_n+m, t_n)``
    (Eq. 22): ``m`` successive teacher steps along ``t_grid``. The default ``Denoise`` is the DDIM step
    (Eq. 21, ``ddim_denoise``) with optional classifier-free guidance ``cfg_scale`` (Eq. 23: the teacher
    is called with ``cond`` and with ``uncond``); ``denoise(x, t_from, t_to) -> x`` replaces it (e.g. a
    higher-order ODE step). Teacher and target run without gradient.

    The student and teacher must share the process (aligned timesteps, Sec. 2.3.1 "Reparameterization").
    ``n`` (0-based, ``0..N-1-m``) picks ``t_n = t_grid[n]``; drawn uniformly when None.
    """
    process = check_process(model, None, "consistency_distillation_loss")
    check_process(teacher, None, "consistency_distillation_loss (teacher)")
    x0 = _check_x0(x0)
    if repr(teacher.process) != repr(process):
        raise ValueError(f"teacher.process={teacher.process} differs from model.process={process}; "
                         "consistency distillation needs aligned timesteps (the same process)")
    check_int("m", m, lo=1)  # number of teacher steps (Eq. 22)
    if denoise is not None and cfg_scale is not None:
        raise ValueError("cfg_scale applies to the default DDIM Denoise; a custom denoise must guide itself")
    ema_model = model if ema_model is None else ema_model
    d = get_pair_distance(distance, c)
    grid = _check_grid(t_grid, process, x0.dtype, x0.device)
    n, t_lo, t_hi = _grid_pair(grid, x0.shape[0], m, n, generator)
    x_hi, _ = process.q_sample(x0, t_hi, eps=eps, generator=generator)
    x_hat = x_hi
    with torch.no_grad():
        for j in range(m, 0, -1):
            t_from, t_to = grid[n + j], grid[n + j - 1]
            x_hat = (ddim_denoise(teacher, x_hat, t_from, t_to, cond, cfg_scale, uncond) if denoise is None
                     else denoise(x_hat, t_from, t_to))
        f_target = consistency_function(ema_model, x_hat, t_lo, cond, parameterization)
    f_online = consistency_function(model, x_hi, t_hi, cond, parameterization)
    per = _weights_pair(weighting, t_lo, t_hi) * d(f_online, f_target)
    return reduce_loss(per, reduction, "consistency_distillation_loss")


def trigflow_ct_gradient_surrogate(model, x0: Tensor, *, ema_model=None, teacher=None,
                                   generator: torch.Generator | None = None, t=None, t_sampler=None,
                                   eps: Tensor | None = None, weighting=None, parameterization: str = "x0",
                                   cond=None, reduction: str = "mean") -> Tensor:
    """Continuous-time consistency training, handbook Sec. 2.5.1: a scalar whose gradient is
    ``grad_theta E_{x_t, t}[ lambda(t) f_theta(x_t, t)^T df_theta-(x_t, t)/dt ]``.

    ``df_theta-/dt = (d/dx f_theta-) dx_t/dt + d/dt f_theta-`` is the total derivative along the path,
    computed exactly with ``torch.func.jvp`` (tangent ``(dx_t/dt, 1)``) and detached. ``dx_t/dt`` is the
    conditional velocity ``alpha' x0 + sigma' eps`` (TrigFlow: ``cos t z - sin t x0``; consistency
    *training*) or, with ``teacher``, the teacher's PF-ODE velocity (continuous-time distillation).
    ``f`` is ``model.predict(parameterization)``; for a TrigFlow ``trigflow_F`` model the default ``"x0"``
    is Eq. 38, ``cos t x_t - sin t sigma_d F``. Since ``cos t x_t`` has no parameters, the gradient equals
    that of the handbook's second form ``E[-lambda sin t sigma_d F_theta^T df/dt]``.

    Normalisation: for ``d = ||.||^2`` the discrete CT gradient (Eq. 25 with ``t_n+1 = t_n + dt``) satisfies
    ``grad L_CT / (2 dt) -> grad(this surrogate)`` as ``dt -> 0`` (the 2 from differentiating the square;
    the handbook states the limit up to this constant). Checked in ``training.trigflow_ct_gradient``.
    The value itself has no meaning, only its gradient.
    """
    process = check_process(model, None, "trigflow_ct_gradient_surrogate")
    x0 = _check_x0(x0)
    ema_model = model if ema_model is None else ema_model
    t = draw_times(process, x0, t, t_sampler, generator)
    x_t, eps = process.q_sample(x0, t, eps=eps, generator=generator)
    with torch.no_grad():
        if teacher is None:
            dxdt = from_x0_eps("velocity", x0, eps, x_t, t, process)
        else:
            dxdt = teacher.predict("velocity", x_t, t, cond)

        def f_target(x, tt):
            return consistency_function(ema_model, x, tt, cond, parameterization)
        _, dfdt = torch.func.jvp(f_target, (x_t, t), (dxdt, torch.ones_like(t)))
    f_online = consistency_function(model, x_t, t, cond, parameterization)
    lam = torch.ones_like(t) if weighting is None else torch.as_tensor(weighting(t), dtype=t.dtype).expand(t.shape[0])
    per = lam * (f_online * dfdt.detach()).reshape(x0.shape[0], -1).sum(1)
    return reduce_loss(per, reduction, "trigflow_ct_gradient_surrogate")
