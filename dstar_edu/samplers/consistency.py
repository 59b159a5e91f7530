"""Consistency-model samplers: CM multistep (handbook Alg. 4, Eq. 26) and LCM (Alg. 5 / Alg. 9, Eq. 24, 27).

Both samplers alternate two moves (handbook Sec. 2.3.2):

1. jump to the data end with the consistency function, ``x0_hat = f(x_{t_n}, t_n)``;
2. re-noise ``x0_hat`` to the next (smaller) time with **fresh** Gaussian noise.

What "the consistency function" is, for a predictor (the contract of ``predictors.py``):

* a network declared with ``prediction="cm_f"`` outputs ``f`` itself (Eq. 19: ``c_skip x_t + c_out F``).
  Its raw output is used. (Asking it ``predict("x0")`` would *not* give ``f``: ``conversions.convert``
  reads ``cm_f`` as ``c_skip x_t + c_out x0_hat`` and returns the inner ``x0_hat = (f - c_skip x_t)/c_out``.)
* any other predictor is asked for ``"x0"``. For a consistency model parameterised otherwise (TrigFlow's
  Eq. 38 ``f = cos t x_t - sin t sigma_d F`` is exactly ``convert(F, "trigflow_F", "x0")``; an LCM
  student's ``eps`` gives Eq. 24's ``x_theta``) that *is* its consistency output. For a diffusion model
  (or the exact mixtures of ``toy_data.mixtures``) it is Tweedie's ``E[x0 | x_t]`` (Eq. 7): that is what
  Alg. 5 line 4 does, and it is **not** the consistency function of the PF-ODE (see below).

The exact consistency function of a data distribution is the PF-ODE flow map ``x_t -> x_epsilon``.
``GaussianFlowMap`` gives it in closed form for Gaussian data (any process), ``ODEFlowMap`` integrates it
numerically for any predictor (e.g. the exact 2D mixtures). With the exact flow map the multistep sampler
reproduces the exact marginal ``p_{t_n}`` after *every* step, for any number of steps (checked in
``samplers.consistency_exact_f``); with Tweedie's posterior mean in its place the samples lose the
posterior variance at every re-noising (``samplers.lcm_tweedie_variance_loss``).

Time grids follow ``samplers/common.py``: strictly decreasing, ``x_init`` lives at ``timesteps[0]``.
The *last* entry marks the end: the final step returns the consistency output without re-noising.

* ``consistency_multistep`` (Alg. 4): ``timesteps = [t_N, ..., t_1, t_end]`` with ``t_end <= epsilon``
  (typically 0 or epsilon) and every other entry ``> epsilon``. On the VE/EDM process of the handbook
  (``alpha = 1``, ``sigma = t``) the re-noising is Eq. 26, ``x_{t_{n-1}} = x0_hat + sqrt(t_{n-1}^2 - eps^2) z``.
  On another process the same move is the forward kernel from ``epsilon`` to ``t_{n-1}``
  (``renoise``): on TrigFlow with ``epsilon = 0`` it is sCM sampling, ``cos(t) x0_hat + sigma_d sin(t) z``
  (diffusers' ``SCMScheduler``).
  Erratum (``samplers.cm_prior``): Alg. 4 line 1 draws ``x_{t_N} ~ N(0, I)``; on the VE process the prior
  at ``T`` is ``N(0, T^2 I)`` (Sec. 2.3: ``x_T ~ N(0, T^2 I)``). Use ``process.prior_sample``.
* ``lcm`` (Alg. 5, Alg. 9): DDPM/VP process, ``x0_hat`` by Tweedie (Alg. 5 line 4) or through LCM's
  boundary scalings (Eq. 24, Alg. 9 line 4, as in diffusers' ``LCMScheduler``:
  ``c_skip = sd^2 / ((10 k)^2 + sd^2)``, ``c_out = 10 k / sqrt((10 k)^2 + sd^2)`` at diffusers timestep
  ``k = t - 1``, ``sd = 0.5`` -- *not* Eq. 19's ``c_out``, which carries an extra ``sd`` and ``epsilon``),
  then Eq. 27 ``x_{t_{n-1}} = sqrt(ab_{t_{n-1}}) x0_hat + sqrt(1 - ab_{t_{n-1}}) z``.
  ``noise="predicted"`` replaces the fresh ``z`` by ``eps_theta(x_{t_n}, t_n)``: then (without the
  boundary) the step *is* DDIM with eta = 0 (Prop. 2.3, ``samplers.prop23_lcm_is_ddim``); with fresh
  noise it is the member of the DDIM family (Eq. 14) with the largest ``sigma_{t_n} = sqrt(1 - ab_{t_{n-1}})``.
  Erratum (``samplers.lcm_plugin_index``): the text under Alg. 5 plugs Eq. 24 into Eq. 27 with the noise
  coefficient ``sqrt(1 - ab_{t_{n+1}})``; Eq. 27 needs ``sqrt(1 - ab_{t_n})`` (the time being noised *to*).
"""
from __future__ import annotations

