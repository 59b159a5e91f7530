"""Theorem verification: a registry of checks that the CLI, the tests and the notebooks all read."""
from .registry import (DIMS, REGISTRY, CheckResult, erratum, identity, monte_carlo, register, run_check,
                       run_checks, select)
from .report import errata_markdown, format_table, run_and_report

__all__ = ["DIMS", "REGISTRY", "CheckResult", "erratum", "identity", "monte_carlo", "register", "run_check",
           "run_checks", "select", "errata_markdown", "format_table", "run_and_report", "verify"]


def verify(pattern: str, show: bool = True) -> list[dict]:
    """Run the checks whose id contains ``pattern`` and (in a notebook) print their table."""
    results = run_checks(pattern)
    if show:
        print(format_table(results))
    return results
