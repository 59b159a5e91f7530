"""Which library functions a check calls: the evidence behind each check's ``covers`` list.

``traced_calls(check)`` runs a check once under ``sys.setprofile`` and returns the dotted names of the
``dstar_edu`` functions and methods (outside ``dstar_edu.verify``) it entered, with call counts and whether the
call came straight from verification code. ``python -m dstar_edu.verify.tracing [-k SUBSTRING]`` prints, per
check, the public functions called directly from the check: the proposal from which each ``covers`` entry in
``dstar_edu/verify/covers.py`` was curated (keeping the functions that implement the tested statement, not every
helper touched). ``--confirm`` checks every check's list against a traced run (about 3 minutes for the whole
registry on 2 cores); ``tests/test_verify_covers.py`` does so for a sample.
"""
from __future__ import annotations

import inspect
import sys
from collections import Counter
from types import CodeType, FunctionType

__all__ = ["code_names", "traced_calls", "propose", "uncalled"]

_SKIP = ("dstar_edu.verify",)


def _library_modules():
    return [m for name, m in list(sys.modules.items()) if m is not None and _is_library(name)]


def _functions_of(obj):
    """(qualname suffix, function) for a function, or each function-like attribute of a class."""
    if isinstance(obj, FunctionType):
        yield obj
        return
    if isinstance(obj, type):
        for attr in vars(obj).values():
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, property):
                for f in (attr.fget, attr.fset):
                    if f is not None:
                        yield f
            elif isinstance(attr, FunctionType):
                yield attr


def _is_library(module: str) -> bool:
    return (module == "dstar_edu" or module.startswith("dstar_edu.")) and not module.startswith(_SKIP)


def _clear_check_caches() -> None:
    """Empty the ``functools`` caches of the verification modules, so that a check recomputes what it uses."""
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith(_SKIP):
            for obj in list(vars(mod).values()):
                if callable(getattr(obj, "cache_clear", None)) and getattr(obj, "__module__", "") == name:
                    obj.cache_clear()


def code_names() -> dict[CodeType, str]:
    """Code object -> dotted name (``module.Class.method``) of every function defined in a loaded library module."""
    names: dict[CodeType, str] = {}
    for mod in _library_modules():
        for obj in list(vars(mod).values()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            for fn in _functions_of(obj):
                fn = inspect.unwrap(fn)
                if isinstance(fn, FunctionType) and fn.__module__ == mod.__name__:
                    names.setdefault(fn.__code__, f"{fn.__module__}.{fn.__qualname__}")
    return names


def traced_calls(check) -> dict[str, dict]:
    """Run ``check`` once; ``{dotted name: {"calls": n, "direct": m}}`` of the library functions it entered.

    ``direct`` counts calls whose caller is verification code (the check, its fixtures, its measurement helpers).
    Only functions defined in ``dstar_edu`` outside ``dstar_edu.verify`` are named (nested functions are not).
    """
    from .registry import run_check
    import dstar_edu.verify.checks  # noqa: F401 - the library modules the checks import are loaded here
    _clear_check_caches()
    names, unnamed = code_names(), set()
    calls, direct = Counter(), Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        name = names.get(code)
        if name is None:
            if code in unnamed or not _is_library(frame.f_globals.get("__name__", "")):
                return
            names.update(code_names())          # a module the check imported lazily
            name = names.get(code)
            if name is None:                    # a nested function or lambda: not a named library function
                unnamed.add(code)
                return
        calls[name] += 1
        caller = frame.f_back
        if caller is not None and str(caller.f_globals.get("__name__", "")).startswith(_SKIP):
            direct[name] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = run_check(check)
    finally:
        sys.setprofile(previous)
    if result.get("error"):
        raise RuntimeError(f"check {check.id} raised while traced: {result['error']}")
    return {n: {"calls": calls[n], "direct": direct[n]} for n in sorted(calls)}


def propose(check) -> list[str]:
    """Public library functions the check calls directly, most called first: the starting point of ``covers``."""
    traced = traced_calls(check)
    public = {n: v for n, v in traced.items() if v["direct"] and not any(p.startswith("_") for p in n.split("."))}
    return sorted(public, key=lambda n: (-public[n]["direct"], n))


def uncalled(check) -> list[str]:
    """The names in ``check.covers`` that one traced run of the check never enters (should be empty)."""
    traced = traced_calls(check)
    return [n for n in check.covers if n not in traced]


def _main(argv=None) -> int:
    import argparse
    import json
    from .registry import base_of, select
    ap = argparse.ArgumentParser(prog="python -m dstar_edu.verify.tracing",
                                 description="Propose each check's covers list from one traced run, or confirm it.")
    ap.add_argument("-k", dest="pattern", default=None, help="only checks whose id contains PATTERN")
    ap.add_argument("--json", action="store_true", help="print every traced call (counts, direct calls) as JSON")
    ap.add_argument("--confirm", action="store_true",
                    help="exit 1 unless every check calls each function its covers list names")
    args = ap.parse_args(argv)
    out, missing = {}, {}
    for c in select(args.pattern):
        if args.json:
            out.setdefault(base_of(c), {}).update(traced_calls(c))
        elif args.confirm:
            gone = uncalled(c)
            if gone:
                missing[c.id] = gone
            print(f"{'ok' if not gone else 'MISSING':8} {c.id}" + (f": {gone}" if gone else ""))
        else:
            print(c.id, propose(c))
    if args.json:
        print(json.dumps(out, indent=1))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(_main())
