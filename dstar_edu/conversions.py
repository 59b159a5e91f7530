"""Conversions between prediction parameterisations (handbook Sec. 2.6, 2.7, Fig. 3-4, Eq. 7, 18, 31-33, 39).

Every denoiser predicts one of the quantities in ``PREDICTIONS``; each is an affine function of
``(x0_hat, eps_hat)`` given ``x_t``, so any one converts to any other through that pair. The named
functions below are the handbook's printed formulas (used by the theorem checks); ``convert`` is the
generic router. All functions work on any shape ``(batch, *shape)``; ``t`` is a scalar or ``(batch,)``.

=================  ============================================================================
name               definition (``x_t = alpha x0 + sigma eps``)
=================  ============================================================================
``eps``            noise prediction ``eps_hat``
``x0``             clean-sample prediction ``x0_hat`` (Tweedie, Eq. 7)
``score``          ``grad log p_t(x_t) = -eps_hat / sigma`` (Eq. 18)
``velocity``       PF-ODE / flow-matching drift ``dx_t/dt = alpha' x0_hat + sigma' eps_hat`` (Sec. 2.7);
                   for rectified flow ``eps - x0``, for TrigFlow ``cos(t) z - sin(t) x0`` (Sec. 2.5)
``v``              handbook angular velocity for *reverse* diffusion (Sec. 2.6.2):
                   ``(sigma x0 - alpha eps) / sqrt(alpha^2 + sigma^2)``; VP: ``sqrt(1-ab) x0 - sqrt(ab) eps``
``v_bar``          forward angular velocity ``-v`` (diffusers' ``v_prediction``)
``instaflow_v``    InstaFlow / rectified-flow velocity in the scaled space ``y_t`` (Eq. 30): ``x0 - eps``
``trigflow_F``     TrigFlow network output, ``sigma_d F = velocity`` (Eq. 38); TrigFlow only
``cm_f``           consistency function ``c_skip x_t + c_out x0_hat`` (Eq. 19) at EDM noise ``sigma/alpha``
=================  ============================================================================
"""
from __future__ import annotations

import torch

from .process import Coefficients, Process, TrigFlow, expand_like
from .validation import check_choice

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "score", "velocity", "v", "v_bar", "instaflow_v", "trigflow_F", "cm_f")

__all__ = [
    "PREDICTIONS", "check_prediction", "convert", "to_x0_eps", "from_x0_eps",
    "x0_from_eps", "eps_from_x0", "score_from_eps", "eps_from_score", "x0_from_score",
    "v_from_x0_eps", "x0_from_v", "eps_from_v", "eps_from_x0_via_v",
    "instaflow_y", "instaflow_gamma", "x0_from_instaflow_v", "eps_from_instaflow_v",
    "x0_from_instaflow_eps", "instaflow_v_from_diffusion_v", "instaflow_v_closed_form",
    "velocity_from_score", "cm_c_skip_c_out", "consistency_f", "trigflow_f", "angle_phi",
]


def check_prediction(name: str, argument: str = "prediction") -> str:
    return check_choice(argument, name, PREDICTIONS)


def _nonzero(c: Tensor, what: str, t) -> Tensor:
    if (c == 0).any():
        raise ValueError(f"{what} is zero at t={torch.as_tensor(t).flatten().tolist()[:4]}: "
                         "this conversion is undefined there; use a time strictly inside the domain")
    return c


def _finite(c: Tensor, what: str, t) -> Tensor:
    if not torch.isfinite(c).all():
        raise ValueError(f"{what} is infinite at t={torch.as_tensor(t).flatten().tolist()[:4]}: the velocity "
                         "is undefined there; use a time strictly inside the domain")
    return c


def _coefs(process: Process, t, x: Tensor, coefs: Coefficients | None = None) -> Coefficients:
    """``process.at(t, x)`` (float64 time, coefficients cast to x's dtype; issue 13) unless given."""
    if coefs is None:
        return process.at(t, x, dtype=x.dtype if x.is_floating_point() else torch.float64)
    if not isinstance(coefs, Coefficients):
        raise ValueError(f"coefs={coefs!r} must be a Coefficients value (process.at(t, x_t)) or None")
    return coefs


