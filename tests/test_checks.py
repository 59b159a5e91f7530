"""Every registered theorem check runs here, so a failing theorem (or a broken erratum) fails CI."""
import pytest

from dstar_edu.verify import run_check, select
from dstar_edu.verify.report import errata_markdown

CHECKS = select()


@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_check(check):
    result = run_check(check)
    assert result["passed"], (
        f"{check.id} ({check.source}) failed: |err|={result['abs_err']:.3g} > tol={result['tol']:.3g}; "
        f"details={result['details']}; error={result.get('error')}")


def test_errata_file_is_generated_from_registry():
    """ERRATA.md is the output of `dstar-edu errata`; regenerate it with that command when checks change."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "ERRATA.md").read_text()
    assert text.strip() == errata_markdown().strip(), "ERRATA.md is stale: run `dstar-edu errata > ERRATA.md`"
