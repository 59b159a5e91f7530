"""Seeded 2D toy datasets for teaching diffusion models.

These are the standard 2D toy distributions of the diffusion and flow literature (8 Gaussians,
25-Gaussian grid, ring, two moons, swiss roll, checkerboard), scaled to roughly [-2, 2]^2.
Gaussian mixtures whose diffused marginals are known in closed form live in
``toy_data/mixtures.py``.

Every sampler has the signature ``f(n, generator=None, dtype=torch.float32) -> Tensor (n, 2)`` and
draws all randomness from ``generator`` (the global torch RNG when it is None), so the same
generator seed gives identical samples. Samples are drawn in float64 and then cast, so they agree
across dtypes up to rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dstar_edu.validation import check_choice, check_int

__all__ = [
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_STD",
    "GRID25_STD",
    "RING_RADIUS",
    "RING_STD",
    "TWO_MOONS_SCALE",
    "TWO_MOONS_STD",
    "SWISS_ROLL_SCALE",
    "SWISS_ROLL_STD",
    "eight_gaussians_means",
    "grid25_means",
    "checkerboard_dark_mask",
    "eight_gaussians",
    "grid25",
    "ring",
    "two_moons",
    "swiss_roll",
    "checkerboard",
    "DATASETS",
    "sample_dataset",
]

EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.1
GRID25_STD = 0.05
RING_RADIUS = 1.5
RING_STD = 0.05
TWO_MOONS_SCALE = 4.0 / 3.0  # maps the x-range [-1.5, 1.5] of the centred moons to [-2, 2]
TWO_MOONS_STD = 0.05
SWISS_ROLL_SCALE = 2.0 / (4.5 * math.pi)  # maps the largest radius 4.5*pi to 2
SWISS_ROLL_STD = 0.05

_F64 = torch.float64


def _check_n(n) -> int:
    return check_int("n", n, lo=1)


def _check_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype} must be a floating torch dtype (torch.float32, torch.float64, ...)")


def _randn(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(n, 2, generator=generator, dtype=_F64)


def eight_gaussians_means(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Means (8, 2) of the 8 Gaussians: radius 2 circle at angles 2*pi*k/8."""
    angles = 2 * math.pi * torch.arange(8, dtype=_F64) / 8
    means = EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
    return means.to(dtype)


def grid25_means(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Means (25, 2) of the 25-Gaussian grid {-2, -1, 0, 1, 2}^2 (row-major in x, then y)."""
    axis = torch.arange(-2, 3, dtype=_F64)
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).to(dtype)


def checkerboard_dark_mask(x: torch.Tensor) -> torch.Tensor:
    """Boolean mask (N,) of points of ``x`` (N, 2) lying on a dark square of the checkerboard.

    The board is 4x4 unit squares on [-2, 2]^2; square (i, j) with lower-left corner
    (-2 + i, -2 + j) is dark when i + j is even.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (N, 2), got {got}")
    idx = torch.floor(x.to(_F64) + 2.0)
    inside = ((idx >= 0) & (idx <= 3)).all(dim=1)
    return inside & ((idx[:, 0] + idx[:, 1]) % 2 == 0)


def _mixture(means: torch.Tensor, std: float, n: int, generator) -> torch.Tensor:
    k = torch.randint(len(means), (n,), generator=generator)
    return means[k] + std * _randn(n, generator)


def eight_gaussians(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples from the equal-weight mixture of 8 Gaussians (std 0.1) on a radius-2 circle."""
    n = _check_n(n)
    _check_dtype(dtype)
    return _mixture(eight_gaussians_means(), EIGHT_GAUSSIANS_STD, n, generator).to(dtype)


def grid25(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples from the equal-weight mixture of 25 Gaussians (std 0.05) on the grid {-2..2}^2."""
    n = _check_n(n)
    _check_dtype(dtype)
    return _mixture(grid25_means(), GRID25_STD, n, generator).to(dtype)


def ring(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples on a ring: uniform angle, radius 1.5 + N(0, 0.05^2)."""
    n = _check_n(n)
    _check_dtype(dtype)
    theta = 2 * math.pi * torch.rand(n, generator=generator, dtype=_F64)
    r = RING_RADIUS + RING_STD * torch.randn(n, generator=generator, dtype=_F64)
    return (r[:, None] * torch.stack([theta.cos(), theta.sin()], dim=1)).to(dtype)


def two_moons(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples from two interleaving half circles, centred at 0, scaled to x in [-2, 2], noise 0.05.

    The upper moon is (cos t, sin t), the lower one (1 - cos t, 1/2 - sin t), t ~ U(0, pi); both are
    shifted by (-1/2, -1/4) and scaled by 4/3. n // 2 points go to the upper moon, the rest to the
    lower one, in random order.
    """
    n = _check_n(n)
    _check_dtype(dtype)
    t = math.pi * torch.rand(n, generator=generator, dtype=_F64)
    lower = torch.randperm(n, generator=generator) >= n // 2
    x = torch.where(lower, 1.0 - t.cos(), t.cos()) - 0.5
    y = torch.where(lower, 0.5 - t.sin(), t.sin()) - 0.25
    clean = TWO_MOONS_SCALE * torch.stack([x, y], dim=1)
    return (clean + TWO_MOONS_STD * _randn(n, generator)).to(dtype)


def swiss_roll(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples from the 2D swiss roll (t cos t, t sin t), t ~ U(1.5pi, 4.5pi), scaled by 2/(4.5pi).

    Gaussian noise with std 0.05 is added after scaling, so the points lie in about [-2, 2]^2.
    """
    n = _check_n(n)
    _check_dtype(dtype)
    t = math.pi * (1.5 + 3.0 * torch.rand(n, generator=generator, dtype=_F64))
    clean = SWISS_ROLL_SCALE * torch.stack([t * t.cos(), t * t.sin()], dim=1)
    return (clean + SWISS_ROLL_STD * _randn(n, generator)).to(dtype)


def checkerboard(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """n samples, exactly uniform on the 8 dark squares of a 4x4 checkerboard on [-2, 2]^2.

    See :func:`checkerboard_dark_mask` for which squares are dark.
    """
    n = _check_n(n)
    _check_dtype(dtype)
    square = torch.randint(8, (n,), generator=generator)
    row = square // 2  # j = 0..3
    col = 2 * (square % 2) + row % 2  # i with i + j even
    corner = torch.stack([col, row], dim=1).to(_F64) - 2.0
    return (corner + torch.rand(n, 2, generator=generator, dtype=_F64)).to(dtype)


Sampler = Callable[..., torch.Tensor]

DATASETS: dict[str, Sampler] = {
    "eight_gaussians": eight_gaussians,
    "grid25": grid25,
    "ring": ring,
    "two_moons": two_moons,
    "swiss_roll": swiss_roll,
    "checkerboard": checkerboard,
}


def sample_dataset(
    name: str, n: int, generator: torch.Generator | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Draw n samples from the dataset registered under ``name`` in :data:`DATASETS`."""
    check_choice("name", name, sorted(DATASETS))
    return DATASETS[name](n, generator=generator, dtype=dtype)