import math

import torch

from ..predictors import Predictor
from ..process import DDPM, Process, time_tensor
from ..times import lcm_timesteps, rho_grid  # noqa: F401  (lcm_timesteps re-exported)
from ..validation import check_batch, check_choice, check_int
from .common import _check_generator, _check_predictor, _draw_noise, _scalar_t, check_timesteps, run_loop
from .diffusion import ddim_update

Tensor = torch.Tensor

__all__ = [
    "consistency_output", "renoise", "consistency_multistep_step", "consistency_multistep",
    "lcm_boundary_scalings", "lcm_timesteps", "lcm_step", "lcm",
    "GaussianFlowMap", "ODEFlowMap",
]

#: handbook Sec. 2.3.1: "small constant eps = 0.002"
CM_EPSILON = 0.002


def consistency_output(predictor: Predictor, x_t: Tensor, t, cond=None) -> Tensor:
    """The consistency output ``f(x_t, t)`` used by Alg. 4 line 3 / Alg. 9 line 4 (see module docstring).

    ``prediction == "cm_f"``: the raw output (it is ``f``); otherwise ``predictor.predict("x0", ...)``.
    """
    _check_predictor(predictor)
    if predictor.prediction == "cm_f":
        return predictor(x_t, t, cond)
    return predictor.predict("x0", x_t, t, cond)


def renoise(x_from: Tensor, t_from, t_to, process: Process, noise: Tensor) -> Tensor:
    """Forward kernel ``q(x_{t_to} | x_{t_from})``: ``r x + sqrt(sigma_to^2 - r^2 sigma_from^2) z``, ``r = a_to/a_from``.

    From ``t_from = epsilon`` on VE this is Eq. 26 (``x + sqrt(t^2 - eps^2) z``); from ``t_from = 0``
    it is Eq. 6 / Eq. 27 (``alpha_to x0 + sigma_to z``).
    """
    a0, s0 = (float(c) for c in (process.alpha(_scalar_t(t_from, "t_from")), process.sigma(t_from)))
    a1, s1 = (float(c) for c in (process.alpha(_scalar_t(t_to, "t_to")), process.sigma(t_to)))
    r = a1 / a0
    var = s1 * s1 - r * r * s0 * s0
    if var < -1e-14 * max(1.0, s1 * s1):
        raise ValueError(f"t_to={float(t_to):g} must not be below t_from={float(t_from):g}: the forward kernel "
                         f"would need negative variance {var:.3g}")
    return r * x_from + math.sqrt(max(var, 0.0)) * noise


# ---- Alg. 4: CM multistep sampling ---------------------------------------------------------------------
def _check_epsilon(epsilon, process: Process) -> float:
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon={epsilon!r} must be a number (the consistency boundary time)") from None
    if not (process.t_min <= eps < process.t_max):
        raise ValueError(f"epsilon={eps:g} must lie in [{process.t_min:g}, {process.t_max:g}) of {process}")
    return eps


def consistency_multistep_step(predictor: Predictor, x: Tensor, t, t_next, *, epsilon: float = CM_EPSILON,
                               noise: Tensor | None = None, generator: torch.Generator | None = None,
                               cond=None, noise_dtype=None) -> Tensor:
    """One iteration of Alg. 4: ``x0_hat = f(x_t, t)``; if ``t_next <= epsilon`` return it, else re-noise (Eq. 26).

    ``noise``: the ``z`` of Eq. 26 (default: drawn from ``generator``; nothing is drawn on the final step).
    """
    process = _check_predictor(predictor)
    eps = _check_epsilon(epsilon, process)
    t, t_next = _scalar_t(t), _scalar_t(t_next, "t_next")
    if t <= eps:
        raise ValueError(f"t={t:g} must be above epsilon={eps:g}: f(x, epsilon) = x is the boundary")
    x0_hat = consistency_output(predictor, x, t, cond)
    if t_next <= eps:
        return x0_hat
    return renoise(x0_hat, eps, t_next, process, _draw_noise(noise, x, generator, noise_dtype))


