"""Time: grids, spacings, training-time distributions and inverse time maps of every process (beside ``process``).

Everything that picks times lives here, once: the samplers' grids, the objectives' and the distillation
loops' time distributions, and ``scaled_runs``' noise-level ranges. Times are float64 and belong to a
``Process`` (``t = 0`` is data); EDM noise levels are ``sigma(t)/alpha(t)`` (``Process.edm_sigma``).

=========================  ========================================================================================
grids (decreasing)         ``uniform_grid``, ``ddpm_grid`` (Alg. 1), ``subsequence`` (DDIM, Eq. 14, diffusers
                           spacings), ``karras_sigmas`` (EDM), ``logsnr_grid`` (DPM-Solver), ``trigflow_timesteps``,
                           ``flow_match_timesteps``, ``lcm_timesteps``; ``check_timesteps`` validates one
spacing                    ``rho_grid``: EDM's rho spacing ``(a^(1/rho) + i/n (b^(1/rho) - a^(1/rho)))^rho``
                           (Karras et al. 2022; SIM Eq. B.8), the one implementation behind every rho grid
distributions              ``sample_t`` / ``make_t_sampler`` (uniform on the open domain, discrete DDPM, log-normal
                           EDM levels, logit-normal), ``p_edm`` (SIM Eq. B.5-B.6), ``p_sim`` (Eq. B.9-B.10),
                           ``p_sid`` (Eq. B.8 on ``karras_sigma_grid``); ``lognormal_edm_sigma`` is the one
                           log-normal draw ``ln sigma ~ N(P_mean, P_std^2)``
inverses                   ``t_from_edm_sigma`` (each process's closed form, ``Process.t_from_edm_sigma``),
                           ``log_snr`` and its inverse ``time_from_log_snr = t_from_edm_sigma(exp(-lambda))``;
                           ``edm_sigma_range`` is a process's whole noise-level range
=========================  ========================================================================================
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .process import DDPM, Process
from .validation import check_choice, check_int, check_positive

Tensor = torch.Tensor

__all__ = [
    "check_timesteps", "uniform_grid", "ddpm_grid", "subsequence", "rho_grid", "karras_sigmas", "logsnr_grid",
    "trigflow_timesteps", "flow_match_timesteps", "lcm_timesteps",
    "T_SAMPLERS", "sample_t", "make_t_sampler", "lognormal_edm_sigma", "lognormal_times", "p_edm", "p_sim",
    "karras_sigma_grid", "p_sid", "t_from_edm_sigma", "edm_sigma_range", "log_snr", "time_from_log_snr",
]


# ---- grids -----------------------------------------------------------------------------------------------------
def check_timesteps(timesteps, process: Process, dtype=torch.float64) -> Tensor:
    """Validate a strictly decreasing 1-d time grid inside the process domain."""
    ts = torch.as_tensor(timesteps, dtype=dtype).flatten()
    if torch.isnan(ts).any():
        raise ValueError(f"timesteps contains NaN: {ts.tolist()[:6]}")
    if ts.numel() < 2:
        raise ValueError(f"timesteps needs at least 2 entries (start and end), got {ts.tolist()}")
    if not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"timesteps must be strictly decreasing (noise -> data), got {ts.tolist()[:6]}...")
    process.check_t(ts)
    return ts

def uniform_grid(process: Process, n_steps: int, t_start: float | None = None, t_end: float | None = None,
                 dtype=torch.float64) -> Tensor:
    """``n_steps + 1`` equally spaced times from ``t_start`` (default t_max) down to ``t_end`` (default t_min)."""
    check_int("n_steps", n_steps, lo=1)
    t0 = process.t_max if t_start is None else t_start
    t1 = process.t_min if t_end is None else t_end
    return check_timesteps(torch.linspace(t0, t1, n_steps + 1, dtype=dtype), process)

def ddpm_grid(process: DDPM) -> Tensor:
    """The full DDPM grid ``T, T-1, ..., 1, 0`` (handbook Alg. 1)."""
    if not isinstance(process, DDPM):
        raise ValueError(f"process={process!r} must be a DDPM process for the full discrete grid")
    return torch.arange(process.T, -1, -1, dtype=torch.float64)

def subsequence(T: int, n_steps: int, spacing: str = "linspace", steps_offset: int = 0) -> Tensor:
    """DDIM sub-sequence ``{t_N > ... > t_1 > t_0 = 0}`` of the discrete grid {0..T} (handbook Eq. 14).

    The entries ``t_N..t_1`` are exactly diffusers' ``DDIMScheduler.set_timesteps(n_steps)`` timesteps
    ``k`` for ``timestep_spacing=spacing`` (and ``steps_offset``), shifted to the handbook's time
    ``t = k + 1``; ``t_0 = 0`` is clean data (diffusers' ``set_alpha_to_one=True``):

    * ``linspace``: ``k = round(linspace(0, T - 1, n))`` reversed (e.g. T=1000, n=10: t = 1000, 889, ..., 1, 0);
    * ``leading``:  ``k = (T // n) * arange(n) + steps_offset`` reversed (t = 901, 801, ..., 1, 0);
    * ``trailing``: ``k = round(arange(T, 0, -T / n)) - 1`` (t = 1000, 900, ..., 100, 0).

    diffusers' DDIM *step* goes from ``k`` to ``k - T // n`` whatever the spacing, which is the next
    entry of this list only for ``leading`` (and ``trailing`` when n divides T); see
    ``dstar_edu.diffusers_interop.diffusers_ddim_transitions`` for the pairs diffusers really uses.
    Rounding follows numpy (half to even), as diffusers does.
    """
    import numpy as np

    check_int("T", T, lo=1)  # number of DDPM steps
    check_int("n_steps", n_steps, lo=1, hi=T, hi_name="T")
    if spacing == "linspace":
        k = np.linspace(0, T - 1, n_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        k = (np.arange(0, n_steps) * (T // n_steps)).round()[::-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        k = np.round(np.arange(T, 0, -T / n_steps)).astype(np.int64) - 1
    else:
        check_choice("spacing", spacing, ("linspace", "leading", "trailing"))
    if k.max() > T - 1 or k.min() < 0:
        raise ValueError(f"steps_offset={steps_offset!r} puts timesteps outside 0..T-1={T - 1}")
    ts = torch.cat([torch.as_tensor(k.copy() + 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return torch.unique_consecutive(ts)

def rho_grid(t_start: float, t_end: float, n_steps: int, rho: float = 7.0, dtype=torch.float64) -> Tensor:
    """EDM's rho spacing (Karras et al. 2022, Eq. 5; SIM Eq. B.8): ``n_steps + 1`` times from ``t_start`` to ``t_end``,

    ``t_i = (t_start^(1/rho) + i/n (t_end^(1/rho) - t_start^(1/rho)))^rho``, i = 0..n, with exact end points (the
    power can land one ulp outside). Either direction; ``t_end`` may be 0. Callers validate their arguments.
    """
    ramp = torch.linspace(0, 1, n_steps + 1, dtype=dtype)
    inv = 1.0 / rho
    a, b = t_start ** inv, t_end ** inv
    g = (a + ramp * (b - a)) ** rho
    g[0], g[-1] = t_start, t_end
    return g

def karras_sigmas(n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  append_zero: bool = True, dtype=torch.float64) -> Tensor:
    """EDM (Karras et al. 2022) noise levels ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    check_int("n_steps", n_steps, lo=2)
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive(name, v)  # EDM: sigma_min=0.002, sigma_max=80, rho=7
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r} "
                         "(the grid runs from sigma_max down to sigma_min)")
    s = rho_grid(sigma_max, sigma_min, n_steps - 1, rho, dtype)
    return torch.cat([s, torch.zeros(1, dtype=dtype)]) if append_zero else s

