"""Flow samplers: rectified-flow Euler (handbook Sec. 2.4.2), InstaFlow (Alg. 6-8) and TrigFlow (Sec. 2.5.2).

**Rectified flow** (``RectifiedFlow`` process, ``x_t = (1 - t) x0 + t eps``): the predictor's
``"velocity"`` is the time derivative ``dx_t/dt = eps - x0`` (``conversions``; for a 1-rectified flow
network trained with Eq. 28 it is its raw output). Euler's method ``x_{t'} = x_t + (t' - t) v(x_t, t)``
runs either way (Sec. 2.4.2): ``direction="to_data"`` on a decreasing grid ``1 -> 0`` (noise to data),
``direction="to_noise"`` on an *increasing* grid ``0 -> 1`` (data to noise, e.g. to build reflow pairs).
The handbook writes the noise-to-data update with the "redefined" velocity ``v = y0 - y1 = -dx/dt`` and a
positive step ``t_i - t_{i-1}``; that is the same update: ``(t' - t) dx/dt = (t - t') (-dx/dt)``. The
step from ``t`` uses the velocity at ``t`` only, so a to_data grid may end at 0; a to_noise grid starting
at 0 evaluates the predictor at ``t = 0`` (fine for a network, undefined for an exact mixture, whose
``eps`` needs ``sigma > 0``: start such grids slightly above 0).
``flow_match_timesteps`` reproduces diffusers' ``FlowMatchEulerDiscreteScheduler`` grid (including
``shift``); with it the Euler step equals diffusers' ``step`` (``samplers.rf_diffusers``).

**InstaFlow** (Sec. 2.4.3; DDPM/VP process): the sampler state is the scaled variable
``y_t = x_t / beta_t`` with ``beta_t = sqrt(ab_t) + sqrt(1 - ab_t)`` (Eq. 31; ``y_0 = x_0``). The predictor
is called on ``x_t = beta_t y_t`` (the Predictor contract takes ``x_t``) and asked for ``"instaflow_v"``
(``v^y = x0 - eps``, Eq. 30). Then ``x0_hat = y + (1 - gamma_t) v`` (Eq. 32) and ``eps_hat = y - gamma_t v``
(Eq. 33), ``gamma_t = sqrt(ab_t) / beta_t``.

* ``method="posterior"`` (Alg. 6): ``y_{t'} = [c1 x0_hat + c2 beta_t y_t + sigma z] / beta_{t'}`` with Eq. 10's
  ``c1 = sqrt(ab_{t'}) (1 - alpha) / (1 - ab_t)``, ``c2 = sqrt(alpha) (1 - ab_{t'}) / (1 - ab_t)``,
  ``sigma^2 = (1 - alpha)(1 - ab_{t'}) / (1 - ab_t)``, ``alpha = ab_t / ab_{t'}`` (the per-step alpha_t on the
  full grid ``t' = t - 1``; on a sub-sequence this is the exact posterior ``q(x_{t'} | x_t, x0)``).
  Erratum ``samplers.instaflow_alg6_coefficient``: Alg. 6 line 5 prints ``(1 - alpha_t) sqrt(ab_t)`` for c1.
* ``method="ddim"`` (Alg. 8, Eq. 34): ``y_{t'} = [sqrt(ab_{t'}) x0_hat + sqrt(1 - ab_{t'} - sigma^2) eps_hat
  + sigma z] / beta_{t'}`` with the x-space ``sigma = eta sqrt((1 - ab_{t'})/(1 - ab_t) (1 - ab_t/ab_{t'}))``.
  ``eta = 0`` is deterministic DDIM; the box's line 6 is ``eta = 1`` (on the full grid that step is Alg. 6's).
  Errata: Alg. 8 line 4 prints the gamma denominator as ``sqrt(ab + sqrt(1 - ab))``
  (``samplers.instaflow_alg8_gamma``), and line 5 uses line 6's ``sigma``, already divided by ``beta_{t'}``,
  inside the x-space square root (``samplers.instaflow_alg8_sigma``).
* ``method="simplified"`` (Alg. 7): ``y_{t'} = (sqrt(ab_{t'}) x0_hat + sqrt(1 - ab_{t'}) z) / beta_{t'}``,
  the LCM re-noising step (Eq. 27) in y-space. It is exact when ``x0_hat`` is a consistency output (e.g.
  ``GaussianFlowMap`` of ``samplers.consistency``), but with a diffusion v-predictor (Tweedie's x0) it is
  *not* the sampler of Alg. 6 that the handbook presents it as: it loses ``ab_{t'} Var[x0 | x_t]`` of
  variance at every step (about half the data variance at T = 1000; ``samplers.instaflow_alg7``).
* Prior (``instaflow_prior``): Alg. 6-8 line 1 print ``y_T ~ N(0, I)``; the DDPM prior ``x_T ~ N(0, I)``
  means ``y_T = x_T / beta_T ~ N(0, I / beta_T^2)`` (``samplers.instaflow_prior``).

**TrigFlow** (Sec. 2.5, ``TrigFlow`` process, ``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2 I)``): the
predictor's ``"trigflow_F"`` is ``F`` with ``sigma_d F = dx_t/dt`` (Eq. 38). ``sampler="ddim"`` is Sec.
2.5.2's step ``x_t = cos(s - t) x_s - sin(s - t) sigma_d F(x_s, s)`` -- exactly DDIM (``x_t = cos t x0_hat +
sin t z_hat``), and to ``t = 0`` it returns Eq. 38's ``f`` (= ``E[x0 | x_s]`` for the exact F).
``sampler="consistency"`` is sCM multistep sampling (``x0_hat = f(x_s, s)``, then ``cos t x0_hat + sin t
sigma_d z`` with fresh z), i.e. diffusers' ``SCMScheduler`` (``samplers.scm_diffusers``). Start from
``x_{pi/2} ~ N(0, sigma_d^2 I)`` (``process.prior_sample``); the handbook's "x_T ~ N(0, I)" is right only
for sigma_d = 1 (``samplers.trigflow_prior``).
"""
from __future__ import annotations

