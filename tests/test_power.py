"""Power of the registry: every check has a counterfactual (one deliberate error) that it rejects by the
required margin (``dstar-edu verify --power``); and the mechanism itself (``mutate``, margins, the CLI)."""
import json
import math
import uuid

import pytest
import torch

from dstar_edu.cli import main
from dstar_edu.verify.registry import (POWER_IDENTITY, POWER_ORDER, POWER_SIGMAS, REGISTRY, identity, monte_carlo,
                                       mutate, mutating, register, run_power, select)

CHECKS = select()


@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_counterfactual_margin(check):
    """The counterfactual run only (the check itself is test_checks.py's job; an erratum check runs once)."""
    r = run_power(check)
    assert r["mutations"] > 0, f"{check.id} has no counterfactual: it never calls mutate() / mutating()"
    assert r["margin"] >= r["required"], (
        f"{check.id}: its counterfactual ({r['kind']}) misses by {r['margin']:.3g}, required {r['required']:.3g}; "
        f"error={r.get('error')}")


def test_every_check_kind_has_its_threshold():
    assert (POWER_IDENTITY, POWER_SIGMAS, POWER_ORDER) == (1000.0, 10.0, 5.0)


@pytest.fixture
def temp_check():
    added = []

    def add(fn, printed="", corrected=""):
        cid = f"zz_test_power.{uuid.uuid4().hex}"
        select()
        register(cid, "test-only check", "tests", printed=printed, corrected=corrected)(fn)
        added.append(cid)
        return cid

    yield add
    for cid in added:
        REGISTRY.pop(cid, None)


def test_mutate_is_the_identity_outside_a_counterfactual():
    assert mutate(1.0, 2.0) == 1.0 and mutating() is False


def test_identity_margin_is_error_over_tolerance(temp_check):
    cid = temp_check(lambda: identity(torch.tensor(mutate(1.0, 1.5)), torch.tensor(1.0), rtol=0.0, atol=1e-4))
    r = run_power(REGISTRY[cid])
    assert r["kind"] == "identity" and r["mutations"] == 1 and r["ok"]
    assert r["margin"] == pytest.approx(0.5 / 1e-4) and r["required"] == POWER_IDENTITY
    # a counterfactual that misses by only 100 tolerances is weak
    weak = temp_check(lambda: identity(torch.tensor(mutate(1.0, 1.01)), torch.tensor(1.0), rtol=0.0, atol=1e-4))
    r = run_power(REGISTRY[weak])
    assert r["margin"] == pytest.approx(100.0) and not r["ok"]


def test_monte_carlo_margin_is_z(temp_check):
    cid = temp_check(lambda: monte_carlo(torch.tensor([mutate(0.0, 0.3), 0.0]), torch.zeros(2),
                                         torch.tensor([0.02, 0.02])))
    r = run_power(REGISTRY[cid])
    assert r["kind"] == "monte_carlo" and r["margin"] == pytest.approx(15.0) and r["ok"]


def test_order_check_margin_and_non_convergence(temp_check):
    cid = temp_check(lambda: identity(torch.tensor(mutate(1.0, 0.2)), torch.tensor(1.0), rtol=0.0, atol=0.1,
                                      order=1.0))
    r = run_power(REGISTRY[cid])
    assert r["required"] == POWER_ORDER and r["margin"] == pytest.approx(8.0) and r["ok"]
    # errors that stop shrinking give a NaN order: no order at all, an infinite miss
    nan = temp_check(lambda: identity(torch.tensor(mutate(1.0, math.nan)), torch.tensor(1.0), rtol=0.0, atol=0.1,
                                      order=1.0))
    assert run_power(REGISTRY[nan])["margin"] == math.inf


def test_check_without_counterfactual_is_flagged(temp_check):
    cid = temp_check(lambda: identity(torch.tensor(1.0), torch.tensor(1.0)))
    r = run_power(REGISTRY[cid])
    assert r["mutations"] == 0 and not r["ok"]


def test_erratum_margin_is_the_printed_formula(temp_check):
    from dstar_edu.verify.registry import erratum
    cid = temp_check(lambda: erratum(identity(torch.tensor(2.0), torch.tensor(1.0), rtol=0.0, atol=1e-6),
                                     identity(torch.tensor(1.0), torch.tensor(1.0), rtol=0.0, atol=1e-6)),
                     printed="x = 2", corrected="x = 1")
    r = run_power(REGISTRY[cid])
    assert r["kind"] == "erratum" and r["margin"] == pytest.approx(1e6) and r["ok"]


def test_crashing_counterfactual_has_no_margin(temp_check):
    def fn():
        if mutating():
            raise RuntimeError("deliberate")
        return identity(torch.tensor(1.0), torch.tensor(1.0))
    r = run_power(REGISTRY[temp_check(fn)])
    assert not r["ok"] and math.isnan(r["margin"]) and "deliberate" in r["error"]
    assert mutate(1, 2) == 1                # the switch is off again after the crash


def test_cli_power(temp_check, tmp_path, capsys):
    good = temp_check(lambda: identity(torch.tensor(mutate(1.0, 2.0)), torch.tensor(1.0), rtol=0.0, atol=1e-6))
    path = tmp_path / "p.json"
    assert main(["verify", "--power", "-k", good, "--json", str(path)]) == 0
    (r,) = json.loads(path.read_text())
    assert r["passed"] and r["power"]["ok"] and r["power"]["margin"] == pytest.approx(1e6)
    out = capsys.readouterr().out
    assert "1 with a counterfactual at the required margin, 0 weak" in out
    weak = temp_check(lambda: identity(torch.tensor(1.0), torch.tensor(1.0)))
    assert main(["verify", "--power", "-k", weak]) == 1
    assert "no counterfactual" in capsys.readouterr().out