def consistency_multistep(predictor: Predictor, timesteps, x_init: Tensor, *, epsilon: float = CM_EPSILON,
                          generator: torch.Generator | None = None, cond=None, noise_dtype=None,
                          return_trajectory: bool = False, progress: bool = False):
    """Multistep consistency sampling, handbook Alg. 4 with Eq. 26.

    Args:
        predictor: a consistency model (``prediction="cm_f"``, or any predictor whose ``"x0"`` is its
            consistency output; see the module docstring). Its process defines ``t``.
        timesteps: strictly decreasing ``[t_N, ..., t_1, t_end]``; ``t_end <= epsilon < t_1``.
        x_init: ``x_{t_N}``; on VE draw it from the prior ``N(0, T^2 I)`` (``process.prior_sample``),
            not ``N(0, I)`` as Alg. 4 line 1 prints (erratum ``samplers.cm_prior``).
        epsilon: the boundary time of f (handbook: 0.002); f maps to ``x_epsilon`` and the re-noising
            adds ``sqrt(t^2 - epsilon^2)`` of noise so that the total is ``t``.
        noise_dtype: dtype in which the fresh noise is drawn (default: the sample's).

    Returns the sample (``f``'s output at ``t_1``), or ``(sample, trajectory)``.
    """
    process = _check_predictor(predictor)
    check_batch(x_init, "x_init")
    _check_generator(generator)
    eps = _check_epsilon(epsilon, process)
    ts = check_timesteps(timesteps, process)
    if ts[-1] > eps:
        raise ValueError(f"timesteps[-1]={ts[-1].item():g} must be <= epsilon={eps:g}: consistency sampling "
                         "ends with f's output x_epsilon (use 0 or epsilon as the last entry)")
    if ts[-2] <= eps:
        raise ValueError(f"timesteps[:-1] must all be > epsilon={eps:g}, got {ts[:-1].tolist()}")

    def step(x, t, t_next, i):
        return consistency_multistep_step(predictor, x, t, t_next, epsilon=eps, generator=generator, cond=cond,
                                          noise_dtype=noise_dtype)

    return run_loop(step, ts, x_init, return_trajectory, progress, desc="CM multistep (Alg. 4)")


# ---- Alg. 5 / Alg. 9: LCM ------------------------------------------------------------------------------
def lcm_boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """LCM boundary ``(c_skip, c_out)`` at handbook DDPM time ``t`` (Eq. 24 as implemented by LCM / diffusers).

    With diffusers' timestep ``k = t - 1`` and ``s = timestep_scaling * k``:
    ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)``, ``c_out = s / sqrt(s^2 + sigma_data^2)``; at ``t = 1``
    (``k = 0``) ``f = x`` exactly. (Eq. 19 prints ``c_out = sigma_data (t - eps) / sqrt(t^2 + sigma_data^2)``
    for the EDM-parameterised CM; LCM's code drops the ``sigma_data`` factor and ``eps``.)
    """
    if not (float(timestep_scaling) > 0 and float(sigma_data) > 0):
        raise ValueError(f"timestep_scaling={timestep_scaling!r} and sigma_data={sigma_data!r} must be positive")
    t = torch.as_tensor(t, dtype=torch.float64)
    if (t < 1).any():
        raise ValueError(f"t={t.min().item():g}: the LCM boundary is defined for DDPM times t >= 1 "
                         "(diffusers timestep t - 1 >= 0)")
    s = timestep_scaling * (t - 1)
    return sigma_data ** 2 / (s * s + sigma_data ** 2), s / torch.sqrt(s * s + sigma_data ** 2)


_LCM_NOISE = ("fresh", "predicted")


