"""Diffusion samplers: DDPM, DDIM, SMLD (annealed Langevin), reverse SDE, PF-ODE and DPM-Solver.

Every sampler follows the contract of ``samplers/common.py``::

    x = sampler(predictor, timesteps, x_init, *, generator=None, cond=None,
                return_trajectory=False, progress=False, **options)

``timesteps`` is strictly decreasing in the predictor's process time (``x_init`` lives at
``timesteps[0]``, sampling stops at ``timesteps[-1]``); works on any ``(batch, *shape)``. The single
steps are exposed (``ddpm_step``, ``ddim_step``, ``langevin_step``, ``reverse_sde_step``,
``pf_ode_step``, ``dpm_solver_step``) for cross-checks and for distillation code.

Notation (handbook Sec. 2.2.1, "Demystify notations"; ``process.py`` holds the map). The process is
``x_t = alpha(t) x0 + sigma(t) eps``; ``alpha_bar = alpha^2 / (alpha^2 + sigma^2)`` is DDPM's
``alpha_bar_t``. The DDPM/DDIM formulas are written for variance-preserving processes; any other
process is the VP process of ``x_t / sqrt(alpha^2 + sigma^2)``, so the steps divide by that scale,
apply the handbook's formula, and multiply by the scale at the new time (identity for DDPM/VP).

On a sub-sequence ``t_n -> t_{n-1}`` (DDIM, handbook Sec. 2.2.3) the *effective* per-step alpha is
``alpha_bar_{t_n} / alpha_bar_{t_{n-1}}``: the forward kernel ``q(x_{t_n} | x_{t_{n-1}})`` has exactly
that coefficient, so Eq. 8-10 and ``sigma_t(eta)`` hold on a sub-sequence with it (and reduce to the
per-step ``alpha_t`` on the full grid). Eq. 10 with the *original* per-step ``alpha_t`` does not
(checked in ``samplers.subsequence_eq10``).

The handbook's algorithm boxes (Alg. 1-3) have typos that this module does not copy; the
``samplers.alg*`` checks run the boxes as printed against the exact posterior and record the errata.
Loops run ``t = T, T-1, ..., 1`` (the boxes write ``for t in [T]``).
"""
from __future__ import annotations

import math

import torch

from ..conversions import convert, to_x0_eps
from ..predictors import Predictor
from ..process import Process
from ..times import ddpm_grid, log_snr, logsnr_grid, time_from_log_snr  # noqa: F401  (re-exported)
from ..validation import check_batch, check_choice, check_int, check_shape
from .common import _check_generator, _check_predictor, _draw_noise, check_timesteps, run_loop

Tensor = torch.Tensor

__all__ = [
    "ddpm_posterior", "ddim_update", "ddim_sigma", "denoise", "velocity", "ddpm_step", "ddim_step", "langevin_step", "reverse_sde_step", "pf_ode_step",
    "dpm_solver_step", "ddpm", "ddim", "smld", "reverse_sde", "pf_ode", "dpm_solver",
    "ddpm_grid", "logsnr_grid", "log_snr", "time_from_log_snr", "smld_step_sizes",
]


# ---- shared helpers --------------------------------------------------------------------------------------
def _noise_arg(noise, x: Tensor, generator) -> Tensor:
    """``noise`` if given (shaped like x), else a standard normal like ``x`` drawn from ``generator``."""
    if noise is None:
        return _draw_noise(None, x, generator)
    check_shape("noise", noise, x.shape, "the shape of x; or None")
    return noise


class _Coefs:
    """``process.at(ts)`` for a whole grid of validated scalar times, computed once (float64).

    As Python floats: ``a, s, da, ds`` (alpha, sigma and their time derivatives), ``ab = a^2/(a^2 + s^2)``
    (DDPM's alpha_bar of the variance-normalised process) and ``r = sqrt(a^2 + s^2)`` its scale (``ab =
    alpha_bar``, ``r = 1`` for DDPM/VP). ``at[i]``: the ``Coefficients`` of time i in the sample's ``dtype``
    (what ``Predictor.denoise`` takes). One vectorised evaluation instead of several per step.
    """

    def __init__(self, process: Process, ts, dtype: torch.dtype = torch.float64):
        c = process.at(torch.as_tensor(ts, dtype=torch.float64).reshape(-1))
        a, s = c.alpha, c.sigma
        self.a, self.s = a.tolist(), s.tolist()
        self.da, self.ds = c.d_alpha.tolist(), c.d_sigma.tolist()
        r2 = a * a + s * s
        self.ab, self.r = (a * a / r2).tolist(), torch.sqrt(r2).tolist()
        self.at = c.to(dtype).split()

    def __getitem__(self, i):
        return self.a[i], self.s[i], self.da[i], self.ds[i]


