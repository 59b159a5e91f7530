"""SIM's distance family (Table 4): values against independent implementations, d' against autograd."""
import math

import pytest
import torch

from dstar_edu.objectives import distances
from dstar_edu.objectives.divergences import (DISTANCES, AlphaPower, ExpPower, Huber, L1, PseudoHuber, ScoreDistance,
                                              SquaredL2, default_pseudo_huber_c, get_distance)

F64 = torch.float64
PARAMS = {"l2": {}, "alpha_power": {"alpha": 4}, "exp_power": {"alpha": 2, "beta": 0.05}, "l1": {},
          "huber": {"delta": 0.7}, "pseudo_huber": {"c": 0.3}}
SHAPES = [(7, 2), (3, 3, 8, 8)]


def y_of(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(DISTANCES))
def test_grad_is_autograd_of_value(name, shape):
    d = get_distance(name, **PARAMS[name])
    y = y_of(shape).requires_grad_(True)
    (g,) = torch.autograd.grad(d.value(y).sum(), y)
    torch.testing.assert_close(d.grad(y.detach()), g, rtol=1e-12, atol=1e-14)
    assert d.value(y).shape == (shape[0],)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_proper_distance(name):
    """d >= 0 and d(0) = 0 (SIM Sec. 3.1), per sample over all non-batch dims."""
    d = get_distance(name, **PARAMS[name])
    y = y_of((5, 3, 4, 4), 1)
    assert (d.value(y) > 0).all()
    assert torch.equal(d.value(torch.zeros(2, 3, 4, 4, dtype=F64)), torch.zeros(2, dtype=F64))
    # the value only sees the flattened sample
    torch.testing.assert_close(d.value(y), d.value(y.reshape(5, -1)), rtol=1e-14, atol=0)


def test_values_against_independent_references():
    y = y_of((6, 3, 5), 2)
    flat = y.reshape(6, -1)
    torch.testing.assert_close(get_distance("l2").value(y), (flat ** 2).sum(1))
    torch.testing.assert_close(get_distance("l1").value(y), torch.linalg.vector_norm(flat, ord=1, dim=1))
    torch.testing.assert_close(get_distance("alpha_power", alpha=4).value(y), torch.linalg.vector_norm(flat, 4, 1) ** 4)
    ref = torch.nn.functional.huber_loss(y, torch.zeros_like(y), delta=0.7, reduction="none").reshape(6, -1).sum(1)
    torch.testing.assert_close(get_distance("huber", delta=0.7).value(y), ref, rtol=1e-13, atol=1e-14)
    # the project's consistency-model pseudo-Huber (objectives/distances.py, another implementation)
    torch.testing.assert_close(get_distance("pseudo_huber", c=0.3).value(y),
                               distances.pseudo_huber(y, torch.zeros_like(y), 0.3), rtol=1e-12, atol=1e-14)
    e = get_distance("exp_power", alpha=2, beta=0.05).value(y)
    torch.testing.assert_close(e, torch.exp(0.05 * (flat ** 2).sum(1)) - 1, rtol=1e-12, atol=0)


def test_limits_and_special_cases():
    y = y_of((4, 6), 3)
    # alpha = 2 is the squared L2 row
    torch.testing.assert_close(AlphaPower(2).grad(y), SquaredL2().grad(y))
    # pseudo-Huber: c -> infinity gives ||y||^2 / (2c) (quadratic), c -> 0 gives ||y|| (normalised gradient)
    big = PseudoHuber(1e6)
    torch.testing.assert_close(big.value(y) * 2e6, (y ** 2).sum(1), rtol=1e-5, atol=0)
    small = PseudoHuber(1e-9)
    torch.testing.assert_close(small.grad(y), y / y.norm(dim=1, keepdim=True), rtol=1e-9, atol=0)
    # Huber: quadratic inside [-delta, delta], slope +-delta outside
    h = Huber(0.5)
    torch.testing.assert_close(h.grad(torch.tensor([[-2.0, -0.3, 0.1, 3.0]], dtype=F64)),
                               torch.tensor([[-0.5, -0.3, 0.1, 0.5]], dtype=F64))
    # L1: sign, with sign(0) = 0
    assert torch.equal(L1().grad(torch.tensor([[-1.0, 0.0, 2.0]])), torch.tensor([[-1.0, 0.0, 1.0]]))
    # exp-power: d' = alpha beta exp(beta ||y||^alpha) y^(alpha-1) (Table 4 prints it without beta)
    e = ExpPower(2, 0.3)
    s = (y ** 2).sum(1, keepdim=True)
    torch.testing.assert_close(e.grad(y), 2 * 0.3 * torch.exp(0.3 * s) * y)


def test_default_c_scales_with_dimension():
    assert default_pseudo_huber_c(3072) == pytest.approx(0.00054 * math.sqrt(3072))
    assert default_pseudo_huber_c(2) == pytest.approx(0.00054 * math.sqrt(2))


def test_get_distance_errors_name_the_argument():
    with pytest.raises(ValueError, match="distance='l3' is unknown; allowed: l2, alpha_power"):
        get_distance("l3")
    with pytest.raises(ValueError, match="alpha=3 must be an even integer"):
        get_distance("alpha_power", alpha=3)
    with pytest.raises(ValueError, match="alpha=2.5"):
        AlphaPower(2.5)
    with pytest.raises(ValueError, match="c=0 must be a positive"):
        get_distance("pseudo_huber", c=0)
    with pytest.raises(ValueError, match="delta=-1"):
        Huber(-1)
    with pytest.raises(ValueError, match="beta=nan"):
        ExpPower(2, float("nan"))
    with pytest.raises(ValueError, match=r"distance='l2' takes parameters none; got \['c'\]"):
        get_distance("l2", c=1.0)
    with pytest.raises(ValueError, match="were given with a ScoreDistance instance"):
        get_distance(PseudoHuber(1.0), c=2.0)
    d = PseudoHuber(2.0)
    assert get_distance(d) is d and get_distance(d, c=None) is d
    with pytest.raises(ValueError, match="batch"):
        d.value(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        d.grad([1.0, 2.0])


def test_repr_and_base_class():
    assert repr(PseudoHuber(0.5)) == "PseudoHuber(c=0.5)"
    assert repr(ExpPower(4, 0.1)) == "ExpPower(alpha=4, beta=0.1)"
    assert isinstance(get_distance("huber"), ScoreDistance)
