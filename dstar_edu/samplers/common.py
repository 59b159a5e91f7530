"""What every sampler shares: one loop with a progress bar and a trajectory.

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
from ..times import check_timesteps, karras_sigmas, subsequence, uniform_grid  # noqa: F401  (re-exported)
from ..validation import check_shape, check_type

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