def _step_time(process: Process, t, name: str = "t") -> Tensor:
    """One time for a whole-batch step, validated against ``process`` (a 0-d float64 tensor)."""
    t = process.check_t(torch.as_tensor(t, dtype=torch.float64))
    if t.ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; the sampler steps take one scalar time for the whole batch")
    return t


def _times_for(process: Process, t, x: Tensor) -> Tensor:
    """t validated in float64 (whatever x's dtype): a scalar, or one time per sample of x."""
    tt = process.check_t(torch.as_tensor(t, dtype=torch.float64))
    if tt.ndim == 1 and (x.ndim == 0 or tt.shape[0] != x.shape[0]):
        raise ValueError(f"t has shape {tuple(tt.shape)} but x_t has shape {tuple(x.shape)}: t must be a scalar "
                         "or have one entry per batch element (x_t.shape[0])")
    return tt


def _denoise(predictor, x: Tensor, t, cond, coefs=None) -> tuple[Tensor, Tensor]:
    """``predictor.denoise`` (exact models use their closed forms); a duck-typed predictor without it converts
    its raw output (``conversions.to_x0_eps``)."""
    if isinstance(predictor, Predictor):
        return predictor.denoise(x, t, cond, coefs=coefs)
    return to_x0_eps(predictor.prediction, predictor(x, t, cond), x, t, predictor.process, coefs=coefs)