import math

import torch

from ..predictors import Predictor
from ..process import DDPM, VP, Process, TrigFlow
from ..times import flow_match_timesteps, trigflow_timesteps  # noqa: F401  (re-exported)
from ..validation import check_batch, check_choice
from .common import _check_generator, _check_predictor, _draw_noise, _scalar_t, check_timesteps, run_loop
from .consistency import consistency_multistep
from .diffusion import ddim_sigma, ddim_update, ddpm_posterior

Tensor = torch.Tensor

__all__ = [
    "rectified_flow_euler_step", "rectified_flow_euler", "flow_match_timesteps",
    "instaflow_beta", "instaflow_prior", "instaflow_posterior_step", "instaflow_simplified_step",
    "instaflow_ddim_step", "instaflow", "INSTAFLOW_METHODS",
    "trigflow_step", "trigflow", "trigflow_timesteps",
]


# ---- rectified flow (Sec. 2.4.2) -----------------------------------------------------------------------
def rectified_flow_euler_step(predictor: Predictor, x: Tensor, t, t_next, cond=None) -> Tensor:
    """One Euler step of the flow ODE: ``x + (t_next - t) v(x, t)`` with ``v = predictor.predict("velocity")``."""
    _check_predictor(predictor)
    t, t_next = _scalar_t(t), _scalar_t(t_next, "t_next")
    return x + (t_next - t) * predictor.predict("velocity", x, t, cond)


_DIRECTIONS = ("to_data", "to_noise")


