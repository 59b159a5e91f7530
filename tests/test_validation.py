"""The validation vocabulary: every helper's message names the argument, its value and what is allowed, and
valid input comes back unchanged (numpy scalars as the equal Python number)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dstar_edu.validation import (check_batch, check_choice, check_finite, check_int, check_positive,
                                  check_probability, check_real, check_shape, check_type, show)

NAN, INF = math.nan, math.inf


# ---- check_choice -------------------------------------------------------------------------------------------
def test_choice_passes_through():
    assert check_choice("mode", "b", ("a", "b")) == "b"
    assert check_choice("order", 2, (1, 2, 3)) == 2
    assert check_choice("kind", "x", {"x": 1, "y": 2}) == "x"  # a mapping's keys
    assert check_choice("baseline", None, (None, "mean")) is None


def test_choice_message_names_value_allowed_and_suggests():
    with pytest.raises(ValueError, match=r"^mode='bb' is unknown; allowed: aa, bb2, cc \(did you mean 'bb2'\?\)$"):
        check_choice("mode", "bb", ("aa", "bb2", "cc"))
    with pytest.raises(ValueError, match=r"^mode='zzz' is unknown; allowed: aa, bb$"):  # nothing close: no hint
        check_choice("mode", "zzz", ("aa", "bb"))
    with pytest.raises(ValueError, match=r"^w='q' is unknown; allowed: snr, none or a callable w\(t\)$"):
        check_choice("w", "q", ("snr", "none"), also="a callable w(t)")


@pytest.mark.parametrize("value", [True, 1.5, torch.tensor([1, 2]), [1], {"a": 1}, np.array([1, 2])])
def test_choice_rejects_bools_and_unhashables_with_a_clear_message(value):
    with pytest.raises(ValueError, match=r"^order=.* is unknown; allowed: 1, 2, 3$"):
        check_choice("order", value, (1, 2, 3))


# ---- check_int ----------------------------------------------------------------------------------------------
def test_int_passes_through_and_converts_numpy():
    assert check_int("n", 5, lo=1) == 5 and type(check_int("n", 5, lo=1)) is int
    assert check_int("n", 0, lo=0) == 0
    out = check_int("n", np.int64(7), lo=1)
    assert out == 7 and type(out) is int
    assert check_int("n", 10, lo=1, hi=10) == 10  # both ends are inclusive
    assert check_int("n", -4) == -4


@pytest.mark.parametrize("kwargs, value, message", [
    (dict(lo=1), 0, "n=0 must be a positive integer"),
    (dict(lo=1), True, "n=True must be a positive integer"),          # a bool is not an integer
    (dict(lo=1), 2.0, "n=2.0 must be a positive integer"),            # nor is an integral float
    (dict(lo=1), "3", "n='3' must be a positive integer"),
    (dict(lo=1), torch.tensor(3), r"n=tensor\(3, dtype=torch.int64\) must be a positive integer"),  # 0-d tensor
    (dict(lo=0), -1, "n=-1 must be a non-negative integer"),
    (dict(lo=2), 1, "n=1 must be an integer >= 2"),
    (dict(lo=1, hi=10, hi_name="T"), 20, r"n=20 must be an integer in 1..T=10"),
    (dict(lo=0, hi=3), np.int64(4), r"n=np.int64\(4\) must be an integer in 0..3|n=4 must be an integer in 0..3"),
    (dict(), None, "n=None must be an integer"),
])
def test_int_messages(kwargs, value, message):
    with pytest.raises(ValueError, match="^(" + message + ")$"):
        check_int("n", value, **kwargs)


# ---- check_real and shortcuts -------------------------------------------------------------------------------
def test_real_passes_through_unchanged():
    for v in (0.5, 2, 1e300):
        assert check_real("x", v) is v  # Python numbers: the same object
    out = check_real("x", np.float32(0.25))
    assert out == 0.25 and type(out) is float
    assert type(check_real("x", np.int64(3))) is int
    assert check_positive("x", INF, finite=False) == INF
    assert check_probability("p", 0) == 0 and check_probability("p", 1.0) == 1.0
    assert check_real("x", 1.0, 0, 1, lo_open=True) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: check_positive("lr", 0.0), "lr=0.0 must be a positive finite number"),
    (lambda: check_positive("lr", -1), "lr=-1 must be a positive finite number"),
    (lambda: check_positive("lr", NAN), "lr=nan must be a positive finite number"),
    (lambda: check_positive("lr", INF), "lr=inf must be a positive finite number"),
    (lambda: check_positive("lr", True), "lr=True must be a positive finite number"),
    (lambda: check_positive("lr", "1e-3"), "lr='1e-3' must be a positive finite number"),
    (lambda: check_positive("lr", torch.tensor(0.1)),
     r"lr=tensor\(0.10000000149011612, dtype=torch.float32\) must be a positive finite number"),
    (lambda: check_positive("w", NAN, finite=False), "w=nan must be a positive number"),
    (lambda: check_positive("w", 0, finite=False), "w=0 must be a positive number"),
    (lambda: check_finite("b", -INF), "b=-inf must be a finite number"),
    (lambda: check_finite("b", None), "b=None must be a finite number"),
    (lambda: check_probability("p", 1.5), r"p=1.5 must be a finite number in \[0, 1\]"),
    (lambda: check_probability("p", NAN), r"p=nan must be a finite number in \[0, 1\]"),
    (lambda: check_real("f", 0.5, 1, lo_open=True), "f=0.5 must be a finite number > 1"),
    (lambda: check_real("f", -1, 0), "f=-1 must be a non-negative finite number"),
    (lambda: check_real("d", 1, 0, 1, lo_open=True, hi_open=True), r"d=1 must be a finite number in \(0, 1\)"),
    (lambda: check_real("s", 1.0, 0, 1, hi_open=True), r"s=1.0 must be a finite number in \[0, 1\)"),
    (lambda: check_real("h", 3, hi=2), "h=3 must be a finite number <= 2"),
])
def test_real_messages(call, message):
    with pytest.raises(ValueError, match="^" + message + "$"):
        call()


# ---- check_type ---------------------------------------------------------------------------------------------
class Base:
    pass


class Child(Base):
    pass


def test_type_passes_through_and_allows_none_when_listed():
    c = Child()
    assert check_type("obj", c, Base) is c
    assert check_type("g", None, (torch.Generator, None)) is None
    g = torch.Generator()
    assert check_type("g", g, (torch.Generator, None)) is g


def test_type_messages():
    with pytest.raises(ValueError, match=r"^obj must be a Base, got str 'vp'$"):
        check_type("obj", "vp", Base)
    with pytest.raises(ValueError, match=r"^g must be a torch.Generator or None, got int 3$"):
        check_type("g", 3, (torch.Generator, None), "a torch.Generator or None")
    with pytest.raises(ValueError, match=r"^m must be a Base or None, got Linear$"):
        check_type("m", torch.nn.Linear(1, 1), (Base, None))
    with pytest.raises(ValueError, match=r"^flag must be an int or a float, got bool True$"):  # bool is not a number
        check_type("flag", True, (int, float))


# ---- check_shape / check_batch ------------------------------------------------------------------------------
def test_shape():
    x = torch.zeros(4, 2)
    assert check_shape("noise", x, (4, 2)) is x
    with pytest.raises(ValueError, match=r"^noise has shape \(3,\); allowed: \(4, 2\) \(the shape of x\)$"):
        check_shape("noise", torch.zeros(3), x.shape, "the shape of x")
    with pytest.raises(ValueError, match=r"^noise must be a tensor of shape \(4, 2\), got \[0, 1\]$"):
        check_shape("noise", [0, 1], (4, 2))


def test_batch():
    x = torch.zeros(2, 3)
    assert check_batch(x, "x") is x
    assert check_batch(torch.zeros(0, 3), "x").shape == (0, 3)
    with pytest.raises(ValueError, match=r"x must be a floating tensor of shape \(batch, \*shape\), got Tensor of "
                                         r"dtype torch.int64, shape \(2,\)"):
        check_batch(torch.zeros(2, dtype=torch.int64), "x")
    with pytest.raises(ValueError, match=r"got Tensor of dtype torch.float32, shape \(0, 3\)"):
        check_batch(torch.zeros(0, 3), "x", nonempty=True)
    with pytest.raises(ValueError, match=r"got float"):
        check_batch(1.0, "x")


def test_show_is_short():
    assert show("a" * 200).endswith("...") and len(show("a" * 200)) == 60
    assert show(torch.zeros(3, 2)) == "tensor of shape (3, 2) and dtype torch.float32"
    assert show(object()) == "object"
