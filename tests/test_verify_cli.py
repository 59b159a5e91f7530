"""The verification registry, its result constructors and the ``dstar-edu`` command line."""
import json
import math
import uuid

import pytest
import torch

from dstar_edu.cli import main
from dstar_edu.verify import registry
from dstar_edu.verify.registry import REGISTRY, erratum, identity, monte_carlo, register, run_check, select

KEYS = {"id", "title", "source", "kind", "dim", "passed", "abs_err", "tol", "stderr", "seconds"}


@pytest.fixture
def temp_check():
    """Register checks under unique test ids and remove them afterwards."""
    added = []

    def add(fn, title="test-only check", source="tests", dims=(None,), printed="", corrected=""):
        base = f"zz_test_only.{uuid.uuid4().hex}"
        select()                                     # load the real checks first
        register(base, title, source, dims=dims, printed=printed, corrected=corrected)(fn)
        ids = [base] if dims == (None,) else [f"{base}.{d}d" for d in dims]
        added.extend(ids)
        return base

    yield add
    for cid in added:
        REGISTRY.pop(cid, None)


def test_list_prints_every_registered_id(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert len(REGISTRY) > 0
    assert sorted(listed) == sorted(REGISTRY)
    for line in out.splitlines():                    # each line also names the seed source
        cid = line.split()[0]
        assert line.rstrip().endswith(REGISTRY[cid].source)


def test_verify_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["verify", "-k", "basics.posterior_forms", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert sorted(r["id"] for r in results) == ["basics.posterior_forms.2d", "basics.posterior_forms.3072d"]
    for r in results:
        assert KEYS <= set(r)
        assert r["dim"] == {"basics.posterior_forms.2d": 2, "basics.posterior_forms.3072d": 3072}[r["id"]]
        assert r["passed"] is True and r["kind"] == "identity"
        assert r["abs_err"] <= r["tol"] and r["stderr"] is None and r["seconds"] >= 0
        assert r["source"] == REGISTRY[r["id"]].source and r["title"] == REGISTRY[r["id"]].title
    out = capsys.readouterr().out
    assert "2 passed, 0 failed" in out


def test_failing_check_returns_1(temp_check, tmp_path, capsys):
    cid = temp_check(lambda: identity(torch.tensor(1.0), torch.tensor(1.5), rtol=0.0, atol=0.1))
    path = tmp_path / "r.json"
    assert main(["verify", "-k", cid, "--json", str(path)]) == 1
    (r,) = json.loads(path.read_text())
    assert r["id"] == cid and r["passed"] is False
    assert r["abs_err"] == pytest.approx(0.5) and r["tol"] == pytest.approx(0.1)
    assert "0 passed, 1 failed" in capsys.readouterr().out


def test_raising_check_is_reported_failed(temp_check, tmp_path, capsys):
    msg = f"deliberate failure {uuid.uuid4().hex}"

    def boom():
        raise RuntimeError(msg)

    cid = temp_check(boom)
    path = tmp_path / "r.json"
    assert main(["verify", "-k", cid, "--json", str(path)]) == 1
    (r,) = json.loads(path.read_text())
    assert r["passed"] is False and f"RuntimeError: {msg}" in r["error"]
    assert f"RuntimeError: {msg}" in capsys.readouterr().out     # the table shows the first error line
    # run_check directly: same verdict, NaN error and tolerance
    res = run_check(REGISTRY[cid])
    assert res["passed"] is False and math.isnan(res["abs_err"]) and msg in res["error"]


def test_check_returning_wrong_type_fails(temp_check):
    cid = temp_check(lambda: 0.0)
    res = run_check(REGISTRY[cid])
    assert res["passed"] is False and "returned float, not CheckResult" in res["error"]


def test_dims_register_one_check_per_dimension(temp_check):
    seen = []
    base = temp_check(lambda dim: (seen.append(dim), identity(torch.ones(dim), torch.ones(dim)))[1], dims=(2, 3072))
    ids = [c.id for c in select(base)]
    assert ids == [f"{base}.2d", f"{base}.3072d"]
    assert [run_check(REGISTRY[i])["dim"] for i in ids] == [2, 3072] and seen == [2, 3072]
    with pytest.raises(ValueError, match="registered twice"):
        register(base, "dup", "tests", dims=(2,))(lambda dim: None)


def test_verify_nonexistent_pattern_returns_2(capsys):
    assert main(["verify", "-k", "nonexistent_check_id_xyz"]) == 2
    assert "no check id contains 'nonexistent_check_id_xyz'" in capsys.readouterr().err


def test_errata_markdown_has_every_erratum(capsys):
    assert main(["errata"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Errata")
    # every registered check that carries a printed formula is an erratum entry ...
    bases = {c.id.rsplit(".", 1)[0] if c.dim is not None else c.id for c in select() if c.printed}
    # ... and, running the basics checks (2D and dimensionless ones; the 3072d twins share the base),
    # a check returns an erratum-kind result exactly when it carries printed/corrected formulas
    for c in select("basics."):
        if c.dim in (None, 2):
            res = run_check(c)
            assert (res["kind"] == "erratum") == bool(c.printed and c.corrected), c.id
    assert "basics.eq12_denominator" in bases
    sections = out.split("\n## ")[1:]
    listed = {}
    for sec in sections:
        for line in sec.splitlines():
            if line.startswith("- check: `"):
                listed[line[len("- check: `"):-1]] = sec
    assert set(listed) == bases
    for base in bases:
        c = next(c for c in select(base) if c.printed)
        sec = listed[base]
        assert sec.startswith(f"{c.source}: {c.title}")
        assert f"- as printed: {c.printed}" in sec and f"- what holds: {c.corrected}" in sec


# ---- result constructors on hand-made numbers --------------------------------------------------------------
def test_identity_constructor():
    f64 = dict(dtype=torch.float64)
    r = identity(torch.tensor([1.0, 2.0], **f64), torch.tensor([1.0, 2.0 + 1e-11], **f64), rtol=1e-11, atol=0.0)
    assert r.passed and r.kind == "identity" and r.abs_err == pytest.approx(1e-11, rel=1e-4)
    assert r.tol == pytest.approx(2e-11)                 # atol + rtol * max|rhs|
    r = identity(torch.tensor([1.0, 2.0], **f64), torch.tensor([1.0, 2.0 + 3e-11], **f64), rtol=1e-11, atol=0.0)
    assert not r.passed and r.abs_err == pytest.approx(3e-11, rel=1e-4)
    r = identity(torch.tensor(0.0), torch.tensor(0.05), rtol=0.0, atol=0.1)
    assert r.passed and r.tol == pytest.approx(0.1)
    assert not identity(torch.tensor(math.nan), torch.tensor(0.0), atol=1.0).passed
    assert not identity(torch.tensor(math.inf), torch.tensor(0.0), atol=1.0).passed
    with pytest.raises(ValueError, match=r"lhs shape \(2,\) != rhs shape \(3,\)"):
        identity(torch.zeros(2), torch.zeros(3))


def test_monte_carlo_constructor():
    r = monte_carlo(4.9, 0.0, 1.0)
    assert r.passed and r.kind == "monte_carlo" and r.details["max_z"] == pytest.approx(4.9)
    assert r.tol == pytest.approx(5.0) and r.stderr == pytest.approx(1.0) and r.abs_err == pytest.approx(4.9)
    assert not monte_carlo(5.1, 0.0, 1.0).passed
    assert not monte_carlo(-5.1, 0.0, 1.0).passed
    assert monte_carlo(10.0 + 0.49, 10.0, 0.1).passed and not monte_carlo(10.0 + 0.51, 10.0, 0.1).passed
    # elementwise standard errors: z is taken per element (2.0/0.5 = 4 passes; 0.3/0.05 = 6 fails)
    assert monte_carlo([2.0, 0.0], [0.0, 0.0], [0.5, 0.05]).passed
    r = monte_carlo([2.0, 0.3], [0.0, 0.0], [0.5, 0.05])
    assert not r.passed and r.details["max_z"] == pytest.approx(6.0)
    assert monte_carlo(2.9, 0.0, 1.0, n_sigma=3).passed and not monte_carlo(3.1, 0.0, 1.0, n_sigma=3).passed
    assert not monte_carlo(math.nan, 0.0, 1.0).passed


def test_erratum_constructor():
    good = identity(torch.tensor(1.0), torch.tensor(1.0))
    bad = identity(torch.tensor(1.0), torch.tensor(2.0))
    r = erratum(bad, good)
    assert r.passed and r.kind == "erratum"
    assert r.abs_err == good.abs_err and r.details["printed_abs_err"] == pytest.approx(1.0)
    assert r.details["printed_passed"] is False and r.details["corrected_kind"] == "identity"
    assert not erratum(good, good).passed           # the printed form holds: no erratum
    assert not erratum(bad, bad).passed             # the correction fails too
    assert not erratum(good, bad).passed
    mc = erratum(monte_carlo(8.0, 0.0, 1.0), monte_carlo(1.0, 0.0, 1.0))
    assert mc.passed and mc.stderr == pytest.approx(1.0) and mc.details["corrected_kind"] == "monte_carlo"


def test_dims_constant():
    assert registry.DIMS == (2, 3072)