def rectified_flow_euler(predictor: Predictor, timesteps, x_init: Tensor, *, direction: str = "to_data",
                         cond=None, generator: torch.Generator | None = None, return_trajectory: bool = False,
                         progress: bool = False):
    """Euler sampling of a rectified flow in either direction (handbook Sec. 2.4.2).

    Args:
        predictor: any predictor; its ``"velocity"`` (``dx_t/dt``, ``eps - x0`` on ``RectifiedFlow``) drives
            the ODE in its process's time.
        timesteps: ``direction="to_data"``: strictly decreasing (e.g. ``torch.linspace(1, 0, N + 1)``,
            ``x_init`` ~ noise at ``timesteps[0]``); ``direction="to_noise"``: strictly increasing
            (e.g. ``linspace(0, 1, N + 1)``, ``x_init`` = data at ``timesteps[0]``).
        generator: unused (the ODE is deterministic); accepted for the common sampler signature.

    Returns the end point, or ``(end point, trajectory)``. Deterministic; first-order accurate in the
    step size (``samplers.rf_euler_rate``).
    """
    process = _check_predictor(predictor)
    check_batch(x_init, "x_init")
    _check_generator(generator)
    check_choice("direction", direction, _DIRECTIONS)  # to_data: decreasing timesteps; to_noise: increasing
    if direction == "to_data":
        ts = check_timesteps(timesteps, process)
    else:
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if ts.numel() < 2 or not (ts[1:] > ts[:-1]).all():
            raise ValueError(f"timesteps must be strictly increasing (data -> noise) for direction='to_noise', "
                             f"got {ts.tolist()[:6]}...")
        process.check_t(ts)

    def step(x, t, t_next, i):
        return rectified_flow_euler_step(predictor, x, t, t_next, cond)

    return run_loop(step, ts, x_init, return_trajectory, progress, desc=f"rectified flow Euler ({direction})")


# ---- InstaFlow (Sec. 2.4.3, Alg. 6-8) --------------------------------------------------------------------
INSTAFLOW_METHODS = ("posterior", "simplified", "ddim")


def _check_vp(process: Process) -> Process:
    if not isinstance(process, (DDPM, VP)):
        raise ValueError(f"InstaFlow sampling needs a DDPM/VP process (y_t = x_t / (sqrt(ab) + sqrt(1 - ab))), "
                         f"got {process}")
    return process


def instaflow_beta(process: Process, t) -> Tensor:
    """``beta_t = sqrt(ab_t) + sqrt(1 - ab_t)`` (the Eq. 31 denominator; ``beta_0 = 1``)."""
    _check_vp(process)
    return process.alpha(t) + process.sigma(t)


def instaflow_prior(process: Process, shape, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64, t=None) -> Tensor:
    """``y_T = x_T / beta_T`` with the DDPM prior ``x_T ~ N(0, I)``: ``N(0, I / beta_T^2)``, not Alg. 6 line 1's N(0, I)."""
    _check_vp(process)
    _check_generator(generator)
    t = process.t_max if t is None else t
    return process.prior_sample(shape, generator=generator, dtype=dtype) / float(instaflow_beta(process, t))


def _instaflow_terms(predictor, y: Tensor, t: float, ab: float, cond):
    """``(x0_hat, eps_hat, beta_t)`` from the InstaFlow velocity at ``(y_t, t)`` (Eq. 31-33), ``ab = alpha_bar(t)``."""
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    beta = a + s
    v = predictor.predict("instaflow_v", beta * y, t, cond)          # the network sees x_t = beta_t y_t
    return y + (s / beta) * v, y - (a / beta) * v, beta                # Eq. 32, Eq. 33


def _step_times(predictor, t, t_prev):
    p = _check_vp(_check_predictor(predictor))
    t, t_prev = _scalar_t(t), _scalar_t(t_prev, "t_prev")
    if not t_prev < t:
        raise ValueError(f"t_prev={t_prev:g} must be smaller than t={t:g}")
    ab_t, ab_p = p.alpha_bar(torch.tensor([t, t_prev], dtype=torch.float64)).tolist()
    return p, t, t_prev, ab_t, ab_p


