"""Theorem verification: a registry of checks that the CLI, the tests and the notebooks all read.

Names are imported lazily (PEP 562), so that ``dstar_edu.verify.index`` (behind ``dstar-edu list``)
loads without torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    **{name: "registry" for name in ("DIMS", "REGISTRY", "CheckResult", "NoCheckMatches", "check_generator",
                                     "erratum", "identity", "monte_carlo", "register", "run_check", "run_checks",
                                     "select")},
    **{name: "report" for name in ("errata_markdown", "format_table", "run_and_report")},
}

__all__ = [*_LAZY, "verify"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


def verify(pattern: str, show: bool = True, seed: int = 0) -> list[dict]:
    """Run the checks whose id contains ``pattern`` and (in a notebook) print their table.

    Raises ``NoCheckMatches`` when no id contains ``pattern`` (a notebook can never pass on an empty
    result); ``seed`` re-draws every random input (0 = the registered numbers).
    """
    from .registry import run_checks
    from .report import format_table
    results = run_checks(pattern, seed=seed)
    if show:
        print(format_table(results))
    return results