def denoise(predictor: Predictor, x_t: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
    """One predictor evaluation -> ``(x0_hat, eps_hat)`` (handbook Eq. 7 and Sec. 2.6 conversions).

    ``Predictor.denoise`` after the sampler's argument checks: exact models (``toy_data.mixtures``) give
    ``x0_hat`` by Gaussian conditioning and ``eps_hat = (x_t - alpha x0_hat) / sigma`` (defined where
    ``alpha(t) = 0``: rectified flow at t = 1, TrigFlow at pi/2; needs sigma(t) > 0).
    ``t`` is a scalar or one time per sample ``(batch,)``.
    """
    process = _check_predictor(predictor)
    _times_for(process, t, x_t)
    return _denoise(predictor, x_t, t, cond)


def velocity(predictor: Predictor, x_t: Tensor, t, cond=None) -> Tensor:
    """PF-ODE drift (handbook Eq. 4 = Sec. 2.7): ``dx/dt = alpha' x0_hat + sigma' eps_hat``.

    Equals ``f - g^2/2 * score`` with ``f = alpha'/alpha x``, ``g^2 = 2 sigma sigma' - 2 alpha'/alpha sigma^2``.
    """
    process = _check_predictor(predictor)
    x0, eps = denoise(predictor, x_t, t, cond)
    c = process.at(_times_for(process, t, x_t), x_t)
    return c.d_alpha * x0 + c.d_sigma * eps


def _score(predictor: Predictor, x_t: Tensor, t, cond=None) -> Tensor:
    out = predictor(x_t, t, cond)
    if predictor.prediction == "score":
        return out
    return convert(out, predictor.prediction, "score", x_t, t, predictor.process)


# ---- single steps ---------------------------------------------------------------------------------------
_VARIANCES = ("posterior", "beta")
_FORMS = ("eq10", "eq9")


def ddpm_posterior(ab_t, ab_prev, alpha=None):
    """The DDPM posterior ``q(x_{t_prev} | x_t, x0)`` (handbook Eq. 8, Eq. 10) as ``(c_x0, c_xt, var)``::

        mean = c_x0 x0 + c_xt x_t,  c_x0 = sqrt(ab_prev) (1 - alpha) / (1 - ab_t),  c_xt = sqrt(alpha) (1 - ab_prev) / (1 - ab_t),
        var  = (1 - alpha) (1 - ab_prev) / (1 - ab_t),  alpha = ab_t / ab_prev

    (the effective per-step alpha: Eq. 5's ``alpha_t`` on the full grid, and on a sub-sequence the only choice
    for which this is the posterior, handbook Sec. 2.2.3); pass ``alpha`` to use another (Eq. 8 as printed, with
    the per-step ``alpha_t`` given). Python floats or tensors (broadcasting).
    """
    alpha = ab_t / ab_prev if alpha is None else alpha
    sqrt = torch.sqrt if isinstance(alpha, Tensor) else math.sqrt
    return (sqrt(ab_prev) * (1 - alpha) / (1 - ab_t), sqrt(alpha) * (1 - ab_prev) / (1 - ab_t),
            (1 - alpha) * (1 - ab_prev) / (1 - ab_t))


def ddim_update(x0: Tensor, eps: Tensor, alpha_prev, sigma2_prev, sigma=0.0, noise: Tensor | None = None) -> Tensor:
    """The DDIM recombination, handbook Eq. 14: ``alpha_prev x0_hat + sqrt(sigma2_prev - sigma^2) eps_hat + sigma z``.

    ``alpha_prev``, ``sigma2_prev``: the process's ``alpha`` and ``sigma^2`` at the new time (DDPM/VP:
    ``sqrt(ab_prev)`` and ``1 - ab_prev``); ``sigma``: the step's noise scale (``ddim_sigma``; 0: deterministic,
    Eq. 21, the first-order PF-ODE step of any process); ``z = noise`` is added when given. Python floats or
    tensors broadcasting against ``x0``; the square root is clamped at 0 (round-off at ``sigma^2 = sigma2_prev``).
    """
    if isinstance(sigma2_prev, Tensor) or isinstance(sigma, Tensor):
        c_eps = torch.sqrt(torch.clamp(sigma2_prev - sigma * sigma, min=0.0))
    else:
        c_eps = math.sqrt(max(sigma2_prev - sigma * sigma, 0.0))
    out = alpha_prev * x0 + c_eps * eps
    return out if noise is None else out + sigma * noise


def _ddpm_update(x, x0, eps, ab_t, ab_p, r_t, r_p, s_p, variance, form, noise, generator):
    """Eq. 10 (or Eq. 9) + sigma z in the variance-normalised coordinates, with alpha = ab_t / ab_p."""
    alpha = ab_t / ab_p                                                     # effective per-step alpha
    xv = x / r_t if r_t != 1.0 else x
    c_x0, c_xt, var = ddpm_posterior(ab_t, ab_p)
    if form == "eq10":
        mu = c_x0 * x0 + c_xt * xv
    else:
        if alpha == 0:
            raise ValueError("form='eq9' divides by sqrt(alpha_t) and alpha_bar(t) = 0 here (alpha(t) = 0); "
                             "allowed: form='eq10' (Eq. 10 needs no division by alpha_t)")
        mu = (xv - (1 - alpha) / math.sqrt(1 - ab_t) * eps) / math.sqrt(alpha)
    var = var if variance == "posterior" else (1 - alpha)
    if s_p > 0:
        mu = mu + math.sqrt(max(var, 0.0)) * _noise_arg(noise, x, generator)
    return r_p * mu if r_p != 1.0 else mu


def ddpm_step(predictor: Predictor, x: Tensor, t, t_prev=None, *, variance: str = "posterior",
              form: str = "eq10", noise: Tensor | None = None, generator: torch.Generator | None = None,
              cond=None) -> Tensor:
    """One ancestral DDPM step ``x_t -> x_{t_prev}`` (handbook Alg. 1 corrected, Eq. 7, 8, 10).

    ``form="eq10"`` (Alg. 1): ``x0_hat`` by Eq. 7, then the posterior mean of Eq. 8 / 10::

        mu = sqrt(ab_prev) (1 - alpha) / (1 - ab_t) x0_hat + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t

    ``form="eq9"`` (Alg. 2, simplified): ``mu = (x_t - (1 - alpha) / sqrt(1 - ab_t) eps_hat) / sqrt(alpha)``.
    ``variance="posterior"``: ``sigma^2 = (1 - alpha)(1 - ab_prev)/(1 - ab_t)`` (Eq. 8, diffusers
    "fixed_small"); ``"beta"``: ``sigma^2 = 1 - alpha`` (Ho et al.'s alternative, "fixed_large").
    Here ``alpha = ab_t / ab_prev``: on the full grid (``t_prev = t - 1``, the default) this is the
    per-step ``alpha_t`` of Eq. 5; on a sub-sequence it is the only choice for which Eq. 10 is the
    posterior (handbook Sec. 2.2.3; diffusers' DDPMScheduler with ``set_timesteps`` does the same).
    No noise is added on a step that lands on ``sigma(t_prev) = 0`` (Ho et al. Alg. 2: z = 0 at t = 1).
    """
    process = _check_predictor(predictor)
    x = check_batch(x, "x")
    _check_ddpm_options(variance, form)
    tt = _step_time(process, t)
    tp = _step_time(process, tt - 1 if t_prev is None else t_prev, "t_prev")
    if not tp < tt:
        raise ValueError(f"t_prev={float(tp):g} must be smaller than t={float(tt):g}")
    c = _Coefs(process, torch.stack([tt, tp]), x.dtype)
    x0, eps = _denoise(predictor, x, t, cond, c.at[0])
    return _ddpm_update(x, x0, eps, c.ab[0], c.ab[1], c.r[0], c.r[1], c.s[1], variance, form, noise, generator)


def _check_ddpm_options(variance, form):
    check_choice("variance", variance, _VARIANCES)
    check_choice("form", form, _FORMS)


def ddim_sigma(ab_t, ab_prev, eta: float):
    """DDIM noise scale (handbook Sec. 2.2.1 (ii)) on a sub-sequence, with ``alpha = ab_t / ab_prev``:
    ``sigma_{t_n}(eta) = eta sqrt((1 - alpha)(1 - ab_{t_{n-1}}) / (1 - ab_{t_n}))`` (tensors or floats)."""
    var = ddpm_posterior(ab_t, ab_prev)[2]
    return eta * (torch.sqrt(var) if isinstance(var, Tensor) else math.sqrt(max(var, 0.0)))


def _ddim_update(x, x0, eps, ab_t, ab_p, r_p, eta, noise, generator):
    sig = ddim_sigma(ab_t, ab_p, eta)
    z = _noise_arg(noise, x, generator) if eta > 0 else None      # drawn whenever eta > 0, as diffusers does
    out = ddim_update(x0, eps, math.sqrt(ab_p), 1 - ab_p, sig, z)
    return r_p * out if r_p != 1.0 else out


def ddim_step(predictor: Predictor, x: Tensor, t, t_prev, eta: float = 0.0, noise: Tensor | None = None,
              cond=None, generator: torch.Generator | None = None) -> Tensor:
    """One DDIM step ``x_{t_n} -> x_{t_{n-1}}`` on any sub-sequence (handbook Eq. 14, Alg. 3 corrected)::

        x_{t_{n-1}} = sqrt(ab_{t_{n-1}}) x0_hat + sqrt(1 - ab_{t_{n-1}} - sigma^2) eps_hat + sigma z,
        x0_hat = (x_{t_n} - sqrt(1 - ab_{t_n}) eps_hat) / sqrt(ab_{t_n})         (Eq. 7)

    with ``sigma = ddim_sigma(ab_{t_n}, ab_{t_{n-1}}, eta)``. ``eta = 0`` is deterministic (a
    first-order step of the PF-ODE, Eq. 4); ``eta = 1`` is the DDPM posterior step (Eq. 10 with the
    effective alpha). ``noise`` defaults to a fresh normal drawn whenever ``eta > 0`` (as diffusers'
    DDIMScheduler does, so seeded runs agree).
    """
    process = _check_predictor(predictor)
    x = check_batch(x, "x")
    eta = _check_eta(eta)
    tt, tp = _step_time(process, t), _step_time(process, t_prev, "t_prev")
    if not tp < tt:
        raise ValueError(f"t_prev={float(tp):g} must be smaller than t={float(tt):g}")
    c = _Coefs(process, torch.stack([tt, tp]), x.dtype)
    x0, eps = _denoise(predictor, x, t, cond, c.at[0])
    return _ddim_update(x, x0, eps, c.ab[0], c.ab[1], c.r[1], eta, noise, generator)


def _check_eta(eta) -> float:
    try:
        e = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta={eta!r} must be a number in [0, 1]") from None
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"eta={eta!r} must be in [0, 1] (0: deterministic DDIM, 1: DDPM posterior)")
    return e