def lcm_step(predictor: Predictor, x: Tensor, t, t_next, *, noise="fresh", boundary: bool = False,
             timestep_scaling: float = 10.0, sigma_data: float = 0.5, generator: torch.Generator | None = None,
             cond=None) -> Tensor:
    """One LCM step (Alg. 5 / Alg. 9): ``x0_hat``, then Eq. 27 ``x_{t_next} = alpha(t_next) x0_hat + sigma(t_next) z``.

    Args:
        noise: ``"fresh"`` (N(0, I) from ``generator``; Alg. 5 line 5), ``"predicted"`` (``eps_theta(x_t, t)``
            in place of fresh noise: Prop. 2.3) or an explicit tensor. Nothing is drawn when
            ``sigma(t_next) = 0`` (the final step, as diffusers does).
        boundary: apply LCM's ``c_skip x_t + c_out x_theta`` (Alg. 9 line 4, Eq. 24) with
            ``lcm_boundary_scalings``; needs a DDPM process and a predictor that is not already ``cm_f``.
            Without it, ``x0_hat`` is the consistency output (Tweedie's ``x0`` for an eps/x0/v model, Alg. 5).
    """
    process = _check_predictor(predictor)
    t, t_next = _scalar_t(t), _scalar_t(t_next, "t_next")
    if not t_next < t:
        raise ValueError(f"t_next={t_next:g} must be smaller than t={t:g}")
    if boundary:
        if not isinstance(process, DDPM):
            raise ValueError(f"boundary=True needs a DDPM process (LCM's discrete timesteps), got {process}")
        if predictor.prediction == "cm_f":
            raise ValueError("boundary=True with a prediction='cm_f' predictor would apply the boundary twice")
        c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling, sigma_data)
        x0_hat = c_skip.item() * x + c_out.item() * predictor.predict("x0", x, t, cond)
    else:
        x0_hat = consistency_output(predictor, x, t, cond)
    a, s = (float(c) for c in (process.alpha(t_next), process.sigma(t_next)))
    if isinstance(noise, str):
        check_choice("noise", noise, _LCM_NOISE, also="a tensor")
        if noise == "predicted":
            z = predictor.predict("eps", x, t, cond)
        elif s == 0.0:
            return a * x0_hat
        else:
            z = _draw_noise(None, x, generator)
    else:
        z = _draw_noise(noise, x, generator)
    return a * x0_hat + s * z


def lcm(predictor: Predictor, timesteps, x_init: Tensor, *, noise="fresh", boundary: bool = False,
        timestep_scaling: float = 10.0, sigma_data: float = 0.5, generator: torch.Generator | None = None,
        cond=None, return_trajectory: bool = False, progress: bool = False):
    """LCM multistep sampling (handbook Alg. 5, or Alg. 9 with ``boundary=True``).

    ``timesteps``: strictly decreasing, e.g. ``lcm_timesteps(4)`` = ``[1000, 760, 500, 260, 0]``; the last
    step re-noises to ``alpha_bar = 1`` at ``t = 0``, i.e. returns ``x0_hat``. ``x_init ~ N(0, I)`` (the
    DDPM prior). ``noise="predicted"`` gives DDIM (eta = 0) exactly (Prop. 2.3). With ``boundary=True`` and
    a DDPM process built from the scheduler's betas it reproduces diffusers' ``LCMScheduler`` step for step.
    """
    process = _check_predictor(predictor)
    check_batch(x_init, "x_init")
    _check_generator(generator)
    if isinstance(noise, Tensor):
        raise ValueError("noise must be 'fresh' or 'predicted' for the full sampler (tensors: use lcm_step)")
    ts = check_timesteps(timesteps, process)

    def step(x, t, t_next, i):
        return lcm_step(predictor, x, t, t_next, noise=noise, boundary=boundary, timestep_scaling=timestep_scaling,
                        sigma_data=sigma_data, generator=generator, cond=cond)

    return run_loop(step, ts, x_init, return_trajectory, progress, desc="LCM (Alg. 5)")


