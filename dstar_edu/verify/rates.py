"""Observed orders of convergence with a derived tolerance (used by the sampler rate checks).

A method of order ``p`` has global error ``e(N) = C N^-p (1 + c_1/N + ...)``, so the observed order
from one doubling, ``p_k = log2(e(N_k) / e(2 N_k))``, tends to ``p`` with corrections that shrink
geometrically as N doubles. From the last three observed orders, Aitken's Delta^2 extrapolation gives
the limit ``p_K + d_K r / (1 - r)`` (``d_K = p_K - p_{K-1}``, ``r = d_K / d_{K-1}``); its own size
``|d_K r / (1 - r)|`` is the tolerance: the extrapolation is exact for geometric corrections, and the
next-order remainder is smaller than the step it takes while the corrections shrink (``0 < r < 1``,
which is required). A fixed threshold such as "within 0.1 of 1" is replaced by this, so the check
depends on how far the measured sequence still is from its limit, not on a constant that happens to pass.
"""
from __future__ import annotations

import math

import torch

from .registry import CheckResult, identity

__all__ = ["observed_orders", "extrapolated_order", "order_check"]

#: float64 floor of the tolerance: orders are logs of errors computed to ~1e-13 relative accuracy
ROUND_OFF = 1e-9


def observed_orders(errors: list[float]) -> list[float]:
    """``log2(e_k / e_{k+1})`` for errors measured at step counts that double from one entry to the next."""
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def extrapolated_order(errors: list[float]) -> dict:
    """Aitken-extrapolated order of convergence and its tolerance (see the module docstring).

    Needs at least four errors (three observed orders). ``settled`` is False when the errors do not shrink
    at every doubling or the corrections do not shrink geometrically; the limit is then NaN.
    """
    if len(errors) < 4:
        raise ValueError(f"errors must hold at least 4 values (3 doublings), got {len(errors)}")
    p = observed_orders(errors)
    shrinking = all(a > b > 0 for a, b in zip(errors, errors[1:]))
    d1, d2 = p[-2] - p[-3], p[-1] - p[-2]
    r = d2 / d1 if d1 != 0 else math.nan
    settled = shrinking and 0 < r < 1
    step = d2 * r / (1 - r) if settled else math.nan
    return {"orders": p, "ratio": r, "settled": settled, "order": p[-1] + step,
            "tol": abs(step) + ROUND_OFF if settled else math.nan}


def order_check(errors: dict[str, list[float]], expected: float, **details) -> CheckResult:
    """Identity ``extrapolated order == expected`` for each labelled error sequence, within its own tolerance."""
    info = {label: extrapolated_order(e) for label, e in errors.items()}
    orders = torch.tensor([i["order"] for i in info.values()], dtype=torch.float64)
    tols = torch.tensor([i["tol"] for i in info.values()], dtype=torch.float64)
    z = ((orders - expected).abs() / tols)
    worst = int(torch.nan_to_num(z, nan=math.inf).argmax())
    res = identity(orders[worst], torch.tensor(float(expected), dtype=torch.float64), rtol=0.0,
                   atol=float(tols[worst]) if math.isfinite(tols[worst]) else 0.0,
                   errors=errors, extrapolation=info, **details)
    res.passed = res.passed and all(i["settled"] for i in info.values())
    return res
