"""Argument checks shared by the samplers and the objectives; each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["check_batch"]


def check_batch(x, name: str, *, nonempty: bool = False) -> Tensor:
    """``x`` itself if it is a floating tensor of shape ``(batch, *shape)`` (with ``batch >= 1`` if ``nonempty``)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or (nonempty and x.shape[0] < 1):
        got = type(x).__name__ + (f" of dtype {x.dtype}, shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
        raise ValueError(f"{name} must be a floating tensor of shape (batch, *shape), got {got}")
    return x
