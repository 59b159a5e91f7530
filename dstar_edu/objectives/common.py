"""What the objectives share: the noisy batch, per-sample weights, reductions and time/argument checks (public).

A loss draws (or takes) times ``t`` (``draw_times``, ``batch_times``), forms the noisy batch ``x_t = alpha x0 +
sigma eps`` (handbook Eq. 6; ``noisy_batch`` -> ``NoisyBatch(x0, eps, t, x_t)``), weights each sample
(``sample_weight``; the named diffusion weightings are ``pretrain.loss_weight``) and reduces (``reduce_loss``:
mean / sum / none, raising ``FloatingPointError`` on NaN or inf with a hint). Time distributions live in
``dstar_edu.times``; argument checks shared with the samplers in ``dstar_edu.validation``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..process import Process
from ..times import T_SAMPLERS, sample_t
from ..validation import check_choice, check_shape

Tensor = torch.Tensor

__all__ = ["REDUCTIONS", "PRETRAIN_HINT", "DISTILL_HINT", "reduce_loss", "check_process", "batch_times",
           "draw_times", "NoisyBatch", "noisy_batch", "sample_weight"]


@dataclass(frozen=True)
class NoisyBatch:
    """A noisy training batch (handbook Eq. 6): clean ``x0``, noise ``eps``, times ``t`` (``(batch,)``, float64)
    and ``x_t = alpha(t) x0 + sigma(t) eps``."""

    x0: Tensor
    eps: Tensor
    t: Tensor
    x_t: Tensor


#: names accepted by ``reduction``
REDUCTIONS = ("mean", "sum", "none")


PRETRAIN_HINT = ("check the predictor's output, the time range (e.g. sigma(t) = 0 or alpha(t) = 0 at an end of "
                  "the domain) and the learning rate")
DISTILL_HINT = ("check the time range (sigma(t) -> 0 blows scores up), the networks' outputs and the learning "
                 "rate")


def reduce_loss(per_sample: Tensor, reduction: str, what: str, hint: str = PRETRAIN_HINT) -> Tensor:
    """Mean / sum / per-sample reduction that raises ``FloatingPointError`` (with ``hint``) on NaN or inf."""
    check_choice("reduction", reduction, REDUCTIONS)
    out = per_sample.mean() if reduction == "mean" else per_sample.sum() if reduction == "sum" else per_sample
    if not bool(torch.isfinite(out.detach()).all()):
        bad = per_sample.detach()
        n_bad = int((~torch.isfinite(bad)).sum())
        raise FloatingPointError(f"{what} is not finite ({n_bad} of {bad.numel()} per-sample values are NaN/inf); "
                                 f"{hint}")
    return out


def check_process(predictor, kind, loss: str) -> Process:
    process = getattr(predictor, "process", None)
    if not isinstance(process, Process):
        raise ValueError(f"{loss} needs a predictor with a .process (a dstar_edu Process), got "
                         f"{type(predictor).__name__} with process={process!r}")
    if kind is not None and not isinstance(process, kind):
        raise ValueError(f"{loss} is defined for the {kind.__name__} process, but predictor.process={process}")
    return process


def batch_times(process: Process, t, x0: Tensor) -> Tensor:
    """Explicit times (scalar or (batch,)) validated against the process and expanded to (batch,)."""
    t = process.check_t(t, x0)
    return t.expand(x0.shape[0]).clone() if t.ndim == 0 else t


def draw_times(process: Process, x0: Tensor, t, t_sampler, generator) -> Tensor:
    if t is not None:
        if t_sampler is not None:
            raise ValueError("give either t (explicit times) or t_sampler, not both")
        return batch_times(process, t, x0)
    B = x0.shape[0]
    if t_sampler is None or isinstance(t_sampler, str):
        kind = t_sampler or ("discrete" if process.discrete else "uniform")
        t = sample_t(process, B, kind, generator=generator)
        if kind != "discrete":
            return _inside(process, t.to(device=x0.device), x0)
    elif callable(t_sampler):
        t = torch.as_tensor(t_sampler(B, generator))
        if t.shape != (B,):
            raise ValueError(f"t_sampler returned shape {tuple(t.shape)}; it must return ({B},) times")
    else:
        raise ValueError(f"t_sampler={t_sampler!r} must be None, one of {T_SAMPLERS} or a callable (n, generator) -> t")
    return batch_times(process, t.to(device=x0.device), x0)


def _inside(process: Process, t: Tensor, x0: Tensor) -> Tensor:
    """Continuous samples cast to x0's dtype, kept strictly inside the domain after rounding.

    A float32 cast can round a time onto an end point (rectified flow's ``t = 1`` where alpha = 0) or
    past it (float32(pi/2) > pi/2 for TrigFlow); such samples move to the nearest representable time
    inside the open domain.
    """
    dtype = torch.float64                 # time stays float64 whatever x0's dtype (issue 13)
    lo = torch.tensor(process.t_min, dtype=dtype)
    hi = torch.tensor(process.t_max, dtype=dtype)
    while float(lo) <= process.t_min:
        lo = torch.nextafter(lo, torch.tensor(math.inf, dtype=dtype))
    while float(hi) >= process.t_max:
        hi = torch.nextafter(hi, torch.tensor(-math.inf, dtype=dtype))
    t = t.to(dtype).clamp(lo.item(), hi.item())
    return batch_times(process, t, x0)


def noisy_batch(x0: Tensor, process: Process, t, eps=None, generator: torch.Generator | None = None) -> NoisyBatch:
    """``x_t = alpha x0 + sigma eps`` at the given times (handbook Eq. 6), carrying x0's gradient: a ``NoisyBatch``.

    ``t``: scalar or ``(batch,)`` with ``sigma(t) > 0`` (required; expanded to ``(batch,)``); ``eps``: drawn from
    ``generator`` when None.
    """
    if t is None:
        raise ValueError("t is required: pass the (batch,) times (e.g. from p_sim(process)(n, generator))")
    t = process.check_t(t, x0)
    t = t.expand(x0.shape[0]).clone() if t.ndim == 0 else t
    if bool((process.at(t).sigma <= 0).any()):
        raise ValueError(f"t has values where sigma(t) = 0 (t_min={process.t_min:g}); score distillation needs "
                         "sigma(t) > 0: draw t strictly inside the domain")
    if eps is not None:
        check_shape("eps", eps, x0.shape, "it must match x0")
    x_t, eps = process.q_sample(x0, t, eps=eps, generator=generator)
    return NoisyBatch(x0, eps, t, x_t)


def sample_weight(weight, t: Tensor, B: int, dtype, name: str = "weight") -> Tensor:
    """Per-sample ``w(t)`` from None (1), a number, a ``(B,)`` tensor or a callable ``w(t)``."""
    if weight is None:
        return torch.ones(B, dtype=dtype, device=t.device)
    if callable(weight):
        weight = weight(t)
    w = torch.as_tensor(weight, dtype=dtype, device=t.device)
    if w.ndim == 0:
        w = w.expand(B)
    if tuple(w.shape) != (B,):
        raise ValueError(f"{name} has shape {tuple(w.shape)}; allowed: None, a number, a ({B},) tensor or a "
                         "callable w(t) -> (batch,)")
    return w.detach()