# ---- eps / x0 / score (Eq. 7, 17, 18) --------------------------------------------------------------
def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie's formula, handbook Eq. 7: ``x0 = (x_t - sigma eps) / alpha``."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Handbook Sec. 2.6.1: ``eps = (x_t - alpha x0) / sigma``."""
    return (x_t - alpha * x0) / sigma


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """Handbook Eq. 18: ``s = -eps / sigma``."""
    return -eps / sigma


def eps_from_score(score: Tensor, sigma: Tensor) -> Tensor:
    return -sigma * score


def x0_from_score(x_t: Tensor, score: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Tweedie in score form: ``E[x0 | x_t] = (x_t + sigma^2 s) / alpha``."""
    return (x_t + sigma * sigma * score) / alpha


# ---- v-prediction (Sec. 2.6.2, Fig. 3) --------------------------------------------------------------
def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Handbook Sec. 2.6.2: ``v = sqrt(1 - ab) x0 - sqrt(ab) eps`` (reverse-diffusion direction)."""
    return torch.sqrt(1 - alpha_bar) * x0 - torch.sqrt(alpha_bar) * eps


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """Fig. 3: ``x0 = sqrt(ab) x_t + sqrt(1 - ab) v``."""
    return torch.sqrt(alpha_bar) * x_t + torch.sqrt(1 - alpha_bar) * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """Fig. 3: ``eps = sqrt(1 - ab) x_t - sqrt(ab) v``."""
    return torch.sqrt(1 - alpha_bar) * x_t - torch.sqrt(alpha_bar) * v


def eps_from_x0_via_v(x_t: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """Sec. 2.6.2 last line: ``eps = x_t / sqrt(1 - ab) - sqrt(ab) x0 / sqrt(1 - ab)``."""
    return x_t / torch.sqrt(1 - alpha_bar) - torch.sqrt(alpha_bar) * x0 / torch.sqrt(1 - alpha_bar)


# ---- InstaFlow / rectified-flow space (Eq. 30-33, 39) -----------------------------------------------
def instaflow_gamma(alpha_bar: Tensor) -> Tensor:
    """Eq. 31: ``gamma_t = sqrt(ab) / (sqrt(ab) + sqrt(1 - ab))``."""
    a, s = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    return a / (a + s)


def instaflow_y(x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """Eq. 31: ``y_t = x_t / (sqrt(ab) + sqrt(1 - ab)) = gamma x0 + (1 - gamma) eps``."""
    return x_t / (torch.sqrt(alpha_bar) + torch.sqrt(1 - alpha_bar))


def x0_from_instaflow_v(y_t: Tensor, v_y: Tensor, alpha_bar: Tensor) -> Tensor:
    """Eq. 32 (second line): ``x0 = y_t + sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab)) v^y``."""
    a, s = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    return y_t + s / (a + s) * v_y


def x0_from_instaflow_eps(y_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Eq. 32 (third line) / Fig. 4: ``x0 = ((sqrt(ab) + sqrt(1 - ab)) y_t - sqrt(1 - ab) eps) / sqrt(ab)``."""
    a, s = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    return ((a + s) * y_t - s * eps) / a


def eps_from_instaflow_v(y_t: Tensor, v_y: Tensor, alpha_bar: Tensor) -> Tensor:
    """Eq. 33: ``eps = y_t - sqrt(ab) / (sqrt(ab) + sqrt(1 - ab)) v^y``."""
    a, s = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    return y_t - a / (a + s) * v_y


def instaflow_v_from_diffusion_v(x_t: Tensor, v_x: Tensor, alpha_bar: Tensor) -> Tensor:
    """Velocity mapping, Eq. 39 (first form): ``dy/dphi = (v^x b - x_t (sqrt(1-ab) - sqrt(ab))) / b^2``.

    Both velocities are derivatives along the angle ``phi`` with ``sin(phi) = sqrt(ab)`` (Sec. 2.6.2);
    ``b = sqrt(ab) + sqrt(1 - ab)``.
    """
    a, s = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    b = a + s
    return (v_x * b - x_t * (s - a)) / (b * b)


def instaflow_v_closed_form(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Velocity mapping, Eq. 39 (second form): ``dy/dphi = (x0 - eps) / (1 + 2 sqrt(ab) sqrt(1 - ab))``."""
    a, s = torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)
    return (x0 - eps) / (1 + 2 * a * s)


# ---- unified velocity-score formula (Sec. 2.7) ------------------------------------------------------
def velocity_from_score(x_t: Tensor, score: Tensor, alpha, sigma, d_alpha, d_sigma) -> Tensor:
    """Handbook Sec. 2.7: ``v = (alpha'/alpha) x_t + sigma (alpha' sigma / alpha - sigma') s``."""
    return d_alpha / alpha * x_t + sigma * (d_alpha * sigma / alpha - d_sigma) * score


# ---- consistency parameterisations (Eq. 19, 38) -----------------------------------------------------
def cm_c_skip_c_out(t: Tensor, sigma_data: float = 0.5, eps: float = 0.002) -> tuple[Tensor, Tensor]:
    """Handbook Eq. 19: ``c_skip = sd^2 / ((t - eps)^2 + sd^2)``, ``c_out = sd (t - eps) / sqrt(t^2 + sd^2)``."""
    c_skip = sigma_data ** 2 / ((t - eps) ** 2 + sigma_data ** 2)
    c_out = sigma_data * (t - eps) / torch.sqrt(t ** 2 + sigma_data ** 2)
    return c_skip, c_out


def consistency_f(x_t: Tensor, x0: Tensor, t: Tensor, sigma_data: float = 0.5, eps: float = 0.002) -> Tensor:
    """Handbook Eq. 19 / 24: ``f = c_skip(t) x_t + c_out(t) x0_hat`` (t is the EDM noise level)."""
    t64 = expand_like(torch.as_tensor(t, dtype=torch.float64, device=x_t.device), x_t)   # time stays float64
    c_skip, c_out = (c.to(x_t.dtype) for c in cm_c_skip_c_out(t64, sigma_data, eps))
    return c_skip * x_t + c_out * x0


def trigflow_f(x_t: Tensor, t, F: Tensor, sigma_data: float) -> Tensor:
    """Handbook Eq. 38: ``f = cos(t) x_t - sin(t) sigma_d F``."""
    t = expand_like(torch.as_tensor(t, dtype=torch.float64, device=x_t.device), x_t)    # time stays float64
    return torch.cos(t).to(x_t.dtype) * x_t - (torch.sin(t) * sigma_data).to(x_t.dtype) * F


# ---- generic router -------------------------------------------------------------------------------
def to_x0_eps(source: str, value: Tensor, x_t: Tensor, t, process: Process, *, coefs: Coefficients | None = None,
              **cm_kw) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` from a prediction of kind ``source``; ``coefs``: ``process.at(t, x_t)`` if known."""
    return _to_x0_eps(source, value, x_t, t, process, coefs, cm_kw)[:2]


def _to_x0_eps(source: str, value: Tensor, x_t: Tensor, t, process: Process, coefs, cm_kw):
    """``(x0_hat, eps_hat, coefficients)`` (see ``to_x0_eps``)."""
    check_prediction(source, "source")
    if value.shape != x_t.shape:
        raise ValueError(f"prediction has shape {tuple(value.shape)} but x_t has shape {tuple(x_t.shape)}")
    c = _coefs(process, t, x_t, coefs)
    a, s, tt = c.alpha, c.sigma, c.t
    if source == "eps":
        return x0_from_eps(x_t, value, _nonzero(a, "alpha(t)", tt), s), value, c
    if source == "x0":
        return value, eps_from_x0(x_t, value, a, _nonzero(s, "sigma(t)", tt)), c
    if source == "score":
        return x0_from_score(x_t, value, _nonzero(a, "alpha(t)", tt), s), eps_from_score(value, s), c
    if source in ("v", "v_bar"):
        v = value if source == "v" else -value
        r = torch.sqrt(a * a + s * s)
        xs = x_t / r
        return (a / r) * xs + (s / r) * v, (s / r) * xs - (a / r) * v, c
    if source in ("velocity", "trigflow_F"):
        u = value if source == "velocity" else _trig_sd(process) * value
        da, ds = _finite(c.d_alpha, "d alpha/dt", tt), _finite(c.d_sigma, "d sigma/dt", tt)
        det = _nonzero(a * ds - s * da, "alpha * dsigma/dt - sigma * dalpha/dt", tt)
        return (ds * x_t - s * u) / det, (a * u - da * x_t) / det, c
    if source == "instaflow_v":
        y = x_t / (a + s)
        g = a / (a + s)
        return y + (1 - g) * value, y - g * value, c
    # cm_f
    c_skip, c_out = _cm_coefs(c, x_t, cm_kw)
    x0 = (value - c_skip * x_t) / _nonzero(c_out, "c_out(t) (consistency boundary)", tt)
    return x0, eps_from_x0(x_t, x0, a, _nonzero(s, "sigma(t)", tt)), c


def from_x0_eps(target: str, x0: Tensor, eps: Tensor, x_t: Tensor, t, process: Process, *,
                coefs: Coefficients | None = None, **cm_kw) -> Tensor:
    """The prediction of kind ``target`` given ``(x0_hat, eps_hat)``; ``coefs``: ``process.at(t, x_t)`` if known."""
    check_prediction(target, "target")
    c = _coefs(process, t, x_t, coefs)
    a, s, tt = c.alpha, c.sigma, c.t
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "score":
        return score_from_eps(eps, _nonzero(s, "sigma(t)", tt))
    if target in ("v", "v_bar"):
        v = (s * x0 - a * eps) / torch.sqrt(a * a + s * s)
        return v if target == "v" else -v
    if target in ("velocity", "trigflow_F"):
        u = _finite(c.d_alpha, "d alpha/dt", tt) * x0 + _finite(c.d_sigma, "d sigma/dt", tt) * eps
        return u if target == "velocity" else u / _trig_sd(process)
    if target == "instaflow_v":
        return x0 - eps
    c_skip, c_out = _cm_coefs(c, x_t, cm_kw)
    return c_skip * x_t + c_out * x0


def _cm_coefs(c: Coefficients, x_t: Tensor, cm_kw) -> tuple[Tensor, Tensor]:
    """Eq. 19's c_skip, c_out at the EDM noise level sigma/alpha, from float64 t, cast once to x_t's dtype."""
    _nonzero(c.alpha, "alpha(t)", c.t)
    dt = x_t.dtype if x_t.is_floating_point() else torch.float64
    return tuple(k.to(dt) for k in cm_c_skip_c_out(c.process.at(c.t, x_t, dtype=torch.float64).edm_sigma, **cm_kw))


def convert(value: Tensor, source: str, target: str, x_t: Tensor, t, process: Process, *,
            coefs: Coefficients | None = None, **cm_kw) -> Tensor:
    """Convert a prediction of kind ``source`` into kind ``target`` under ``process`` at ``(x_t, t)``."""
    check_prediction(target, "target")
    if source == target:
        check_prediction(source, "source")
        return value
    x0, eps, c = _to_x0_eps(source, value, x_t, t, process, coefs, cm_kw)
    return from_x0_eps(target, x0, eps, x_t, t, process, coefs=c, **cm_kw)


def _trig_sd(process: Process) -> float:
    if not isinstance(process, TrigFlow):
        raise ValueError(f"prediction 'trigflow_F' is defined for the TrigFlow process only, got {process}")
    return process.sigma_data


def angle_phi(alpha_bar: Tensor) -> Tensor:
    """Handbook Sec. 2.6.2 angle: ``sin(phi) = sqrt(ab)``, ``cos(phi) = sqrt(1 - ab)``."""
    return torch.atan2(torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar))

