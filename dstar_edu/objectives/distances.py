"""Per-sample distances ``d(x, y)`` between two batches, used by consistency losses (handbook Sec. 2.3.1, Eq. 20, 25).

Not to be confused with ``divergences`` (``DISTANCES`` / ``get_distance``: SIM's score distances ``d(y)`` of one
score difference); these are ``PAIR_DISTANCES`` / ``get_pair_distance``.

Every function takes two tensors of the same shape ``(batch, *shape)`` and returns one value per
sample, shape ``(batch,)``, reducing over all non-batch dimensions, so 2D points and 3x32x32 images
go through the same code.

* ``l2``: ``d(x, y) = ||x - y||_2^2`` (the handbook's l2 loss; squared, summed over dimensions).
* ``pseudo_huber``: ``d(x, y) = sqrt(||x - y||_2^2 + c^2) - c`` with ``c > 0`` (Song & Dhariwal 2023,
  quoted in handbook Sec. 2.3.1). For ``||x - y|| << c`` it is ``||x - y||^2 / (2c)``; for
  ``||x - y|| >> c`` it is ``||x - y|| - c``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..validation import check_choice, check_positive

Tensor = torch.Tensor

__all__ = ["l2", "pseudo_huber", "get_pair_distance", "PAIR_DISTANCES", "squared_norm"]


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but y has shape {tuple(y.shape)}; "
                         "a distance needs two tensors of the same shape (batch, *shape)")
    if x.ndim < 1:
        raise ValueError("x and y must have a batch dimension: shape (batch, *shape), got a 0-d tensor")


def squared_norm(x: Tensor) -> Tensor:
    """``||x_i||_2^2`` per sample: sum of squares over all non-batch dimensions, shape ``(batch,)``."""
    return (x * x).reshape(x.shape[0], -1).sum(1)


def l2(x: Tensor, y: Tensor) -> Tensor:
    """Squared l2 distance per sample, ``||x - y||_2^2`` (handbook Sec. 2.3.1), shape ``(batch,)``."""
    _check_pair(x, y)
    return squared_norm(x - y)


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance per sample, ``sqrt(||x - y||_2^2 + c^2) - c`` (handbook Sec. 2.3.1).

    Computed as ``r / (sqrt(r + c^2) + c)`` with ``r = ||x - y||^2``, which is the same number without
    the cancellation of ``sqrt(r + c^2) - c`` when ``r << c^2`` (and has a finite gradient at r = 0).
    """
    _check_pair(x, y)
    check_positive("c", c)  # the pseudo-Huber constant
    r = squared_norm(x - y)
    return r / (torch.sqrt(r + c * c) + c)


PAIR_DISTANCES = {"l2": l2, "pseudo_huber": pseudo_huber}


def get_pair_distance(distance: str | Callable[[Tensor, Tensor], Tensor], c: float | None = None
                 ) -> Callable[[Tensor, Tensor], Tensor]:
    """Resolve ``distance`` (a name in ``PAIR_DISTANCES`` or a callable ``d(x, y) -> (batch,)``) to a function.

    ``pseudo_huber`` needs ``c``; for the other names ``c`` must be left as None.
    """
    if callable(distance):
        if c is not None:
            raise ValueError(f"c={c!r} was given together with a callable distance; "
                             "bind the constant inside the callable instead")
        return distance
    check_choice("distance", distance, sorted(PAIR_DISTANCES), also="a callable d(x, y)")
    if distance == "pseudo_huber":
        if c is None:
            raise ValueError("distance='pseudo_huber' needs the constant c > 0 (e.g. c=0.03 for 2D data, "
                             "0.00054 * sqrt(D) for D-dimensional images as in Song & Dhariwal 2023)")
        return lambda x, y: pseudo_huber(x, y, c)
    if c is not None:
        raise ValueError(f"c={c!r} is only used by distance='pseudo_huber', got distance={distance!r}")
    return PAIR_DISTANCES[distance]