def instaflow_posterior_step(predictor: Predictor, y: Tensor, t, t_prev, *, noise: Tensor | None = None,
                             generator: torch.Generator | None = None, cond=None) -> Tensor:
    """Alg. 6 (corrected line 5): the DDPM posterior step (Eq. 10) written in the InstaFlow space y."""
    p, t, t_prev, ab_t, ab_p = _step_times(predictor, t, t_prev)
    x0_hat, _, beta_t = _instaflow_terms(predictor, y, t, ab_t, cond)
    c1, c2, var = ddpm_posterior(ab_t, ab_p)                          # Eq. 10 with alpha = ab_t / ab_prev
    sigma = math.sqrt(var)
    beta_p = math.sqrt(ab_p) + math.sqrt(1 - ab_p)
    mean = c1 * x0_hat + c2 * beta_t * y
    if sigma == 0.0:
        return mean / beta_p
    return (mean + sigma * _draw_noise(noise, y, generator)) / beta_p


def instaflow_simplified_step(predictor: Predictor, y: Tensor, t, t_prev, *, noise: Tensor | None = None,
                              generator: torch.Generator | None = None, cond=None) -> Tensor:
    """Alg. 7: ``y_{t'} = (sqrt(ab_{t'}) x0_hat + sqrt(1 - ab_{t'}) z) / beta_{t'}`` (re-noising; see the module doc)."""
    p, t, t_prev, ab_t, ab_p = _step_times(predictor, t, t_prev)
    x0_hat, _, _ = _instaflow_terms(predictor, y, t, ab_t, cond)
    beta_p = math.sqrt(ab_p) + math.sqrt(1 - ab_p)
    if ab_p == 1.0:
        return x0_hat
    return (math.sqrt(ab_p) * x0_hat + math.sqrt(1 - ab_p) * _draw_noise(noise, y, generator)) / beta_p


def instaflow_ddim_step(predictor: Predictor, y: Tensor, t, t_prev, *, eta: float = 0.0,
                        noise: Tensor | None = None, generator: torch.Generator | None = None, cond=None) -> Tensor:
    """Alg. 8 (corrected lines 4-6), Eq. 34: DDIM (Eq. 14) in the InstaFlow space y, any sub-sequence."""
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta={eta!r} must be a finite number >= 0") from None
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta={eta!r} must be a finite number >= 0")
    p, t, t_prev, ab_t, ab_p = _step_times(predictor, t, t_prev)
    x0_hat, eps_hat, _ = _instaflow_terms(predictor, y, t, ab_t, cond)
    sigma = ddim_sigma(ab_t, ab_p, eta)
    rest = 1 - ab_p - sigma * sigma
    if rest < -1e-12:
        raise ValueError(f"eta={eta:g} is too large: sigma^2={sigma * sigma:.4g} exceeds 1 - ab_prev={1 - ab_p:.4g}")
    beta_p = math.sqrt(ab_p) + math.sqrt(1 - ab_p)
    z = _draw_noise(noise, y, generator) if sigma > 0 else None
    return ddim_update(x0_hat, eps_hat, math.sqrt(ab_p), 1 - ab_p, sigma, z) / beta_p


