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


def test_list_prints_every_registered_id_title_and_source(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    select()                                         # the live registry (list may have read the static index)
    assert len(REGISTRY) > 0
    assert sorted(listed) == sorted(REGISTRY)
    for line in out.splitlines():                    # each line also names the title and the seed source
        cid = line.split()[0]
        assert REGISTRY[cid].title in line and line.rstrip().endswith(f"[{REGISTRY[cid].source}]")


def test_static_index_matches_the_registry():
    """``dstar-edu list`` reads a tracked index (no torch import); it must equal the live registry."""
    from dstar_edu.verify.index import INDEX_PATH, build_index
    stored = json.loads(INDEX_PATH.read_text())
    assert stored == build_index(), "regenerate it: python -m dstar_edu.verify.index"


def _cli(*args, **kw):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "dstar_edu.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_cli_list_without_torch_and_no_args_prints_help():
    import subprocess
    import sys
    code = ("import sys; from dstar_edu.cli import main; rc = main(['list', '-k', 'tweedie']); "
            "assert 'torch' not in sys.modules, 'list imported torch'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "basics.tweedie" in run.stdout
    run = _cli()
    assert run.returncode == 0 and "usage: dstar-edu" in run.stdout and "verify" in run.stdout
    assert "``" not in run.stdout                    # plain text, not reStructuredText
    assert _cli("list", "-k", "no-such-check-id").returncode == 2


def test_closed_pipe_is_not_a_traceback():
    """``dstar-edu errata | head -1``: the reader stops early; no BrokenPipeError traceback."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "dstar_edu.cli", "errata"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                              # like head: close after the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_bad_json_path_fails_before_any_check_runs(tmp_path):
    run = _cli("verify", "--json", str(tmp_path / "no_such_dir" / "out.json"))
    assert run.returncode == 2
    assert "--json" in run.stderr and "no_such_dir" in run.stderr and "Traceback" not in run.stderr
    assert "passed" not in run.stdout               # nothing ran


def test_verify_without_match_raises_and_cli_exits_2(tmp_path):
    from dstar_edu.verify import NoCheckMatches, verify
    with pytest.raises(NoCheckMatches, match="nothing-matches"):
        verify("nothing-matches")
    path = tmp_path / "r.json"
    assert main(["verify", "-k", "nothing-matches", "--json", str(path)]) == 2
    assert not path.exists()                         # no empty results file left behind


def test_seed_redraws_monte_carlo_and_keeps_identities(capsys):
    from dstar_edu.verify import run_checks
    base = {r["id"]: r for r in run_checks("basics.forward_chaining_mc.2d")}
    again = {r["id"]: r for r in run_checks("basics.forward_chaining_mc.2d", seed=0)}
    other = {r["id"]: r for r in run_checks("basics.forward_chaining_mc.2d", seed=3)}
    (cid,) = base
    assert base[cid]["abs_err"] == again[cid]["abs_err"]          # seed 0 = the registered draw, exactly
    assert other[cid]["abs_err"] != base[cid]["abs_err"] and other[cid]["seed"] == 3
    assert other[cid]["passed"]
    with pytest.raises(ValueError, match="seed=-1 must be a non-negative integer"):
        run_checks("basics.forward_chaining_mc.2d", seed=-1)
    assert main(["verify", "-k", "basics.forward_chaining_mc.2d", "--seed", "3"]) == 0
    assert "1 passed" in capsys.readouterr().out


def test_failure_line_says_why(temp_check, capsys):
    from dstar_edu.verify.report import format_table
    ident = temp_check(lambda: identity(torch.tensor(1.0), torch.tensor(1.5), rtol=0.0, atol=0.1, data="2D toy"))
    mc = temp_check(lambda: monte_carlo(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.1)))
    err = temp_check(lambda: erratum(identity(1.0, 1.0), identity(1.0, 1.0)))
    results = [run_check(REGISTRY[c]) for c in (ident, mc, err)]
    table = format_table(results)
    assert "why: lhs 1 vs rhs 1.5: |lhs - rhs| = 5.00e-01 > tol 1.00e-01; data: 2D toy" in table
    assert "max z = 1.00e+01 > 5.0 standard errors" in table
    assert "the formula as printed passed" in table


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
