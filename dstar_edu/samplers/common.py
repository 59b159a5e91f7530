"""What every sampler shares: validated time grids and one loop with a progress bar and a trajectory.

A sampler is ``fn(predictor, timesteps, x_init, *, generator=None, cond=None, return_trajectory=False,
progress=False, **options)``: ``timesteps`` is a strictly decreasing sequence of times of the
predictor's process (from noise towards data; the last entry is where sampling stops, e.g. 0), and
the result is the final sample, or ``(sample, trajectory)`` with ``trajectory = [x_init, ..., sample]``.
The private ``_check_*`` / ``_scalar_t`` / ``_draw_noise`` helpers are the argument checks the sampler modules
share (the batch check, shared with the objectives, is ``dstar_edu.validation.check_batch``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..process import Process
from ..validation import check_choice, check_int, check_positive, check_shape, check_type

Tensor = torch.Tensor

__all__ = ["check_timesteps", "run_loop", "uniform_grid", "karras_sigmas", "subsequence"]


# ---- argument checks shared by the samplers (internal) ----------------------------------------------------
def _check_predictor(predictor) -> Process:
    process = getattr(predictor, "process", None)
    if not isinstance(process, Process):
        raise ValueError(f"predictor={type(predictor).__name__} has no dstar_edu process (predictor.process="
                         f"{process!r}); allowed: a Predictor whose .process is a dstar_edu Process")
    if not hasattr(predictor, "prediction"):
        raise ValueError(f"predictor={type(predictor).__name__} does not declare .prediction")
    return process


def _check_generator(generator):
    check_type("generator", generator, (torch.Generator, None), "a torch.Generator or None")
    return generator


def _scalar_t(t, name: str = "t") -> float:
    """A scalar time as a Python float (never through float32: ``torch.as_tensor(0.1)`` would round it)."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    tt = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
    if tt.numel() != 1:
        raise ValueError(f"{name} must be a scalar time for a sampler step, got shape {tuple(tt.shape)}")
    return float(tt)


def _draw_noise(noise, x: Tensor, generator, noise_dtype=None) -> Tensor:
    """``noise`` if given (checked against x), else N(0, I) drawn from ``generator``.

    ``noise_dtype``: dtype in which to draw (default ``x.dtype``) before casting to ``x.dtype``. The same
    call as diffusers' ``randn_tensor`` on CPU, so equal seeds give equal noise.
    """
    if noise is not None:
        check_shape("noise", noise, x.shape, "the shape of the sample x")
        return noise.to(x.dtype)
    z = torch.randn(x.shape, generator=generator, dtype=noise_dtype or x.dtype, device=x.device)
    return z.to(x.dtype)


# ---- time grids and the sampling loop ---------------------------------------------------------------------
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


def run_loop(step: Callable[[Tensor, Tensor, Tensor, int], Tensor], timesteps: Tensor, x_init: Tensor,
             return_trajectory: bool = False, progress: bool = False, desc: str = "sampling"):
    """Apply ``x <- step(x, t_cur, t_next, i)`` over consecutive pairs of ``timesteps``."""
    x, traj = x_init, [x_init]
    pairs = range(len(timesteps) - 1)
    if progress:
        from tqdm.auto import tqdm
        pairs = tqdm(pairs, desc=desc, leave=False)
    for i in pairs:
        x = step(x, timesteps[i], timesteps[i + 1], i)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{desc}: non-finite values after step {i} (t={timesteps[i].item():g} -> "
                                     f"{timesteps[i + 1].item():g}); check the predictor and the time grid")
        if return_trajectory:
            traj.append(x)
    return (x, traj) if return_trajectory else x


def uniform_grid(process: Process, n_steps: int, t_start: float | None = None, t_end: float | None = None,
                 dtype=torch.float64) -> Tensor:
    """``n_steps + 1`` equally spaced times from ``t_start`` (default t_max) down to ``t_end`` (default t_min)."""
    check_int("n_steps", n_steps, lo=1)
    t0 = process.t_max if t_start is None else t_start
    t1 = process.t_min if t_end is None else t_end
    return check_timesteps(torch.linspace(t0, t1, n_steps + 1, dtype=dtype), process)


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


def karras_sigmas(n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  append_zero: bool = True, dtype=torch.float64) -> Tensor:
    """EDM (Karras et al. 2022) noise levels ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    check_int("n_steps", n_steps, lo=2)
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive(name, v)  # EDM: sigma_min=0.002, sigma_max=80, rho=7
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r} "
                         "(the grid runs from sigma_max down to sigma_min)")
    ramp = torch.linspace(0, 1, n_steps, dtype=dtype)
    inv = 1.0 / rho
    s = (sigma_max ** inv + ramp * (sigma_min ** inv - sigma_max ** inv)) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # exact end points (the power can land one ulp outside)
    return torch.cat([s, torch.zeros(1, dtype=dtype)]) if append_zero else s