def instaflow(predictor: Predictor, timesteps, y_init: Tensor, *, method: str = "posterior", eta: float = 0.0,
              generator: torch.Generator | None = None, cond=None, return_trajectory: bool = False,
              progress: bool = False):
    """InstaFlow sampling in the scaled space ``y_t`` (handbook Alg. 6, 7, 8).

    Args:
        predictor: on a DDPM/VP process; asked for ``"instaflow_v"`` at ``x_t = beta_t y_t``.
        timesteps: strictly decreasing, ending at 0 (``y_0 = x_0``). Alg. 6/7 use the full grid
            ``T, T-1, ..., 0`` (``torch.arange(T, -1, -1)``); Alg. 8 any sub-sequence.
        y_init: ``y_{timesteps[0]}``; from the DDPM prior use ``instaflow_prior`` (``N(0, I / beta_T^2)``).
        method: ``"posterior"`` (Alg. 6), ``"simplified"`` (Alg. 7) or ``"ddim"`` (Alg. 8, with ``eta``).

    Returns ``y_0`` (= ``x_0``), or ``(y_0, trajectory of y)``.
    """
    process = _check_vp(_check_predictor(predictor))
    check_batch(y_init, "y_init")
    _check_generator(generator)
    check_choice("method", method, INSTAFLOW_METHODS)
    ts = check_timesteps(timesteps, process)

    def step(y, t, t_prev, i):
        if method == "posterior":
            return instaflow_posterior_step(predictor, y, t, t_prev, generator=generator, cond=cond)
        if method == "simplified":
            return instaflow_simplified_step(predictor, y, t, t_prev, generator=generator, cond=cond)
        return instaflow_ddim_step(predictor, y, t, t_prev, eta=eta, generator=generator, cond=cond)

    return run_loop(step, ts, y_init, return_trajectory, progress, desc=f"InstaFlow ({method})")


# ---- TrigFlow (Sec. 2.5.2) -------------------------------------------------------------------------------
def _check_trigflow(predictor) -> TrigFlow:
    p = _check_predictor(predictor)
    if not isinstance(p, TrigFlow):
        raise ValueError(f"TrigFlow sampling needs a predictor on the TrigFlow process, got {p}")
    return p


def trigflow_step(predictor: Predictor, x: Tensor, s, t, cond=None) -> Tensor:
    """Sec. 2.5.2: ``x_t = cos(s - t) x_s - sin(s - t) sigma_d F(x_s, s)`` (``s > t``), ``F = predict("trigflow_F")``."""
    p = _check_trigflow(predictor)
    s, t = _scalar_t(s, "s"), _scalar_t(t)
    if not t < s:
        raise ValueError(f"t={t:g} must be smaller than s={s:g}")
    p.check_t(torch.tensor([s, t], dtype=torch.float64))
    F = predictor.predict("trigflow_F", x, s, cond)
    return math.cos(s - t) * x - math.sin(s - t) * p.sigma_data * F


_TRIG_SAMPLERS = ("ddim", "consistency")


def trigflow(predictor: Predictor, timesteps, x_init: Tensor, *, sampler: str = "ddim",
             generator: torch.Generator | None = None, noise_dtype=None, cond=None,
             return_trajectory: bool = False, progress: bool = False):
    """TrigFlow sampling (handbook Sec. 2.5.2), deterministic DDIM steps or sCM consistency steps.

    Args:
        timesteps: strictly decreasing in ``[0, pi/2]`` (e.g. ``trigflow_timesteps(N)``); the last entry is
            where sampling stops (0 for data; required for ``sampler="consistency"``).
        x_init: ``x_{timesteps[0]}``; at ``pi/2`` draw it from ``N(0, sigma_d^2 I)`` (``process.prior_sample``).
        sampler: ``"ddim"`` (Sec. 2.5.2) or ``"consistency"`` (sCM / diffusers ``SCMScheduler``, fresh noise).
        noise_dtype: dtype of the fresh noise for ``"consistency"`` (``SCMScheduler`` draws float32).
    """
    process = _check_trigflow(predictor)
    check_batch(x_init, "x_init")
    _check_generator(generator)
    check_choice("sampler", sampler, _TRIG_SAMPLERS)
    if sampler == "consistency":
        return consistency_multistep(predictor, timesteps, x_init, epsilon=0.0, generator=generator, cond=cond,
                                     noise_dtype=noise_dtype, return_trajectory=return_trajectory,
                                     progress=progress)
    ts = check_timesteps(timesteps, process)

    def step(x, s, t, i):
        return trigflow_step(predictor, x, s, t, cond)

    return run_loop(step, ts, x_init, return_trajectory, progress, desc="TrigFlow (Sec. 2.5.2)")