def logsnr_grid(process: Process, n_steps: int, t_start: float | None = None, t_end: float | None = None) -> Tensor:
    """``n_steps + 1`` times uniform in ``lambda = log(alpha/sigma)`` (Lu et al.'s DPM-Solver grid).

    ``t_start`` defaults to t_max and ``t_end`` to t_min; both must have alpha > 0 and sigma > 0.
    """
    check_int("n_steps", n_steps, lo=1)
    t0 = process.t_max if t_start is None else float(t_start)
    t1 = process.t_min if t_end is None else float(t_end)
    l0, l1 = log_snr(process, t0), log_snr(process, t1)
    if not (torch.isfinite(l0) and torch.isfinite(l1)):
        raise ValueError(f"t_start={t0:g}, t_end={t1:g}: lambda must be finite at both ends (alpha > 0 and sigma > 0); "
                         f"got lambda = {float(l0):g}, {float(l1):g}")
    lams = torch.linspace(float(l0), float(l1), n_steps + 1, dtype=torch.float64)
    ts = time_from_log_snr(process, lams, t1, t0)
    ts[0], ts[-1] = t0, t1
    return check_timesteps(ts, process)

def trigflow_timesteps(n_steps: int, t_max: float = math.pi / 2) -> Tensor:
    """``linspace(t_max, 0, n_steps + 1)`` in float64 (diffusers' SCMScheduler grid, with ``t_max = pi/2``)."""
    check_int("n_steps", n_steps, lo=1)
    if not 0 < t_max <= math.pi / 2:
        raise ValueError(f"t_max={t_max!r} must lie in (0, pi/2]")
    ts = torch.linspace(t_max, 0.0, n_steps + 1, dtype=torch.float64).clamp(0.0, t_max)
    ts[0], ts[-1] = t_max, 0.0          # linspace may round the end points by one ulp (outside the domain)
    return ts