# ---- exact consistency functions -----------------------------------------------------------------------
class GaussianFlowMap(Predictor):
    """The exact consistency function (PF-ODE flow map ``x_t -> x_{t_end}``) of Gaussian data, in closed form.

    For data ``N(mu, Sigma)`` the marginal at ``t`` is ``N(alpha_t mu, alpha_t^2 Sigma + sigma_t^2 I)``; the
    PF-ODE drift is linear and diagonal in Sigma's eigenbasis, so each eigen-direction (variance ``lam``)
    is rescaled monotonically: ``x_s = alpha_s mu + U diag(sqrt(alpha_s^2 lam + sigma_s^2) /
    sqrt(alpha_t^2 lam + sigma_t^2)) U^T (x_t - alpha_t mu)``. It declares ``prediction="x0"`` (its ``x0``
    is the ODE end point ``x_{t_end}``, not ``E[x0 | x_t]``), so every sampler of this module uses it as f.

    Args:
        gaussian: a one-component ``toy_data.mixtures.GaussianMixture`` (any covariance type); its process
            (or ``process``) defines ``t``.
        t_end: the boundary time (default the process's ``t_min``; the handbook's CM uses 0.002).
    """

    def __init__(self, gaussian, process: Process | None = None, t_end: float | None = None):
        process = process if process is not None else getattr(gaussian, "process", None)
        super().__init__(process, "x0")
        if getattr(gaussian, "K", None) != 1 or not hasattr(gaussian, "eigvals"):
            raise ValueError(f"gaussian must be a one-component GaussianMixture, got {gaussian!r}")
        self.mu = gaussian.means[0]
        self.lam = gaussian.eigvals[0]
        self.U = None if gaussian.eigvecs is None else gaussian.eigvecs[0]
        self.event_shape = gaussian.event_shape
        self.t_end = float(process.t_min if t_end is None else t_end)
        process.check_t(self.t_end)

    def flow(self, x_t: Tensor, t, s) -> Tensor:
        """The PF-ODE map from time ``t`` to time ``s`` (either direction)."""
        if tuple(x_t.shape[1:]) != self.event_shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (batch, *{self.event_shape})")
        p = self.process
        t = p.check_t(t, x_t)
        s = p.check_t(s, x_t)
        B = x_t.shape[0]
        col = lambda c: c.expand(B).to(x_t.dtype)[:, None]  # noqa: E731
        ct, cs = p.at(t), p.at(s)
        at, st, as_, ss = col(ct.alpha), col(ct.sigma), col(cs.alpha), col(cs.sigma)
        mu, lam = self.mu.to(x_t.dtype), self.lam.to(x_t.dtype)
        x = x_t.reshape(B, -1)
        gain = torch.sqrt(as_ ** 2 * lam + ss ** 2) / torch.sqrt(at ** 2 * lam + st ** 2)
        d = x - at * mu
        if self.U is None:
            out = as_ * mu + gain * d
        else:
            U = self.U.to(x_t.dtype)
            out = as_ * mu + ((d @ U) * gain) @ U.T
        return out.reshape(x_t.shape)

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        tt = time_tensor(t, x_t)
        if (tt < self.t_end).any():
            raise ValueError(f"t={tt.min().item():g} is below the flow map's end time t_end={self.t_end:g}")
        return self.flow(x_t, t, self.t_end)


class ODEFlowMap(Predictor):
    """Numerical consistency function of any predictor: integrate its PF-ODE from ``t`` down to ``t_end``.

    Uses ``n_steps`` DDIM steps (``x_s = alpha_s x0_hat + sigma_s eps_hat``: the exponential integrator of
    the PF-ODE, first order, exact for a single data point) on the grid
    ``t_i = (t^(1/rho) + i/n (t_end^(1/rho) - t^(1/rho)))^rho`` (EDM's spacing, dense near ``t_end``).
    ``teacher`` is e.g. an exact ``GaussianMixture``: this is then the ideal consistency model of the
    mixture up to the ODE error (first order in ``1/n_steps``). Declares ``prediction="x0"``; ``t`` must be
    a scalar (one ODE grid per call).
    """

    def __init__(self, teacher: Predictor, n_steps: int = 200, t_end: float | None = None, rho: float = 7.0):
        process = _check_predictor(teacher)
        super().__init__(process, "x0")
        check_int("n_steps", n_steps, lo=1)
        if not rho > 0:
            raise ValueError(f"rho={rho!r} must be positive")
        self.teacher, self.n_steps, self.rho = teacher, n_steps, float(rho)
        self.t_end = float(process.t_min if t_end is None else t_end)
        process.check_t(self.t_end)

    def grid(self, t: float) -> Tensor:
        return rho_grid(t, self.t_end, self.n_steps, self.rho)

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        t = _scalar_t(t)
        self.process.check_t(t)
        if t < self.t_end:
            raise ValueError(f"t={t:g} is below the flow map's end time t_end={self.t_end:g}")
        if t == self.t_end:
            return x_t
        x, p = x_t, self.process
        ts = self.grid(t)
        for i in range(self.n_steps):
            x0 = self.teacher.predict("x0", x, ts[i].item(), cond)
            a, s = p.coefficients(ts[i], x)
            eps = (x - a * x0) / s
            a2, s2 = p.coefficients(ts[i + 1], x)
            x = ddim_update(x0, eps, a2, s2 * s2)                         # Eq. 14 with sigma = 0
        return x
