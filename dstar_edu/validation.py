"""Argument checks shared by the whole package; each raises ``ValueError`` naming the argument, its value and
what is allowed.

One vocabulary, one wording:

- ``check_choice("weighting", w, WEIGHTINGS)`` -> ``weighting='p2' is unknown; allowed: a, b (did you mean 'a'?)``
- ``check_int("n", n, lo=1)`` -> ``n=0 must be a positive integer``
- ``check_real("decay", d, lo=0, hi=1, lo_open=True, hi_open=True)`` -> ``decay=1.5 must be a finite number in (0, 1)``
  (shortcuts ``check_positive``, ``check_finite``, ``check_probability``)
- ``check_type("process", p, Process)`` -> ``process must be a Process, got str 'vp'``
- ``check_shape("noise", z, x.shape, "the shape of x")`` -> ``noise has shape (3,); allowed: (4, 2) (the shape of x)``
- ``check_batch(x, "x")`` -> ``x must be a floating tensor of shape (batch, *shape), got ...``

Numbers: an *integer* is a Python or numpy integer, never a ``bool`` or a tensor; a *real* is any
``numbers.Real`` (Python, numpy), never a ``bool`` or a tensor (pass ``t.item()``). Valid input comes back
unchanged, except that numpy scalars come back as the equal Python ``int`` / ``float``.
"""
from __future__ import annotations

import difflib
import math
import numbers

import torch

Tensor = torch.Tensor

__all__ = ["check_batch", "check_choice", "check_int", "check_real", "check_positive", "check_finite",
           "check_probability", "check_type", "check_shape", "show"]


def show(value, limit: int = 60) -> str:
    """A short printable form of an argument's value: ``repr`` for plain values, a summary for tensors and objects."""
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if value.ndim else \
            f"tensor({value.item()!r}, dtype={value.dtype})"
    if value is None or isinstance(value, (bool, numbers.Number, str, bytes, tuple, list, dict, set, frozenset)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit - 3] + "..."
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value):
    """``value`` itself if it is a Python ``int``/``float``, else the equal Python number (numpy scalars)."""
    if type(value) in (int, float):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_choice(name: str, value, allowed, *, also: str | None = None):
    """``value`` if it is one of ``allowed`` (a sequence or a mapping's keys); else
    ``ValueError: NAME=VALUE is unknown; allowed: a, b, c`` with a close match suggested for a string.

    ``also`` names what else the caller accepts (``"a callable w(t)"``) and is appended to the allowed list.
    A ``bool`` never matches ``1`` or ``0``.
    """
    options = list(allowed)
    try:
        ok = value in options and (not isinstance(value, bool) or any(isinstance(a, bool) for a in options))
    except (TypeError, RuntimeError, ValueError):  # unhashable values or tensors that cannot be compared
        ok = False
    if ok:
        return value
    listed = ", ".join(str(a) for a in options) + (f" or {also}" if also else "")
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in options], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{name}={show(value)} is unknown; allowed: {listed}{hint}")


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None, hi_name: str | None = None) -> int:
    """``value`` (as a Python ``int``) if it is an integer in ``lo..hi``; else ``ValueError`` naming the range:
    ``a positive integer`` (lo=1), ``a non-negative integer`` (lo=0), ``an integer >= lo``, ``an integer in lo..hi``
    (``hi_name`` labels the upper end: ``1..T=10``)."""
    if _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi):
        return _plain(value)
    top = None if hi is None else (f"{hi_name}={hi}" if hi_name else str(hi))
    if top is not None:
        what = f"an integer in {lo}..{top}" if lo is not None else f"an integer <= {top}"
    elif lo == 1:
        what = "a positive integer"
    elif lo == 0:
        what = "a non-negative integer"
    else:
        what = "an integer" if lo is None else f"an integer >= {lo}"
    raise ValueError(f"{name}={show(value)} must be {what}")


def _describe(lo, hi, lo_open, hi_open, finite) -> str:
    kind = "finite number" if finite else "number"
    if lo is None and hi is None:
        return f"a {kind}"
    if hi is None:
        if lo == 0:
            return f"a positive {kind}" if lo_open else f"a non-negative {kind}"
        return f"a {kind} {'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"a {kind} {'<' if hi_open else '<='} {hi:g}"
    return f"a {kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_real(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False, finite: bool = True):
    """``value`` if it is a real number (not a bool, not a tensor) between ``lo`` and ``hi`` (open ends
    excluded), finite unless ``finite=False`` (NaN is never allowed); else ``ValueError`` naming the range.
    Python numbers come back unchanged, numpy scalars as the equal Python number."""
    ok = _is_real(value) and not math.isnan(value) and (not finite or math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return _plain(value)
    raise ValueError(f"{name}={show(value)} must be {_describe(lo, hi, lo_open, hi_open, finite)}")


def check_positive(name: str, value, *, finite: bool = True):
    """``check_real(name, value, lo=0, lo_open=True)``: ``NAME=VALUE must be a positive finite number``."""
    return check_real(name, value, 0, lo_open=True, finite=finite)


def check_finite(name: str, value):
    """``check_real(name, value)``: ``NAME=VALUE must be a finite number``."""
    return check_real(name, value)


def check_probability(name: str, value):
    """``check_real(name, value, 0, 1)``: ``NAME=VALUE must be a finite number in [0, 1]``."""
    return check_real(name, value, 0, 1)


def check_type(name: str, value, types, what: str | None = None):
    """``value`` if it is an instance of ``types`` (a class or a tuple; ``None`` in the tuple allows None);
    else ``ValueError: NAME must be WHAT, got TYPE VALUE`` (``what`` defaults to the class names)."""
    classes = types if isinstance(types, tuple) else (types,)
    classes = tuple(type(None) if c is None else c for c in classes)
    if isinstance(value, classes) and not (isinstance(value, bool) and bool not in classes
                                           and any(c in (int, float) for c in classes)):
        return value
    if what is None:
        names = ["None" if c is type(None) else ("an " if c.__name__[0] in "aeiouAEIOU" else "a ") + c.__name__
                 for c in classes]
        what = " or ".join(names)
    kind, shown = type(value).__name__, show(value)
    raise ValueError(f"{name} must be {what}, got {kind}" + ("" if shown == kind else f" {shown}"))


def check_shape(name: str, value, shape, what: str | None = None) -> Tensor:
    """``value`` if it is a tensor of shape ``shape``; else ``ValueError: NAME has shape S; allowed: SHAPE (WHAT)``
    (``what`` says where the shape comes from, e.g. ``"the shape of x"``)."""
    shape = tuple(shape)
    if isinstance(value, Tensor) and tuple(value.shape) == shape:
        return value
    why = f" ({what})" if what else ""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {shape}{why}, got {show(value)}")
    raise ValueError(f"{name} has shape {tuple(value.shape)}; allowed: {shape}{why}")


def check_batch(x, name: str, *, nonempty: bool = False) -> Tensor:
    """``x`` itself if it is a floating tensor of shape ``(batch, *shape)`` (with ``batch >= 1`` if ``nonempty``)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or (nonempty and x.shape[0] < 1):
        got = type(x).__name__ + (f" of dtype {x.dtype}, shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
        raise ValueError(f"{name} must be a floating tensor of shape (batch, *shape), got {got}")
    return x
