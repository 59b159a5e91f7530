"""The distance functions ``d`` of SIM's score divergences (SIM Eq. 3.3, Sec. 3.3, App. A.3, Table 4).

A score divergence integrates ``w(t) E_{x_t ~ pi_t} d(s_p(x_t) - s_q(x_t))`` over time (SIM Eq. 3.3). The
SIM generator loss (Eq. 3.7) only needs ``d'``, the gradient of ``d`` at ``y_t = s_psi - s_q``; Table 4
lists six choices. Each is a :class:`ScoreDistance` with ``value(y)`` (one number per sample, summed over
all non-batch dimensions, shape ``(batch,)``) and ``grad(y)`` (``d'(y)``, the shape of ``y``), written in
closed form so that tests can compare them with autograd and with ``torch.nn.functional``:

==================  =====================================  ===============================================
name                ``d(y)``                               ``d'(y)``
==================  =====================================  ===============================================
``l2``              ``||y||_2^2``                          ``2 y``
``alpha_power``     ``||y||_alpha^alpha`` (alpha even)     ``alpha y^(alpha-1)``
``exp_power``       ``exp(beta ||y||_alpha^alpha) - 1``    ``alpha beta exp(beta ||y||_alpha^alpha) y^(alpha-1)``
``l1``              ``||y||_1``                            ``sign(y)``
``huber``           ``sum_i L_delta(y_i)``                 ``clamp(y, -delta, delta)``
``pseudo_huber``    ``sqrt(||y||_2^2 + c^2) - c``          ``y / sqrt(||y||_2^2 + c^2)``
==================  =====================================  ===============================================

Errata (registered in ``dstar_edu/verify/checks/distill.py``): Table 4 prints the exp-power ``d'``
without the factor ``beta`` and the pseudo-Huber ``d'`` with a spurious factor 2 (Eq. 3.8 in the main
text has it right); App. A.3 prints the Huber branches swapped (``y^2/2`` for ``y >= delta``); Sec. 3.3
calls ``alpha y^(alpha-1)`` the distance where it is its derivative. The L1 row is a valid distance, but
its ``d'`` is discontinuous, which breaks the reparameterised gradient of SIM's Thm 3.1 (see the check
``distill.sim_thm31.l1``).
"""
from __future__ import annotations

import math

import torch

from ..validation import check_choice

Tensor = torch.Tensor

__all__ = ["ScoreDistance", "SquaredL2", "AlphaPower", "ExpPower", "L1", "Huber", "PseudoHuber",
           "DISTANCES", "get_distance", "default_pseudo_huber_c"]


def _flat(y: Tensor) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of shape (batch, *shape), got {type(y).__name__}")
    if y.ndim < 1:
        raise ValueError(f"y has shape {tuple(y.shape)}; a distance needs (batch, *shape) with at least one axis")
    return y.reshape(y.shape[0], -1)