def langevin_step(predictor: Predictor, x: Tensor, t, step_size: float, noise: Tensor | None = None,
                  cond=None, generator: torch.Generator | None = None) -> Tensor:
    """One Langevin step targeting p_t (handbook Sec. 2.2.3 (3), SMLD):
    ``x <- x + delta/2 * s_theta(x, t) + sqrt(delta) z``."""
    _check_predictor(predictor)
    x = check_batch(x, "x")
    if not step_size > 0:
        raise ValueError(f"step_size={step_size!r} must be positive")
    return x + 0.5 * step_size * _score(predictor, x, t, cond) + math.sqrt(step_size) * _noise_arg(noise, x, generator)


def _g2(t, a, s, da, ds) -> float:
    """``g^2 = 2 sigma (sigma' - alpha'/alpha sigma)`` of the process's forward SDE (Eq. 1), at t."""
    if a == 0:
        raise ValueError(f"t={float(t):g}: alpha(t) = 0, so the SDE coefficients f = alpha'/alpha x and "
                         "g^2 = 2 sigma sigma' - 2 alpha'/alpha sigma^2 are infinite there (rectified flow at t=1, "
                         "TrigFlow at pi/2); allowed: start the reverse SDE at a time with alpha(t) > 0")
    return 2 * s * (ds - da / a * s)


