"""Sample-quality measures for 2D experiments: sliced Wasserstein with its noise floor, mode coverage."""
from __future__ import annotations

import torch

from .validation import check_int, check_positive, check_type

Tensor = torch.Tensor

__all__ = ["sliced_wasserstein", "sw_noise_floor", "mode_coverage"]


def _points(x, name: str) -> Tensor:
    """``x`` as float64 ``(n, d)`` points; raises naming ``name`` if empty, non-finite or not a tensor."""
    check_type(name, x, Tensor, "a tensor of shape (n, *shape)")
    if x.ndim < 1 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"{name} must have at least one sample of dimension >= 1, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf ({int((~torch.isfinite(x)).sum())} of {x.numel()} entries): "
                         "a distance to non-finite samples is undefined (drop or fix them first)")
    return x


def _positive_int(name: str, v, lo: int = 1) -> int:
    return check_int(name, v, lo=lo)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(E_theta W2^2(theta.x, theta.y))`` over random unit directions.

    Unequal sample sizes are compared through 512 matched quantiles of each projection. Raises
    ``ValueError`` on empty or non-finite samples (a NaN would otherwise come back as the distance).
    """
    n_projections = _positive_int("n_projections", n_projections)
    check_type("generator", generator, (torch.Generator, None), "a torch.Generator or None")
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but y has dimension {y.shape[1]}")
    theta = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = torch.sort(x @ theta, 0).values, torch.sort(y @ theta, 0).values
    if px.shape[0] != py.shape[0]:
        q = torch.linspace(0, 1, 512, dtype=torch.float64)
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def sw_noise_floor(sampler, n: int, repeats: int = 5, n_projections: int = 256, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of the sliced Wasserstein distance between two independent ``n``-samples
    of the same distribution (``sampler(n, generator)``): the value a perfect model would score.

    ``repeats >= 2``: with one repeat the standard deviation is undefined (it used to come back as 0, which
    turns any z-score against the floor infinite).
    """
    if not callable(sampler):
        raise ValueError(f"sampler={sampler!r} must be a callable (n, generator) -> samples")
    n = _positive_int("n", n)
    repeats = _positive_int("repeats", repeats, lo=2)
    vals = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(seed + 1000 * r)
        vals.append(sliced_wasserstein(sampler(n, g), sampler(n, g), n_projections, g))
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std())


def mode_coverage(x: Tensor, means: Tensor, radius: float, min_count: int = 10) -> dict:
    """How many mixture modes a sample covers.

    Returns ``modes_covered`` (modes with at least ``min_count`` samples within ``radius``),
    ``fraction_covered`` and ``fraction_near`` (share of samples within ``radius`` of some mode), and
    ``counts`` per mode. ``radius`` must be positive and finite; ``min_count >= 1``.
    """
    radius = check_positive("radius", radius)
    min_count = _positive_int("min_count", min_count)
    x, means = _points(x, "x"), _points(means, "means")
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but means has dimension {means.shape[1]}")
    d = torch.cdist(x, means)
    nearest = d.argmin(1)
    near = d.min(1).values <= radius
    counts = torch.bincount(nearest[near], minlength=means.shape[0])
    covered = int((counts >= min_count).sum())
    return {"modes_covered": covered, "fraction_covered": covered / means.shape[0],
            "fraction_near": float(near.double().mean()), "counts": counts.tolist()}