def flow_match_timesteps(n_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` sigmas (= rectified-flow times), float64, ending at 0.

    ``sigma_min = shift(1 / T)`` (the scheduler shifts its training grid once at construction), then
    ``shift(linspace(1, sigma_min, n_steps))`` with ``shift(s) = k s / (1 + (k - 1) s)``, then 0. diffusers
    stores these in float32; its timesteps are ``T * sigma``.
    """
    check_int("n_steps", n_steps, lo=1)
    check_int("num_train_timesteps", num_train_timesteps, lo=1)
    if not float(shift) > 0:
        raise ValueError(f"shift={shift!r} must be positive")
    k = float(shift)

    def shifted(s):
        return k * s / (1 + (k - 1) * s)

    s_min = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    s = shifted(torch.linspace(1.0, float(s_min), n_steps, dtype=torch.float64))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])

def lcm_timesteps(n_steps: int, original_steps: int = 50, T: int = 1000) -> Tensor:
    """LCM's inference grid in handbook time, ending at 0 (diffusers ``LCMScheduler.set_timesteps`` + 1).

    LCM distils on the ``original_steps`` grid ``k = (T // original_steps) * j - 1`` (j = 1..original_steps);
    ``n_steps`` entries are taken at indices ``floor(linspace(0, original_steps, n_steps, endpoint=False))``
    of that grid reversed. E.g. ``n_steps=4``: diffusers ``[999, 759, 499, 259]`` -> ``[1000, 760, 500, 260, 0]``.
    """
    for name, v in (("n_steps", n_steps), ("original_steps", original_steps), ("T", T)):
        check_int(name, v, lo=1)
    if original_steps > T:
        raise ValueError(f"original_steps={original_steps} must be <= T={T}")
    if n_steps > original_steps:
        raise ValueError(f"n_steps={n_steps} must be <= original_steps={original_steps}")
    k = T // original_steps
    origin = (torch.arange(1, original_steps + 1, dtype=torch.float64) * k - 1).flip(0)
    idx = torch.floor(torch.arange(n_steps, dtype=torch.float64) * (original_steps / n_steps)).long()
    return torch.cat([origin[idx] + 1, torch.zeros(1, dtype=torch.float64)])

# ---- inverse time maps ----------------------------------------------------------------------------------------
def t_from_edm_sigma(process: Process, s) -> Tensor:
    """The time of ``process`` whose EDM noise level ``sigma(t)/alpha(t)`` is ``s`` (``Process.t_from_edm_sigma``)."""
    return process.t_from_edm_sigma(s)

def log_snr(process: Process, t) -> Tensor:
    """``lambda(t) = log(alpha(t) / sigma(t))`` (half the log-SNR), decreasing in t."""
    t = process.check_t(t)
    return torch.log(process.alpha(t)) - torch.log(process.sigma(t))

def time_from_log_snr(process: Process, lam, t_lo=None, t_hi=None) -> Tensor:
    """Inverse of ``log_snr``: the time with ``lambda(t) = lam`` (float64), i.e. ``t_from_edm_sigma(exp(-lam))``.

    ``lambda = log(alpha/sigma)`` and the EDM noise level is ``sigma/alpha = exp(-lambda)``, so each process's
    closed-form inverse applies (``Process.t_from_edm_sigma``). ``t_lo``, ``t_hi`` (optional) clamp the result
    to a bracket (e.g. the two ends of a DPM-Solver step).
    """
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if torch.isnan(lam).any():
        raise ValueError(f"lam={lam.flatten().tolist()[:4]} contains NaN; allowed: log-SNR values lambda = log(alpha/sigma)")
    t = process.t_from_edm_sigma(torch.exp(-lam))
    if t_lo is not None or t_hi is not None:
        lo = process.t_min if t_lo is None else float(t_lo)
        hi = process.t_max if t_hi is None else float(t_hi)
        if not lo <= hi:
            raise ValueError(f"t_lo={lo:g} must not exceed t_hi={hi:g}")
        t = t.clamp(lo, hi)
    return t

# ---- time distributions --------------------------------------------------------------------------------------
#: names accepted by ``sample_t`` / ``t_sampler``
T_SAMPLERS = ("uniform", "discrete", "edm_lognormal", "lognormal", "logit_normal")

def _open_uniform(n: int, generator, dtype, device) -> Tensor:
    """Uniform in the open interval (0, 1): (k + 1/2) / 2^53, so no end point is ever hit."""
    k = torch.randint(0, 2 ** 53, (n,), generator=generator, dtype=torch.int64, device=device)
    return ((k.to(torch.float64) + 0.5) / 2.0 ** 53).to(dtype)

def lognormal_edm_sigma(n: int, P_mean: float, P_std: float, generator: torch.Generator | None = None,
                        device=None) -> Tensor:
    """``n`` EDM noise levels with ``ln sigma ~ N(P_mean, P_std^2)`` (Karras et al. 2022; SIM Eq. B.5-B.6, B.9-B.10),
    float64: the one log-normal draw of the library."""
    return torch.exp(P_mean + P_std * torch.randn(n, generator=generator, dtype=torch.float64, device=device))


def edm_sigma_range(process: Process) -> tuple[float, float]:
    """``(edm_sigma(t_min), edm_sigma(t_max))``: the whole EDM noise-level range of ``process``."""
    return process.edm_sigma(process.t_min).item(), process.edm_sigma(process.t_max).item()


def lognormal_times(process: Process, n: int, P_mean: float, P_std: float, *, sigma_min: float | None = None,
                    sigma_max: float | None = None, generator: torch.Generator | None = None, device=None) -> Tensor:
    """``n`` times of ``process`` whose EDM levels are ``lognormal_edm_sigma`` clamped to ``[sigma_min, sigma_max]``
    (default the process's range, ``edm_sigma_range``), mapped by ``t_from_edm_sigma`` (float64, on the CPU)."""
    p_lo, p_hi = edm_sigma_range(process)
    lo = p_lo if sigma_min is None else float(sigma_min)
    hi = p_hi if sigma_max is None else float(sigma_max)
    s = lognormal_edm_sigma(n, P_mean, P_std, generator, device)
    return t_from_edm_sigma(process, s.clamp(lo, hi).cpu())

def sample_t(process: Process, n: int, kind: str | None = None, *, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float64, device=None, **params) -> Tensor:
    """``n`` training times of ``process`` (handbook Sec. 3.1: ``t ~ U[T]`` or a continuous proposal).

    kinds (default: ``discrete`` for DDPM, ``uniform`` otherwise):

    * ``uniform``: ``U(lo, hi)`` on the open interval, default the whole domain ``(t_min, t_max)``;
    * ``discrete``: DDPM integers uniform in ``{lo, ..., hi}``, default ``{1, ..., T}`` (handbook ``t in [T]``);
    * ``edm_lognormal``: ``ln sigma ~ N(P_mean, P_std^2)`` for the EDM noise level
      ``sigma = sigma(t)/alpha(t)`` (Karras et al. 2022, default P_mean=-1.2, P_std=1.2), mapped to the
      process's own time with ``t_from_edm_sigma`` and clamped to its range;
    * ``lognormal``: the same mechanism with required ``P_mean``, ``P_std`` (e.g. the generator time
      distribution of SIM / SiD experiments);
    * ``logit_normal``: ``t = lo + (hi - lo) sigmoid(m + s z)`` (Esser et al. 2024 for rectified flow;
      default m=0, s=1).
    """
    check_int("n", n, lo=1)  # number of times
    if kind is None:
        kind = "discrete" if process.discrete else "uniform"
    allowed = {"uniform": ("lo", "hi"), "discrete": ("lo", "hi"), "edm_lognormal": ("P_mean", "P_std"),
               "lognormal": ("P_mean", "P_std"), "logit_normal": ("m", "s", "lo", "hi")}
    check_choice("t_sampler kind", kind, allowed)
    extra = set(params) - set(allowed[kind])
    if extra:
        raise ValueError(f"t_sampler {kind!r} got unknown parameters {sorted(extra)}; allowed: {list(allowed[kind])}")
    if kind == "discrete":
        if not process.discrete:
            raise ValueError(f"t_sampler 'discrete' needs a discrete process (DDPM), got {process}; "
                             "use 'uniform' for continuous time")
        lo, hi = int(params.get("lo", 1)), int(params.get("hi", process.T))
        if not 0 <= lo <= hi <= process.T:
            raise ValueError(f"discrete times need 0 <= lo <= hi <= T={process.T}, got lo={lo}, hi={hi}")
        t = torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
        return t.to(dtype)
    if kind in ("uniform", "logit_normal"):
        lo = float(params.get("lo", process.t_min))
        hi = float(params.get("hi", process.t_max))
        if not process.t_min <= lo < hi <= process.t_max:
            raise ValueError(f"need t_min={process.t_min:g} <= lo < hi <= t_max={process.t_max:g}, "
                             f"got lo={lo:g}, hi={hi:g}")
        if kind == "uniform":
            u = _open_uniform(n, generator, torch.float64, device)
        else:
            m, s = float(params.get("m", 0.0)), float(params.get("s", 1.0))
            if not s > 0:
                raise ValueError(f"logit_normal s={s} must be positive")
            u = torch.sigmoid(m + s * torch.randn(n, generator=generator, dtype=torch.float64, device=device))
        return (lo + (hi - lo) * u).to(dtype)
    # log-normal EDM noise levels
    if kind == "edm_lognormal":
        P_mean, P_std = float(params.get("P_mean", -1.2)), float(params.get("P_std", 1.2))
    else:
        if "P_mean" not in params or "P_std" not in params:
            raise ValueError("t_sampler 'lognormal' needs P_mean and P_std (ln sigma ~ N(P_mean, P_std^2))")
        P_mean, P_std = float(params["P_mean"]), float(params["P_std"])
    if not P_std > 0:
        raise ValueError(f"P_std={P_std} must be positive")
    return lognormal_times(process, n, P_mean, P_std, generator=generator, device=device).to(dtype=dtype, device=device)

def make_t_sampler(process: Process, kind: str | None = None, **params) -> Callable[[int, torch.Generator], Tensor]:
    """A callable ``(n, generator) -> t`` of shape ``(n,)`` (float64) for ``sample_t(process, n, kind, **params)``."""
    sample_t(process, 1, kind, generator=torch.Generator().manual_seed(0), **params)  # validate now, not mid-training

    def sampler(n: int, generator: torch.Generator | None = None) -> Tensor:
        return sample_t(process, n, kind, generator=generator, **params)
    return sampler

def _lognormal_sampler(process: Process, P_mean: float, P_std: float, sigma_min: float | None,
                       sigma_max: float | None) -> Callable[[int, torch.Generator], Tensor]:
    check_positive("P_std", P_std, finite=False)
    p_lo, p_hi = edm_sigma_range(process)
    lo = p_lo if sigma_min is None else float(sigma_min)
    hi = p_hi if sigma_max is None else float(sigma_max)
    if not (p_lo <= lo < hi <= p_hi):
        raise ValueError(f"need edm_sigma(t_min)={p_lo:g} <= sigma_min < sigma_max <= edm_sigma(t_max)={p_hi:g}, "
                         f"got sigma_min={lo:g}, sigma_max={hi:g}")

    def sampler(n: int, generator: torch.Generator | None = None) -> Tensor:
        check_int("n", n, lo=1)
        return lognormal_times(process, n, P_mean, P_std, sigma_min=lo, sigma_max=hi, generator=generator)
    return sampler

def p_edm(process: Process, P_mean: float = -1.2, P_std: float = 1.2, *, sigma_min: float | None = None,
          sigma_max: float | None = None) -> Callable[[int, torch.Generator], Tensor]:
    """EDM's log-normal ``ln sigma ~ N(-1.2, 1.2^2)`` (SIM Eq. B.5-B.6), in ``process``'s time (for the fake score).

    ``sigma`` is the EDM noise level ``sigma(t)/alpha(t)``, clamped to ``[sigma_min, sigma_max]`` (default:
    the process's whole range), then mapped to the process's time with ``t_from_edm_sigma``.
    """
    return _lognormal_sampler(process, P_mean, P_std, sigma_min, sigma_max)

def p_sim(process: Process, P_mean: float = -3.5, P_std: float = 2.5, *, sigma_min: float | None = None,
          sigma_max: float | None = None) -> Callable[[int, torch.Generator], Tensor]:
    """SIM's generator time distribution ``ln sigma ~ N(-3.5, 2.5^2)`` (SIM Eq. B.9-B.10), in ``process``'s time.

    Noise levels are clamped to ``[sigma_min, sigma_max]`` (default the process's range). Losses that divide
    by a per-sample scale (SiD's ``mean |x0 - D_q|``) or work in score space (scores ~ 1/sigma^2) need a
    positive ``sigma_min`` (EDM uses 0.002).
    """
    return _lognormal_sampler(process, P_mean, P_std, sigma_min, sigma_max)

def karras_sigma_grid(K: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """``sigma_k = (sigma_max^(1/rho) + k/(K-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, k = 0..K-1 (SIM Eq. B.8)."""
    check_int("K", K, lo=2)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    check_positive("rho", rho)  # EDM uses 7
    return rho_grid(sigma_max, sigma_min, K - 1, rho)

def p_sid(process: Process, k_max: int = 800, K: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
          rho: float = 7.0, from_end: str = "max", *, clamp: tuple[float, float] | None = None) -> Callable[[int, torch.Generator], Tensor]:
    """SiD's discrete generator time distribution (SIM Eq. B.8): ``k ~ U{0..k_max}``, ``t = sigma_k`` of the grid.

    ``from_end="max"`` indexes the grid as printed (``k = 0`` is ``sigma_max``: sigma in [0.085, 80] for
    the defaults); ``"min"`` counts from ``sigma_min`` (sigma in [0.002, 24.5]; the project's reference notes say
    the public SiD code limits sigma to <= 24.4, i.e. this end of the grid). Levels beyond the process's range are clamped,
    and to ``clamp=(lo, hi)`` when given (a run's noise-level range, e.g. ``scaled_runs``).
    """
    check_choice("from_end", from_end, ("max", "min"))  # max: as printed in Eq. B.8
    check_int("k_max", k_max, lo=0, hi=K - 1, hi_name="K-1")
    grid = karras_sigma_grid(K, sigma_min, sigma_max, rho)
    if from_end == "min":
        grid = grid.flip(0)
    lo, hi = edm_sigma_range(process)
    times = t_from_edm_sigma(process, grid.clamp(lo, hi))
    if clamp is not None:
        times = times.clamp(*(float(t_from_edm_sigma(process, s)) for s in clamp))

    def sampler(n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.randint(0, k_max + 1, (n,), generator=generator)
        return times[k]
    return sampler
