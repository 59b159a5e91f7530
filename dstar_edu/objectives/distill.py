"""One-step score distillation objectives: SDS, VSD, DMD, Diff-Instruct, SiD, SIM (every Table 4 distance), FGM.

Every generator loss is a function of the generator output ``x0 = g_theta(z)`` (carrying gradient to
theta), two predictors of the same process (the frozen ``teacher`` = pre-trained model ``s_q``, and the
online ``fake`` = ``s_psi`` approximating the generator's diffused score ``s_{p_sg[theta],t}``), the times
``t`` and optional noise ``eps`` (common random numbers). It returns a scalar whose *gradient* with respect
to theta is the method's gradient (the values of surrogate losses mean nothing). No loop here: the one
alternating loop is ``dstar_edu.distillation.distill``.

Where the gradient flows is the point, and it differs by method (checked in ``verify/checks/distill.py``):

================  ==============================================================================  ===============
method            gradient with respect to theta                                                  divergence
================  ==============================================================================  ===============
SDS               ``w (eps_hat_q(x_t) - eps) dx0/dtheta``  (detached teacher)                    KL, Dirac gen.
Diff-Instruct     ``w (s_psi(x_t) - s_q(x_t)) dx_t/dtheta``  (detached score difference)         integral KL
VSD / DMD         ``w (s_psi - s_q) dx0/dtheta`` via ``||x0 - sg(x0 - grad)||^2 / 2``               integral KL
SIM / SiD         ``-d/dtheta E[d'(y_t)^T (s_psi(x_t) - grad log q_t(x_t|x0))]`` with ``x_t``       score div.
                  carrying gradient *into both frozen networks' inputs* and into ``y_t``
FGM               ``d/dtheta E[||u - v_psi||^2 + 2 (u - v_psi)^T (v_psi - u(x_t|x0))]``, ``x_t``   flow matching
                  into both networks' inputs and ``x0`` into the conditional field ``u(x_t|x0)``
================  ==============================================================================  ===============

The networks' *parameters* are frozen inside these losses (``requires_grad`` is switched off while they
run and restored afterwards): only the generator receives gradient. The detached forms (SDS, DI, VSD,
DMD) run their predictors under ``torch.no_grad``.

Time distributions of SIM App. B.2: ``p_edm`` (Eq. B.5-B.6), ``p_sim`` (Eq. B.9-B.10) and ``p_sid``
(Eq. B.8), mapped to any process's time through its EDM noise level, live in ``dstar_edu.times``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..process import Process
from ..times import karras_sigma_grid, p_edm, p_sid, p_sim  # noqa: F401  (re-exported)
from ..validation import check_batch, check_choice, check_finite, check_positive, check_shape
from .distances import get_pair_distance
from .divergences import ScoreDistance, default_pseudo_huber_c, get_distance
from .common import DISTILL_HINT, noisy_batch, reduce_loss, sample_weight

Tensor = torch.Tensor

__all__ = ["sim_generator_loss", "score_divergence", "fake_score_loss", "sds_loss", "vsd_loss", "dmd_loss",
           "dmd_regression_loss", "diff_instruct_loss", "sid_generator_loss", "fgm_generator_loss",
           "FeatureDiscriminator", "dmd_gan_generator_loss", "dmd_gan_discriminator_loss", "p_edm", "p_sim",
           "p_sid", "karras_sigma_grid", "frozen"]

SPACES = ("score", "x0")


# ---- shared helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen(*modules):
    """Switch off ``requires_grad`` of every parameter of ``modules`` inside the block, then restore it.

    Gradients still flow *through* the modules to their inputs (SIM Thm 3.1 needs exactly that); only
    their parameters receive none.
    """
    changed = []
    seen = set()
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for p in m.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                p.requires_grad_(False)
                changed.append(p)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _check_x0(x0, name: str = "x0") -> Tensor:
    return check_batch(x0, name, nonempty=True)


def _process_of(pred, role: str) -> Process:
    process = getattr(pred, "process", None)
    if not isinstance(process, Process):
        raise ValueError(f"{role}={type(pred).__name__} must be a Predictor with a dstar_edu .process, "
                         f"got process={process!r}")
    if not hasattr(pred, "predict"):
        raise ValueError(f"{role}={type(pred).__name__} has no .predict(target, x_t, t, cond)")
    return process


def _pair_process(teacher, fake) -> Process:
    p = _process_of(teacher, "teacher")
    if fake is not None:
        q = _process_of(fake, "fake")
        grid = torch.linspace(max(p.t_min, q.t_min), min(p.t_max, q.t_max), 7, dtype=torch.float64)
        same = type(p) is type(q) and len(grid) and bool(
            torch.allclose(p.at(grid).alpha, q.at(grid).alpha, rtol=1e-12, atol=1e-12)
            and torch.allclose(p.at(grid).sigma, q.at(grid).sigma, rtol=1e-12, atol=1e-12))
        if not same:
            raise ValueError(f"teacher.process={p} and fake.process={q} differ: the fake score must be trained on "
                             "the teacher's forward process (same alpha(t), sigma(t))")
    return p


def _sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _reduce(per_sample: Tensor, reduction: str, what: str) -> Tensor:
    return reduce_loss(per_sample, reduction, what, DISTILL_HINT)


def _check_space(space: str) -> str:
    check_choice("space", space, SPACES)  # score: SIM Eq. 3.7-3.8; x0: denoiser space, SIM Alg. 2 / Eq. B.13
    return space


def _resolve_distance(distance, c, alpha, beta, delta, x0: Tensor) -> ScoreDistance:
    if distance == "pseudo_huber" and c is None:
        c = default_pseudo_huber_c(x0[0].numel())
    return get_distance(distance, c=c, alpha=alpha, beta=beta, delta=delta)


# ---- SIM (SIM Sec. 3, Thm 3.1, Eq. 3.7-3.8, Table 4, Alg. 1-2) -----------------------------------------------
def sim_generator_loss(x0: Tensor, teacher, fake, t, *, eps: Tensor | None = None,
                       generator: torch.Generator | None = None, distance="pseudo_huber", c: float | None = None,
                       weight=None, cond=None, space: str = "score", alpha: int | None = None,
                       beta: float | None = None, delta: float | None = None, reduction: str = "mean") -> Tensor:
    """Score Implicit Matching generator loss, SIM Eq. 3.7 (Eq. 3.8 for pseudo-Huber; Table 4 for the rest).

    ``L_SIM(theta) = E_{z, eps, t}[ w(t) (-d'(y_t))^T (s_psi(x_t, t) - grad_{x_t} log q_t(x_t | x0)) ]`` with
    ``x0 = g_theta(z)``, ``x_t = alpha x0 + sigma eps``, ``y_t = s_psi(x_t) - s_q(x_t)`` and
    ``grad log q_t(x_t | x0) = -eps / sigma``. By SIM Thm 3.1 its gradient equals the gradient (Eq. 3.5) of
    the score divergence ``E_{x_t ~ p_sg[theta],t} d(s_{p_theta,t} - s_q)`` (Eq. 3.4) when ``s_psi`` is the
    generator's score. The gradient must flow through ``x_t`` into *both* score evaluations and into
    ``d'(y_t)`` (the frozen networks' inputs), never into the networks' parameters: stopping it anywhere
    else changes the gradient (check ``distill.sim_gradient_flow``).

    ``space="x0"`` is SIM Alg. 2 (Eq. B.13): the same loss written with x0-predictions (denoisers),
    ``(-d'(D_psi - D_q))^T (D_psi(x_t) - x0)``; it is SIM with the time-dependent distance
    ``d_t(y) = d((sigma^2/alpha) y)`` of score differences, so Thm 3.1 covers it too.

    Args:
        x0: generator samples ``(batch, *shape)`` with gradient to theta.
        teacher, fake: predictors of the same process (any parameterisation; ``predict("score")`` /
            ``predict("x0")`` is used).
        t: ``(batch,)`` times with ``sigma(t) > 0`` (e.g. ``p_sim(process)(B, generator)``).
        eps: the forward noise (drawn from ``generator`` when None).
        distance: a name of ``divergences.DISTANCES`` or a ``ScoreDistance``; ``c`` (pseudo-Huber, default
            ``0.00054 sqrt(D)``), ``alpha`` (alpha_power, exp_power), ``beta`` (exp_power), ``delta`` (huber).
        weight: ``w(t)``: None (1, SIM's choice), a number, a ``(batch,)`` tensor or a callable of ``t``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample values).
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, fake)
    space = _check_space(space)
    d = _resolve_distance(distance, c, alpha, beta, delta, x0)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    w = sample_weight(weight, t, x0.shape[0], x0.dtype)
    with frozen(teacher, fake):
        if space == "score":
            s_q = teacher.predict("score", x_t, t, cond)
            s_psi = fake.predict("score", x_t, t, cond)
            sigma = process.at(t, x0).sigma
            per = -_sum(d.grad(s_psi - s_q) * (s_psi + eps / sigma))
        else:
            D_q = teacher.predict("x0", x_t, t, cond)
            D_psi = fake.predict("x0", x_t, t, cond)
            per = -_sum(d.grad(D_psi - D_q) * (D_psi - x0))
    return _reduce(w * per, reduction, f"sim_generator_loss(distance={d!r}, space={space!r})")


def score_divergence(x_t: Tensor, t, p_score, q_score, *, distance="pseudo_huber", c: float | None = None,
                     space: str = "score", cond=None, alpha: int | None = None, beta: float | None = None,
                     delta: float | None = None) -> Tensor:
    """The integrand of SIM Eq. 3.3: ``d(s_p(x_t) - s_q(x_t))`` per sample, shape ``(batch,)``.

    ``p_score``, ``q_score`` are predictors; ``x_t`` is used as given (the sampling distribution ``pi_t`` of
    Eq. 3.3 is the caller's). With an exact generator's live score predictor this is differentiable in
    theta at fixed ``x_t``: autograd then gives the intractable gradient of SIM Eq. 3.5.
    ``space="x0"`` compares x0-predictions (the distance of Alg. 2).
    """
    _check_x0(x_t, "x_t")
    process = _pair_process(q_score, p_score)
    space = _check_space(space)
    d = _resolve_distance(distance, c, alpha, beta, delta, x_t)
    t = process.check_t(t, x_t)
    target = "score" if space == "score" else "x0"
    return d.value(p_score.predict(target, x_t, t, cond) - q_score.predict(target, x_t, t, cond))


def fake_score_loss(fake, x0: Tensor, *, generator: torch.Generator | None = None, t=None, t_sampler=None,
                    eps: Tensor | None = None, target: str | None = None, weighting="none", cond=None,
                    reduction: str = "mean", **kwargs) -> Tensor:
    """The online ("fake", "assistant") score update: denoising score matching on *detached* generator samples.

    SIM Alg. 1 (first phase), Diff-Instruct Alg. 1, handbook Eq. 42: ``E ||s_psi(x_t, t) - grad log q_t(x_t | x0)||^2``
    with ``x0 = sg(g_theta(z))``, i.e. ``objectives.pretrain.denoising_loss`` on ``x0.detach()`` (any target;
    ``weighting="edm"`` is SIM's lambda_EDM, Eq. B.7). Other keywords go to ``denoising_loss``.
    """
    from .pretrain import denoising_loss
    x0 = _check_x0(x0)
    return denoising_loss(fake, x0.detach(), generator=generator, t=t, t_sampler=t_sampler, eps=eps, target=target,
                          weighting=weighting, cond=cond, reduction=reduction, **kwargs)


# ---- SiD (SIM Sec. 3.3 "SiD is a special case", App. B.2 Eq. B.11) --------------------------------------------
def sid_generator_loss(x0: Tensor, teacher, fake, t, *, eps: Tensor | None = None,
                       generator: torch.Generator | None = None, alpha: float = 1.2, weighting="sid", cond=None,
                       reduction: str = "mean") -> Tensor:
    """Score identity Distillation's generator loss in denoiser space (SIM Sec. 3.3; SiD's public code).

    ``w (D_q - D_psi)^T ((D_q - x0) - alpha (D_q - D_psi))`` with ``D = predict("x0")`` at ``x_t``, gradient
    through ``x_t`` into both frozen denoisers and through ``x0``. ``alpha = 1`` is exactly SIM with the
    squared L2 distance (Table 4 row 1) in score space with weight ``(sigma^2/alpha_t)^2 w / 2``;
    ``alpha = 1.2`` (SiD's default) adds ``(1 - alpha) ||D_q - D_psi||^2``.

    ``weighting="sid"``: ``w = 1 / sg(mean |x0 - D_q(x_t)|)`` (mean over the entries of a sample), which is
    SIM Eq. B.11's ``C t^4 / ||x0 - d_q(x_t)||_1`` carried from score space (EDM: ``s = (D - x_t)/t^2``) to
    denoiser space (normaliser clipped at 1e-5 as in SiD's code). ``"none"``: 1. A number, ``(batch,)`` tensor or
    callable of ``t`` is used as is.

    Recipe matters (issue 13): SiD draws its generator times with ``p_sid(process, from_end="min")`` (sigma in
    [0.002, 24.5]). With SIM's ``p_sim`` (median sigma 0.03) the ``(1 - alpha) ||D_q - D_psi||^2`` term of
    alpha = 1.2 made 2 of 3 seeds of the 2D benchmark diverge; with SiD's times 3 of 3 converge
    (``bench/bench_distillation.py``).
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, fake)
    check_finite("alpha", alpha)  # SiD uses 1.2; 1.0 is SIM with squared L2
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    with frozen(teacher, fake):
        D_q = teacher.predict("x0", x_t, t, cond)
        D_psi = fake.predict("x0", x_t, t, cond)
    diff = D_q - D_psi
    per = _sum(diff * ((D_q - x0) - alpha * diff))
    if isinstance(weighting, str):
        if weighting == "sid":
            # SiD's public code clips the normaliser at 1e-5 (a generator sample on its own denoised point)
            w = 1.0 / (x0 - D_q).detach().abs().reshape(x0.shape[0], -1).mean(1).clamp_min(1e-5)
        elif weighting == "none":
            w = torch.ones_like(per)
        else:
            check_choice("weighting", weighting, ("sid", "none"), also="a number, a (batch,) tensor or a callable w(t)")
    else:
        w = sample_weight(weighting, t, x0.shape[0], x0.dtype, "weighting")
    return _reduce(w * per, reduction, f"sid_generator_loss(alpha={alpha})")


# ---- Diff-Instruct (Luo talk Def. 3.1, Thm 3.3, Alg. 1) --------------------------------------------------------
def diff_instruct_loss(x0: Tensor, teacher, fake, t, *, eps: Tensor | None = None,
                       generator: torch.Generator | None = None, weight=None, cond=None, space: str = "score",
                       reduction: str = "mean") -> Tensor:
    """Diff-Instruct: the integral-KL gradient of Luo talk Thm 3.3 (Eq. 3.2) as a surrogate loss.

    ``Grad(theta) = E[ w(t) (s_psi(x_t) - s_q(x_t))^T dx_t/dtheta ]``: the surrogate is
    ``w sg(s_psi(x_t) - s_q(x_t))^T x_t`` (scores evaluated without gradient; ``x_t`` carries theta through
    ``x0``). With the generator's exact score as ``s_psi`` its expectation is the gradient of
    ``int w(t) KL(p_theta,t || q_t) dt`` (check ``distill.di_ikl_gradient``). ``space="x0"`` uses
    ``sg(D_psi - D_q)`` (Diff-Instruct's EDM code, weight ``sigma^2/alpha`` relative to score space).
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, fake)
    space = _check_space(space)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    w = sample_weight(weight, t, x0.shape[0], x0.dtype)
    target = "score" if space == "score" else "x0"
    with torch.no_grad():
        xd = x_t.detach()
        g = fake.predict(target, xd, t, cond) - teacher.predict(target, xd, t, cond)
    return _reduce(w * _sum(g * x_t), reduction, f"diff_instruct_loss(space={space!r})")


# ---- SDS (handbook Sec. 3.2.2; DreamFusion = Diff-Instruct with a Dirac generator, Luo talk Cor. 3.4) ------------
def sds_loss(x0: Tensor, teacher, t, *, eps: Tensor | None = None, generator: torch.Generator | None = None,
             weight=None, cond=None, reduction: str = "mean") -> Tensor:
    """Score Distillation Sampling: surrogate with gradient ``w(t) (eps_hat_q(x_t, t) - eps)^T dx0/dtheta``.

    Handbook Sec. 3.2.2 gradient, with the sign of DreamFusion: ``grad_{x_t} log p^theta_t(x_t) = -eps/sigma``
    for the (Dirac) generator and ``grad log q_t = -eps_hat_q/sigma`` for the teacher, so
    ``grad_theta L_SDS = E[w (-eps/sigma + eps_hat_q/sigma) dG/dtheta]`` (up to the factor ``1/sigma``
    absorbed in ``w``). The handbook's second line prints the opposite sign (erratum ``distill.sds_sign``).
    ``w = sigma/alpha`` times a Diff-Instruct weight gives Diff-Instruct's gradient with the Dirac generator's
    exact score (Luo talk Cor. 3.4, check ``distill.sds_is_di_dirac``).
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, None)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    w = sample_weight(weight, t, x0.shape[0], x0.dtype)
    with torch.no_grad():
        eps_hat = teacher.predict("eps", x_t.detach(), t, cond)
    return _reduce(w * _sum((eps_hat - eps) * x0), reduction, "sds_loss")


# ---- VSD / DMD (handbook Sec. 3.2.3-3.2.4) ------------------------------------------------------------------------
def vsd_loss(x0: Tensor, teacher, fake, t, *, eps: Tensor | None = None, generator: torch.Generator | None = None,
             weight=None, cond=None, reduction: str = "mean") -> Tensor:
    """Variational Score Distillation, handbook Sec. 3.2.3 gradient in the detach-trick MSE form of Sec. 3.2.4:

    ``(w/2) ||x0 - sg(x0 - (s_psi(x_t) - s_q(x_t)))||^2`` whose gradient is ``w (s_psi - s_q)^T dx0/dtheta``
    (the VSD gradient; ``dx_t/dtheta = alpha dx0/dtheta`` with ``alpha`` absorbed in ``w``). ``s_psi`` is
    the fake score trained with Eq. 42 (``fake_score_loss``).
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, fake)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    w = sample_weight(weight, t, x0.shape[0], x0.dtype)
    with torch.no_grad():
        xd = x_t.detach()
        g = fake.predict("score", xd, t, cond) - teacher.predict("score", xd, t, cond)
    return _reduce(0.5 * w * _sum((x0 - (x0 - g).detach()) ** 2), reduction, "vsd_loss")


def dmd_loss(x0: Tensor, teacher, fake, t, *, eps: Tensor | None = None, generator: torch.Generator | None = None,
             weighting="dmd", cond=None, discriminator=None, gan_weight: float = 0.0,
             reduction: str = "mean") -> Tensor:
    """Distribution Matching Distillation (handbook Sec. 3.2.4): VSD in x0-space with the detach trick.

    ``(w(t)/2) (alpha/sigma^2) ||x0 - sg(x0 - (D_psi(x_t) - D_q(x_t)))||^2`` (the handbook's third line, with
    ``sqrt(ab)/(1 - ab) = alpha/sigma^2`` for VP; Eq. 45 makes it equal to ``vsd_loss`` with the same
    ``w``). ``weighting="dmd"``: the handbook's ``w(t) = 2 (sigma^2/alpha) C / ||x0 - D_q(x_t)||_1`` with
    ``C`` the number of entries, so the loss is ``C/||x0 - D_q||_1 ||x0 - sg(x0 - (D_psi - D_q))||^2``
    (DMD2's normalisation by ``mean |x0 - D_q|``); ``"none"``: ``w = 1``; or a number / tensor / callable.

    ``discriminator`` (e.g. :class:`FeatureDiscriminator` sharing the fake score's backbone) with
    ``gan_weight > 0`` adds the generator's non-saturating GAN term ``gan_weight softplus(-D(x_t, t))``
    (``L_adv`` of handbook Sec. 3.2.4, generator side).
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, fake)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    with torch.no_grad():
        xd = x_t.detach()
        D_q = teacher.predict("x0", xd, t, cond)
        delta = fake.predict("x0", xd, t, cond) - D_q
    c = process.at(t, dtype=x0.dtype)
    a, s = c.alpha, c.sigma
    if isinstance(weighting, str):
        if weighting == "dmd":
            k = x0[0].numel() / (x0 - D_q).detach().abs().reshape(x0.shape[0], -1).sum(1)
        elif weighting == "none":
            k = 0.5 * a / (s * s)
        else:
            check_choice("weighting", weighting, ("dmd", "none"), also="a number, a (batch,) tensor or a callable w(t)")
    else:
        k = 0.5 * sample_weight(weighting, t, x0.shape[0], x0.dtype, "weighting") * a / (s * s)
    per = k * _sum((x0 - (x0 - delta).detach()) ** 2)
    if discriminator is not None and gan_weight:
        check_positive("gan_weight", gan_weight, finite=False)
        with frozen(discriminator, getattr(discriminator, "backbone", None), fake):
            per = per + gan_weight * F.softplus(-discriminator(x_t, t, cond))
    return _reduce(per, reduction, "dmd_loss")


def dmd_regression_loss(x0: Tensor, target: Tensor, *, distance="l2", c: float | None = None,
                        reduction: str = "mean") -> Tensor:
    """DMD's regression loss ``E d(g_theta(z), y)`` on pairs ``(z, y)`` with ``y`` the teacher's ODE sample from
    the same noise (Yin et al. 2024; LPIPS there, any ``objectives.distances`` distance or callable here).
    """
    x0 = _check_x0(x0)
    check_shape("target", target, x0.shape, "it must match x0: one teacher sample per generator sample")
    d = get_pair_distance(distance, c)
    return _reduce(d(x0, target.detach()), reduction, "dmd_regression_loss")


class FeatureDiscriminator(torch.nn.Module):
    """GAN discriminator sharing the fake score network's backbone (DMD2; handbook Sec. 3.2.4 "Adversarial Loss").

    A forward hook captures the output of ``fake``'s submodule ``layer`` (e.g. ``"blocks.2"`` of an
    ``MLPPredictor`` or ``"unet.mid_block"`` of a wrapped diffusers UNet); the head (global average over
    spatial axes, then a small MLP) maps it to one logit per sample. Training the discriminator updates the
    head *and* the shared backbone; include both in the fake optimiser (``distill(..., fake_params=...)``).
    """

    def __init__(self, fake, layer: str, features: int, hidden: int = 64):
        super().__init__()
        modules = dict(fake.named_modules())
        if layer not in modules:
            names = [n for n in modules if n][:12]
            raise ValueError(f"layer={layer!r} is not a submodule of the fake network; some allowed: {names}")
        object.__setattr__(self, "_fake", fake)
        self._captured = None
        modules[layer].register_forward_hook(self._hook)
        self.head = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
        self.layer = layer

    @property
    def backbone(self):
        """The shared fake score network (not a submodule of the discriminator: it belongs to the fake score)."""
        return self._fake

    def _hook(self, module, inputs, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        self._captured = None
        self._fake(x_t, t, cond)
        h = self._captured
        if h is None:
            raise RuntimeError(f"the fake network did not run its submodule {self.layer!r}")
        if h.ndim > 2:
            h = h.flatten(2).mean(-1)
        return self.head(h.to(self.head[0].weight.dtype)).squeeze(-1)


def dmd_gan_generator_loss(x0: Tensor, discriminator, t, process: Process, *, eps: Tensor | None = None,
                           generator: torch.Generator | None = None, cond=None, reduction: str = "mean") -> Tensor:
    """Generator side of ``L_adv``: ``softplus(-D(x_t^f, t))`` = ``-log D`` (non-saturating)."""
    x0 = _check_x0(x0)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, _ = nb.t, nb.x_t, nb.eps
    with frozen(discriminator, getattr(discriminator, "backbone", None)):
        return _reduce(F.softplus(-discriminator(x_t, t, cond)), reduction, "dmd_gan_generator_loss")


def dmd_gan_discriminator_loss(x0_fake: Tensor, x0_real: Tensor, discriminator, t, process: Process, *,
                               generator: torch.Generator | None = None, cond=None, reduction: str = "mean") -> Tensor:
    """Discriminator side of ``L_adv`` (handbook Sec. 3.2.4): ``softplus(-D(F(x'_0))) + softplus(D(x_t^f))``,
    i.e. ``-log D(real) - log(1 - D(fake))`` on noised real and (detached) generator samples."""
    x0_fake, x0_real = _check_x0(x0_fake, "x0_fake"), _check_x0(x0_real, "x0_real")
    if x0_fake.shape != x0_real.shape:
        raise ValueError(f"x0_fake {tuple(x0_fake.shape)} and x0_real {tuple(x0_real.shape)} must have the same shape")
    nb = noisy_batch(x0_fake.detach(), process, t, None, generator)
    t, xf, _ = nb.t, nb.x_t, nb.eps
    nb = noisy_batch(x0_real.detach(), process, t, None, generator)
    _, xr, _ = nb.t, nb.x_t, nb.eps
    per = F.softplus(-discriminator(xr, t, cond)) + F.softplus(discriminator(xf, t, cond))
    return _reduce(per, reduction, "dmd_gan_discriminator_loss")


# ---- Flow Generator Matching (Luo talk Sec. 4, Thm 4.1-4.2, Alg. 1) ----------------------------------------------
def fgm_generator_loss(x0: Tensor, teacher, fake, t, *, eps: Tensor | None = None,
                       generator: torch.Generator | None = None, weight=None, cond=None,
                       reduction: str = "mean") -> Tensor:
    """Flow Generator Matching, Luo talk Eq. 4.10-4.12: ``L_FGM = L_1 + L_2`` with

    ``L_1 = ||u_t(x_t) - v_sg(x_t)||^2`` (Eq. 4.11) and ``L_2 = 2 (u_t(x_t) - v_sg(x_t))^T (v_sg(x_t) - u_t(x_t|x0))``
    (Eq. 4.12), ``u_t`` = teacher velocity, ``v_sg`` = online flow ``v_psi``, ``x_t`` carrying theta into both
    frozen networks' inputs. The conditional field ``u_t(x_t|x0) = alpha'(t) x0 + sigma'(t) eps`` (rectified
    flow: ``eps - x0 = (x_t - x0)/t``; the talk's Eq. 3.5 prints ``(x0 - x_t)/(1 - t)``, erratum
    ``distill.fgm_conditional_field``) keeps ``x0``'s gradient: unlike SIM's ``-eps/sigma`` it depends on theta,
    and detaching it gives a wrong gradient. By Thm 4.2 the gradient equals that of the intractable
    ``E_{x_t ~ p_theta,t} ||v_theta,t - u_t||^2`` (Eq. 4.1-4.3). Works for any process's PF-ODE velocity.
    """
    x0 = _check_x0(x0)
    process = _pair_process(teacher, fake)
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t, eps = nb.t, nb.x_t, nb.eps
    w = sample_weight(weight, t, x0.shape[0], x0.dtype)
    with frozen(teacher, fake):
        u = teacher.predict("velocity", x_t, t, cond)
        v = fake.predict("velocity", x_t, t, cond)
    c = process.at(t, x0)
    u_cond = c.d_alpha * x0 + c.d_sigma * eps
    per = _sum((u - v) ** 2) + 2 * _sum((u - v) * (v - u_cond))
    return _reduce(w * per, reduction, "fgm_generator_loss")