def _row(v: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``(batch,)`` values reshaped to broadcast against ``y``."""
    return v.reshape(v.shape[0], *([1] * (y.ndim - 1)))


def _positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a positive number") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name}={value!r} must be a positive finite number")
    return v


def _even(alpha) -> int:
    if isinstance(alpha, bool) or not float(alpha).is_integer() or int(alpha) < 2 or int(alpha) % 2:
        raise ValueError(f"alpha={alpha!r} must be an even integer >= 2 (SIM Table 4: alpha >= 1, alpha even)")
    return int(alpha)


class ScoreDistance:
    """A proper distance ``d: R^D -> R`` (``d >= 0``, ``d(y) = 0`` iff ``y = 0``), SIM Eq. 3.3.

    ``value(y)`` is ``(batch,)``; ``grad(y)`` is ``d'(y) = grad_y d(y)`` with the shape of ``y``.
    """

    name = "distance"
    source = "SIM Table 4"

    def value(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define value")

    def grad(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define grad")

    def __call__(self, y: Tensor) -> Tensor:
        return self.value(y)

    def params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class SquaredL2(ScoreDistance):
    """``d(y) = ||y||_2^2``, ``d'(y) = 2 y`` (SIM Sec. 3.3, Table 4 row 1): SIM with it is SiD."""

    name = "l2"

    def value(self, y):
        f = _flat(y)
        return (f * f).sum(1)

    def grad(self, y):
        _flat(y)
        return 2 * y


class AlphaPower(ScoreDistance):
    """``d(y) = ||y||_alpha^alpha = sum_i y_i^alpha`` with alpha even, ``d'(y) = alpha y^(alpha-1)`` (Table 4 row 2)."""

    name = "alpha_power"

    def __init__(self, alpha: int = 4):
        self.alpha = _even(alpha)

    def params(self):
        return {"alpha": self.alpha}

    def value(self, y):
        return _flat(y).pow(self.alpha).sum(1)

    def grad(self, y):
        _flat(y)
        return self.alpha * y.pow(self.alpha - 1)


class ExpPower(ScoreDistance):
    """``d(y) = exp(beta ||y||_alpha^alpha) - 1`` (Table 4 row 3).

    ``d'(y) = alpha beta exp(beta ||y||_alpha^alpha) y^(alpha-1)``: Table 4 prints it without ``beta``.
    """

    name = "exp_power"

    def __init__(self, alpha: int = 2, beta: float = 0.1):
        self.alpha = _even(alpha)
        self.beta = _positive("beta", beta)

    def params(self):
        return {"alpha": self.alpha, "beta": self.beta}

    def value(self, y):
        return torch.expm1(self.beta * _flat(y).pow(self.alpha).sum(1))

    def grad(self, y):
        e = torch.exp(self.beta * _flat(y).pow(self.alpha).sum(1))
        return self.alpha * self.beta * _row(e, y) * y.pow(self.alpha - 1)


class L1(ScoreDistance):
    """``d(y) = ||y||_1``, ``d'(y) = sign(y)`` (Table 4 row 4; ``sign(0) = 0``)."""

    name = "l1"

    def value(self, y):
        return _flat(y).abs().sum(1)

    def grad(self, y):
        _flat(y)
        return torch.sign(y)


class Huber(ScoreDistance):
    """Huber distance summed over coordinates (SIM App. A.3, corrected; Table 4 row 5).

    ``L_delta(y_i) = y_i^2 / 2`` for ``|y_i| <= delta`` and ``delta (|y_i| - delta / 2)`` otherwise;
    ``d'(y) = clamp(y, -delta, delta)``. App. A.3 prints the branches the other way round (quadratic for
    ``y_i >= delta``), which makes ``d(0) = -delta^2/2 < 0``: not a distance.
    """

    name = "huber"

    def __init__(self, delta: float = 1.0):
        self.delta = _positive("delta", delta)

    def params(self):
        return {"delta": self.delta}

    def value(self, y):
        a = _flat(y).abs()
        quad = 0.5 * a * a
        lin = self.delta * (a - 0.5 * self.delta)
        return torch.where(a <= self.delta, quad, lin).sum(1)

    def grad(self, y):
        _flat(y)
        return y.clamp(-self.delta, self.delta)


class PseudoHuber(ScoreDistance):
    """``d(y) = sqrt(||y||_2^2 + c^2) - c``, ``d'(y) = y / sqrt(||y||_2^2 + c^2)`` (SIM Eq. 3.8, Table 4 row 6).

    The norm runs over all non-batch dimensions of ``y``, so ``d'`` is ``y`` normalised per sample: the
    adaptive normalisation SIM credits for robustness to large learning rates (Sec. 3.3).
    """

    name = "pseudo_huber"

    def __init__(self, c: float = 1.0):
        self.c = _positive("c", c)

    def params(self):
        return {"c": self.c}

    def _root(self, y):
        f = _flat(y)
        return torch.sqrt((f * f).sum(1) + self.c ** 2)

    def value(self, y):
        f = _flat(y)
        r = (f * f).sum(1)
        return r / (torch.sqrt(r + self.c ** 2) + self.c)   # = sqrt(r + c^2) - c without cancellation for r << c^2

    def grad(self, y):
        return y / _row(self._root(y), y)


DISTANCES = {"l2": SquaredL2, "alpha_power": AlphaPower, "exp_power": ExpPower, "l1": L1, "huber": Huber,
             "pseudo_huber": PseudoHuber}


def default_pseudo_huber_c(numel: int) -> float:
    """Default pseudo-Huber constant ``c = 0.00054 sqrt(D)`` (the dimension scaling of iCT/ECT's pseudo-Huber),
    for a sample of ``D = numel`` entries."""
    return 0.00054 * math.sqrt(numel)


def get_distance(distance="pseudo_huber", **params) -> ScoreDistance:
    """A :class:`ScoreDistance` from a name in ``DISTANCES`` (with its parameters) or an instance (returned as is).

    Parameters: ``alpha`` (``alpha_power``, ``exp_power``), ``beta`` (``exp_power``), ``delta`` (``huber``),
    ``c`` (``pseudo_huber``). ``None`` values are ignored (the class default applies).
    """
    if isinstance(distance, ScoreDistance):
        extra = {k: v for k, v in params.items() if v is not None}
        if extra:
            raise ValueError(f"parameters {sorted(extra)} were given with a ScoreDistance instance {distance!r}; "
                             "set them when constructing it")
        return distance
    check_choice("distance", distance, DISTANCES, also="a ScoreDistance")
    cls = DISTANCES[distance]
    allowed = {"l2": (), "alpha_power": ("alpha",), "exp_power": ("alpha", "beta"), "l1": (), "huber": ("delta",),
               "pseudo_huber": ("c",)}[distance]
    given = {k: v for k, v in params.items() if v is not None}
    bad = sorted(set(given) - set(allowed))
    if bad:
        raise ValueError(f"distance={distance!r} takes parameters {list(allowed) or 'none'}; got {bad}")
    return cls(**given)
