"""Predictors: denoisers ``(x_t, t, cond=None) -> tensor`` that declare what they predict and for which process.

The model contract (DESIGN.md, block 2)::

    out = predictor(x_t, t, cond)          # x_t: (batch, *shape); t: scalar or (batch,)
    predictor.prediction                   # one of conversions.PREDICTIONS, e.g. "eps"
    predictor.process                      # the Process whose time t means
    predictor.predict("score", x_t, t)     # any other quantity, through conversions.convert
    predictor.denoise(x_t, t, cond)        # (x0_hat, eps_hat): one evaluation (handbook Eq. 7, Sec. 2.6)

Exact models (Gaussian mixtures, empirical point sets in ``toy_data.mixtures``), the 2D MLP below and
wrapped diffusers networks all satisfy it, so a theorem check or a loss never knows which it holds.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .conversions import check_prediction, convert, to_x0_eps
from .process import Coefficients, Process

Tensor = torch.Tensor

__all__ = ["Predictor", "FunctionPredictor", "MLPPredictor", "sinusoidal_embedding"]


class Predictor(nn.Module):
    """Base class. Subclasses implement ``forward(x_t, t, cond=None)`` returning ``self.prediction``."""

    def __init__(self, process: Process, prediction: str):
        super().__init__()
        if not isinstance(process, Process):
            raise TypeError(f"process must be a dstar_edu Process, got {type(process).__name__}")
        self.process = process
        self.prediction = check_prediction(prediction)

    def predict(self, target: str, x_t: Tensor, t, cond=None) -> Tensor:
        """Ask for any quantity (``eps``, ``x0``, ``score``, ``velocity``, ``v``, ...)."""
        check_prediction(target, "target")
        return convert(self(x_t, t, cond), self.prediction, target, x_t, t, self.process)

    def denoise(self, x_t: Tensor, t, cond=None, *, coefs: Coefficients | None = None) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` from one evaluation (handbook Eq. 7 and the Sec. 2.6 conversions).

        ``t`` is a scalar or one time per sample; ``coefs`` is ``process.at(t, x_t)`` when the caller has it.
        Exact models override this with their closed forms (``toy_data.mixtures``).
        """
        return to_x0_eps(self.prediction, self(x_t, t, cond), x_t, t, self.process, coefs=coefs)


class FunctionPredictor(Predictor):
    """Wrap a plain function ``fn(x_t, t, cond) -> tensor`` as a predictor."""

    def __init__(self, fn, process: Process, prediction: str):
        super().__init__(process, prediction)
        self.fn = fn

    def forward(self, x_t, t, cond=None):
        return self.fn(x_t, t, cond)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style sinusoidal features of a (batch,) time vector, shape (batch, dim)."""
    if dim % 2:
        raise ValueError(f"dim={dim} must be even")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPPredictor(Predictor):
    """Small time-conditioned MLP for points in R^dim (2D teaching experiments).

    Time enters as sinusoidal features of ``1000 * t / t_max`` (so every process sees the same range);
    an optional class label (``num_classes``) is embedded and added, with label ``num_classes`` meaning
    "unconditional" (for classifier-free guidance).
    """

    def __init__(self, process: Process, prediction: str = "eps", dim: int = 2, hidden: int = 128,
                 depth: int = 3, time_dim: int = 64, num_classes: int | None = None):
        super().__init__(process, prediction)
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden, depth must be positive, got {dim}, {hidden}, {depth}")
        self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; this MLP expects (batch, {self.dim})")
        dtype = self.inp.weight.dtype
        if x_t.dtype != dtype:
            raise ValueError(f"x_t has dtype {x_t.dtype} but this MLP's weights are {dtype}: cast one of them "
                             f"(x_t.to({dtype}) or model.to({x_t.dtype}))")
        t = self.process.check_t(t, x_t)                                   # float64 time (issue 13)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = sinusoidal_embedding(1000.0 * t / self.process.t_max, self.time_dim).to(dtype)
        h = self.inp(x_t) + self.time_mlp(emb)
        if self.class_emb is not None:
            labels = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device, dtype=torch.long) \
                if cond is None else torch.as_tensor(cond, device=x_t.device).long()
            h = h + self.class_emb(labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