def _sde_update(predictor, x, t, dt, c: _Coefs, i: int, cond, noise, generator):
    a, s, da, ds = c[i]
    g2 = _g2(t, a, s, da, ds)
    x0, eps = _denoise(predictor, x, t, cond, c.at[i])
    drift = da * x0 + (2 * ds - da * s / a) * eps
    return x + drift * dt + math.sqrt(max(g2, 0.0) * (-dt)) * _noise_arg(noise, x, generator)


def reverse_sde_step(predictor: Predictor, x: Tensor, t, t_next, noise: Tensor | None = None, cond=None,
                     generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama step of the reverse SDE (handbook Eq. 3) from t to t_next < t::

        x <- x + [f(x, t) - g(t)^2 score] dt + g(t) sqrt(|dt|) z,   dt = t_next - t < 0,

    with ``f = alpha'/alpha x`` and ``g^2 = 2 sigma sigma' - 2 alpha'/alpha sigma^2`` derived from the
    process (for VP: f = -beta/2 x, g^2 = beta; for VE: f = 0, g^2 = 2 t). In (x0_hat, eps_hat):
    ``f - g^2 score = alpha' x0_hat + (2 sigma' - alpha' sigma / alpha) eps_hat``.
    """
    process = _check_predictor(predictor)
    x = check_batch(x, "x")
    tt, tn = _step_time(process, t), _step_time(process, t_next, "t_next")
    if not tn < tt:
        raise ValueError(f"t_next={float(tn):g} must be smaller than t={float(tt):g}")
    return _sde_update(predictor, x, t, float(tn - tt), _Coefs(process, tt, x.dtype), 0, cond, noise, generator)


_ODE_METHODS = ("euler", "heun")


def _ode_update(predictor, x, t, t_next, c: _Coefs, i: int, method, cond):
    a, s, da, ds = c[i]
    x0, eps = _denoise(predictor, x, t, cond, c.at[i])
    dt = float(t_next) - float(t)
    v = da * x0 + ds * eps
    x_e = x + v * dt
    a1, s1, da1, ds1 = c[i + 1]
    if method == "euler" or s1 == 0.0:
        return x_e
    x0e, epse = _denoise(predictor, x_e, t_next, cond, c.at[i + 1])
    return x + 0.5 * (v + da1 * x0e + ds1 * epse) * dt


def pf_ode_step(predictor: Predictor, x: Tensor, t, t_next, method: str = "euler", cond=None) -> Tensor:
    """One step of the probability-flow ODE (handbook Eq. 4) ``dx/dt = alpha' x0_hat + sigma' eps_hat``.

    ``euler``: ``x + v(x, t) dt``; ``heun`` (Karras et al. 2022, Alg. 1): Euler predictor then the
    trapezoidal corrector ``x + (v(x, t) + v(x_e, t_next)) dt / 2``; a step that lands on
    ``sigma(t_next) = 0`` stays Euler (the velocity is not defined from an exact noise prediction there).
    """
    process = _check_predictor(predictor)
    x = check_batch(x, "x")
    check_choice("method", method, _ODE_METHODS)
    tt, tn = _step_time(process, t), _step_time(process, t_next, "t_next")
    c = _Coefs(process, torch.stack([tt, tn]), x.dtype)
    return _ode_update(predictor, x, t, t_next, c, 0, method, cond)


# ---- DPM-Solver (Lu et al. 2022; Wang talk "DPM-Solver") -----------------------------------------------


def _eps(predictor, x, t, cond):
    return denoise(predictor, x, t, cond)[1]


def dpm_solver_step(predictor: Predictor, x: Tensor, t, t_next, order: int = 2, cond=None) -> Tensor:
    """One single-step DPM-Solver step of order 1, 2 or 3 from t to t_next < t (Lu et al. 2022, Alg. 1-2).

    The exact solution of the PF-ODE in log-SNR ``lambda = log(alpha/sigma)`` (Wang talk, "Exact
    solution form of PF-ODE") is ``x_t = alpha_t/alpha_s x_s - alpha_t int_{lambda_s}^{lambda_t}
    e^{-lambda} eps_theta d lambda``; Taylor-expanding eps_theta in lambda to order k - 1 gives,
    with ``h = lambda_t - lambda_s``:

    * order 1: ``x_t = alpha_t/alpha_s x_s - sigma_t (e^h - 1) eps_s`` (= DDIM, eta = 0);
    * order 2 (r1 = 1/2): a midpoint evaluation at ``lambda_s + h/2``;
    * order 3 (r1 = 1/3, r2 = 2/3): two intermediate evaluations.

    A step that lands on ``sigma(t_next) = 0`` (lambda = +inf) is the limit h -> inf of order 1,
    ``x = alpha(t_next) x0_hat`` (DDIM's last step to t = 0).
    """
    process = _check_predictor(predictor)
    x = check_batch(x, "x")
    check_choice("order", order, (1, 2, 3))
    t, t_next = process.check_t(t), process.check_t(t_next)
    if not t_next < t:
        raise ValueError(f"t_next={float(t_next):g} must be smaller than t={float(t):g}")
    a_s = process.alpha(t)
    if float(a_s) == 0.0:
        raise ValueError(f"t={float(t):g}: alpha(t) = 0, lambda = -inf; allowed: start DPM-Solver where alpha(t) > 0")
    a_t, s_t = process.alpha(t_next), process.sigma(t_next)
    if float(s_t) == 0.0:
        x0, _ = denoise(predictor, x, t, cond)
        return a_t * x0
    lam_s, lam_t = log_snr(process, t), log_snr(process, t_next)
    h = lam_t - lam_s
    eps_s = _eps(predictor, x, t, cond)
    if order == 1:
        return (a_t / a_s) * x - s_t * torch.expm1(h) * eps_s          # Lu et al. Eq. 3.7
    if order == 2:
        r1 = 0.5
        s1 = time_from_log_snr(process, lam_s + r1 * h, t_next, t)
        u1 = (process.alpha(s1) / a_s) * x - process.sigma(s1) * torch.expm1(r1 * h) * eps_s
        d1 = _eps(predictor, u1, s1, cond) - eps_s
        return (a_t / a_s) * x - s_t * torch.expm1(h) * eps_s - s_t / (2 * r1) * torch.expm1(h) * d1
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s1 = time_from_log_snr(process, lam_s + r1 * h, t_next, t)
    s2 = time_from_log_snr(process, lam_s + r2 * h, t_next, t)
    u1 = (process.alpha(s1) / a_s) * x - process.sigma(s1) * torch.expm1(r1 * h) * eps_s
    d1 = _eps(predictor, u1, s1, cond) - eps_s
    sig2 = process.sigma(s2)
    u2 = ((process.alpha(s2) / a_s) * x - sig2 * torch.expm1(r2 * h) * eps_s
          - sig2 * r2 / r1 * (torch.expm1(r2 * h) / (r2 * h) - 1) * d1)
    d2 = _eps(predictor, u2, s2, cond) - eps_s
    return (a_t / a_s) * x - s_t * torch.expm1(h) * eps_s - s_t / r2 * (torch.expm1(h) / h - 1) * d2


# ---- SMLD step sizes (time grids: ``dstar_edu.times``) ----------------------------------------------------
def smld_step_sizes(process: Process, levels: Tensor, step_size: float) -> Tensor:
    """Song & Ermon (2019) Alg. 1 step sizes ``delta_i = step_size * sigma_i^2 / sigma_L^2``.

    ``sigma_i = sigma(t_i)`` is the noise level of the process at each level (VE: ``sigma = t``); the
    last (smallest) level gets ``step_size`` itself, so the signal-to-noise ratio of each update is
    the same at every level.
    """
    sig = process.sigma(levels)
    if bool((sig[-1] <= 0).any()):
        raise ValueError(f"the last SMLD level t={float(levels[-1]):g} has sigma(t) = 0; allowed: levels with sigma > 0")
    return step_size * (sig / sig[-1]) ** 2


# ---- samplers ------------------------------------------------------------------------------------------
def _prepare(predictor, timesteps, x_init, generator):
    process = _check_predictor(predictor)
    check_batch(x_init, "x_init")
    if not bool(torch.isfinite(x_init).all()):
        raise ValueError(f"x_init contains NaN or inf ({int((~torch.isfinite(x_init)).sum())} of {x_init.numel()} "
                         "entries): the initial noise must be finite")
    _check_generator(generator)
    return process, check_timesteps(timesteps, process)


def ddpm(predictor: Predictor, timesteps, x_init: Tensor, *, generator: torch.Generator | None = None, cond=None,
         return_trajectory: bool = False, progress: bool = False, variance: str = "posterior",
         form: str = "eq10"):
    """Ancestral DDPM sampling (handbook Alg. 1, with Alg. 2 as ``form="eq9"``), see ``ddpm_step``.

    Use ``ddpm_grid(process)`` for the original full grid ``T, ..., 1, 0``; a sub-sequence uses the
    effective alpha ``ab_{t_n}/ab_{t_{n-1}}`` (= DDIM with eta = 1).
    """
    process, ts = _prepare(predictor, timesteps, x_init, generator)
    _check_ddpm_options(variance, form)
    c = _Coefs(process, ts, x_init.dtype)

    def step(x, t, tn, i):
        x0, eps = _denoise(predictor, x, t, cond, c.at[i])
        return _ddpm_update(x, x0, eps, c.ab[i], c.ab[i + 1], c.r[i], c.r[i + 1], c.s[i + 1], variance, form,
                            None, generator)
    return run_loop(step, ts, x_init, return_trajectory, progress, desc="ddpm")


def ddim(predictor: Predictor, timesteps, x_init: Tensor, *, generator: torch.Generator | None = None, cond=None,
         return_trajectory: bool = False, progress: bool = False, eta: float = 0.0):
    """DDIM sampling on any sub-sequence (handbook Eq. 14, Alg. 3 corrected), see ``ddim_step``.

    ``timesteps`` from ``samplers.subsequence`` reproduce diffusers' DDIM spacings.
    """
    process, ts = _prepare(predictor, timesteps, x_init, generator)
    eta = _check_eta(eta)
    c = _Coefs(process, ts, x_init.dtype)

    def step(x, t, tn, i):
        x0, eps = _denoise(predictor, x, t, cond, c.at[i])
        return _ddim_update(x, x0, eps, c.ab[i], c.ab[i + 1], c.r[i + 1], eta, None, generator)
    return run_loop(step, ts, x_init, return_trajectory, progress, desc="ddim")


def smld(predictor: Predictor, timesteps, x_init: Tensor, *, generator: torch.Generator | None = None, cond=None,
         return_trajectory: bool = False, progress: bool = False, n_steps_per_level: int = 100,
         step_size: float = 2e-5, denoise_last: bool = False):
    """Annealed Langevin dynamics (SMLD, Song & Ermon 2019; handbook Sec. 2.2.3 (3)).

    ``x_init`` lives at ``timesteps[0]``; for each later level ``t_i`` (``timesteps[1:]``, decreasing
    noise), ``n_steps_per_level`` Langevin steps ``x <- x + delta_i/2 s(x, t_i) + sqrt(delta_i) z``
    target ``p_{t_i}``, with ``delta_i = step_size * sigma(t_i)^2 / sigma(t_L)^2`` (``smld_step_sizes``).
    ``denoise_last`` returns Tweedie's ``E[x0 | x_{t_L}]`` (Eq. 7) at the end (Song & Ermon 2020).
    The trajectory holds the state after each level. The handbook runs its index upwards
    (``x_{t+1}`` from ``x_t``, data at the end); here the level index runs down like every sampler.
    """
    process, ts = _prepare(predictor, timesteps, x_init, generator)
    check_int("n_steps_per_level", n_steps_per_level, lo=1)
    if not step_size > 0:
        raise ValueError(f"step_size={step_size!r} must be positive")
    deltas = smld_step_sizes(process, ts[1:], step_size)

    def level(x, t, tn, i):
        for _ in range(n_steps_per_level):
            x = langevin_step(predictor, x, tn, float(deltas[i]), cond=cond, generator=generator)
        return x

    out = run_loop(level, ts, x_init, return_trajectory, progress, desc="smld")
    if not denoise_last:
        return out
    x = out[0] if return_trajectory else out
    x0 = denoise(predictor, x, ts[-1], cond)[0]
    if return_trajectory:
        return x0, out[1] + [x0]
    return x0


def reverse_sde(predictor: Predictor, timesteps, x_init: Tensor, *, generator: torch.Generator | None = None,
                cond=None, return_trajectory: bool = False, progress: bool = False):
    """Euler-Maruyama integration of the reverse SDE (handbook Eq. 3), see ``reverse_sde_step``.

    Works for every process (DDPM through its continuous interpolant, VP, VE, rectified flow and
    TrigFlow, the last two starting where alpha > 0). Its marginals equal those of ``pf_ode`` (Sec. 2.1).
    """
    process, ts = _prepare(predictor, timesteps, x_init, generator)
    c = _Coefs(process, ts, x_init.dtype)
    return run_loop(lambda x, t, tn, i: _sde_update(predictor, x, t, float(tn - t), c, i, cond, None, generator),
                    ts, x_init, return_trajectory, progress, desc="reverse_sde")


def pf_ode(predictor: Predictor, timesteps, x_init: Tensor, *, generator: torch.Generator | None = None, cond=None,
           return_trajectory: bool = False, progress: bool = False, method: str = "euler"):
    """Probability-flow ODE (handbook Eq. 4), Euler or Heun steps, see ``pf_ode_step``.

    Deterministic: ``generator`` is accepted for the common signature and not used.
    """
    process, ts = _prepare(predictor, timesteps, x_init, generator)
    check_choice("method", method, _ODE_METHODS)
    c = _Coefs(process, ts, x_init.dtype)
    return run_loop(lambda x, t, tn, i: _ode_update(predictor, x, t, tn, c, i, method, cond),
                    ts, x_init, return_trajectory, progress, desc=f"pf_ode[{method}]")


def dpm_solver(predictor: Predictor, timesteps, x_init: Tensor, *, generator: torch.Generator | None = None,
               cond=None, return_trajectory: bool = False, progress: bool = False, order: int = 2):
    """Single-step DPM-Solver of order 1, 2 or 3 (Lu et al. 2022), see ``dpm_solver_step``.

    ``logsnr_grid`` gives the paper's grid (uniform in lambda). Order k costs k predictor calls per
    step; its global error is O(h^k). Order 1 is exactly DDIM with eta = 0. Keep the steps in lambda
    moderate: from a time where alpha is ~0 (TrigFlow at pi/2, cos = 6e-17, lambda = -37) a uniform-in-t
    grid makes the first h ~ 35 and the Taylor expansion of orders 2-3 meaningless (they blow up).
    """
    _, ts = _prepare(predictor, timesteps, x_init, generator)
    check_choice("order", order, (1, 2, 3))
    return run_loop(lambda x, t, tn, i: dpm_solver_step(predictor, x, t, tn, order=order, cond=cond),
                    ts, x_init, return_trajectory, progress, desc=f"dpm_solver[{order}]")
