"""Every check names the library functions it exercises; ``dstar-edu list --covers / --function`` answer from them."""
import importlib
import subprocess
import sys

import pytest

from dstar_edu.cli import main
from dstar_edu.verify.covers import COVERS
from dstar_edu.verify.registry import REGISTRY, Erratum, base_of, identity, register, register_errata, run_check, select
from dstar_edu.verify.tracing import traced_calls


def _resolve(name: str):
    """The object a dotted name stands for: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_every_check_covers_library_callables():
    checks = select()
    assert len(checks) > 200
    for c in checks:
        assert c.covers, f"check {c.id} names no library function it covers (add it to dstar_edu/verify/covers.py)"
        for name in c.covers:
            assert name.startswith("dstar_edu.") and not name.startswith("dstar_edu.verify"), (c.id, name)
            obj = _resolve(name)
            assert callable(obj) or isinstance(obj, property), f"{c.id}: {name} is not callable"
    assert set(COVERS) == {base_of(c) for c in checks}, "covers.py lists a check id that is not registered"


def test_a_covered_name_that_does_not_resolve_fails():
    """The resolution above is a real test: a misspelt name raises."""
    with pytest.raises(AttributeError):
        _resolve("dstar_edu.samplers.diffusion.ddim_stepp")


#: one fast check per check module (and both erratum checks whose corrected side was rewired to the library)
SAMPLE = ["basics.tweedie.2d", "basics.forward_chaining", "samplers.ddim_eta1_is_ddpm.2d", "samplers.dpm_solver1_is_ddim.2d",
          "samplers.trigflow_step_is_ddim.2d", "training.esm_ism.2d", "distill.table4_grads.2d",
          "distill.alpha_power_text.2d", "distill.fgm_conditional_field.2d", "align.kl_optimum", "guards.npo_guidance",
          "distill.traj.pd_halving", "samplers.parallel.parareal.2d", "samplers.alg1_mean.2d", "samplers.alg3_mean.2d"]


@pytest.mark.parametrize("cid", SAMPLE)
def test_check_calls_what_it_covers(cid):
    select()
    traced = traced_calls(REGISTRY[cid])
    missing = [n for n in REGISTRY[cid].covers if n not in traced]
    assert not missing, f"{cid} names {missing} but never calls them (called: {sorted(traced)})"


def test_tracer_names_called_functions_only():
    """The tracer's own reference: a check that calls exactly ``ddim_sigma`` (and not ``ddim_step``)."""
    from dstar_edu.samplers.diffusion import ddim_sigma
    select()
    cid = "zz_test_only.tracer"
    register(cid, "test-only", "tests", covers=())(lambda: identity(ddim_sigma(0.5, 0.8, 1.0), ddim_sigma(0.5, 0.8, 1.0)))
    try:
        traced = traced_calls(REGISTRY[cid])
    finally:
        REGISTRY.pop(cid)
    # two calls, neither direct: the caller is this test module, not verification code
    assert traced["dstar_edu.samplers.diffusion.ddim_sigma"] == {"calls": 2, "direct": 0}
    assert "dstar_edu.samplers.diffusion.ddim_step" not in traced


def _listed(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if line.startswith("  ")]


def test_list_function_gives_the_checks_that_cover_it(capsys):
    name = "dstar_edu.samplers.diffusion.ddim"
    assert main(["list", "--function", name]) == 0
    out = capsys.readouterr().out
    expected = sorted(c.id for c in select() if name in c.covers)
    assert expected and sorted(line.split()[0] for line in out.splitlines()) == expected
    assert main(["list", "--function", "diffusion.ddim"]) == 0          # a unique suffix names it too
    assert capsys.readouterr().out == out


def test_list_covers_goes_equation_to_functions_to_checks(capsys):
    assert main(["list", "--covers", "Eq. 14"]) == 0
    out = capsys.readouterr().out
    listed = set(_listed(out))
    literal = {c.id for c in select() if "Eq. 14" in c.source or "Eq. 14" in c.title}
    # every literal "Eq. 14", the list form "Eq. 10, 14" (ddim_eta1_is_ddpm), and nothing without an Eq. and a 14
    assert literal <= listed and "samplers.ddim_eta1_is_ddpm.2d" in listed - literal
    assert all("Eq" in REGISTRY[c].source + REGISTRY[c].title and "14" in REGISTRY[c].source + REGISTRY[c].title
               for c in listed)
    citing = listed
    functions = [line for line in out.splitlines()[1:] if not line.startswith("  ")]
    assert functions == sorted(set(functions), key=functions.index)     # each function once
    assert set(functions) == {f for c in select() if c.id in citing for f in c.covers}
    assert out.splitlines()[0].startswith(f"'Eq. 14' is cited by {len(citing)} checks")
    # a range "Eq. 8-11" cites Eq. 9; whole numbers only: "Eq. 1" is not "Eq. 14"
    assert main(["list", "--covers", "Eq. 9"]) == 0
    assert "basics.posterior_forms.2d" in _listed(capsys.readouterr().out)      # source "handbook Eq. 8-11"
    assert main(["list", "--covers", "Eq. 1"]) in (0, 2)
    assert not set(_listed(capsys.readouterr().out)) & citing
    # with its document: only the checks whose handbook part (or title) cites it
    assert main(["list", "--covers", "handbook Eq. 14"]) == 0
    handbook = set(_listed(capsys.readouterr().out))
    assert "samplers.alg3_mean.2d" in handbook and "guards.diffusion_dpo" in citing - handbook   # Wallace et al. Eq. 14


def test_list_no_match_names_the_argument_and_the_closest(capsys):
    assert main(["list", "--covers", "Eq. 999"]) == 2
    err = capsys.readouterr().err
    assert "--covers 'Eq. 999'" in err and "closest citations: 'Eq. 9" in err
    assert main(["list", "--function", "dstar_edu.samplers.diffusion.ddim_stepp"]) == 2
    err = capsys.readouterr().err
    assert "--function 'dstar_edu.samplers.diffusion.ddim_stepp'" in err
    assert "dstar_edu.samplers.diffusion.ddim_step" in err


def test_list_covers_without_torch():
    code = ("import sys; from dstar_edu.cli import main; rc = main(['list', '--covers', 'Eq. 14']); "
            "rc = rc or main(['list', '--function', 'diffusion.ddim_step']); "
            "assert 'torch' not in sys.modules, 'list imported torch'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "dstar_edu.samplers.diffusion.ddim_step" in run.stdout


def test_erratum_record_passes_only_when_printed_fails_and_library_holds():
    """``Erratum`` turns data into a check: x0_hat by Eq. 7 (library ``x0_from_eps``) against the true x0."""
    import torch
    from dstar_edu.conversions import x0_from_eps
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    ab = torch.tensor(0.3, dtype=torch.float64)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def inputs(dim):
        return [dict(x=x, x0=x0, eps=eps, ab=ab)], "seeded vectors"
    select()
    records = {
        "right": dict(library=lambda x, eps, ab, **_: x0_from_eps(x, eps, ab.sqrt(), (1 - ab).sqrt())),
        "wrong_library": dict(library=lambda x, eps, ab, **_: x0_from_eps(x, eps, ab, (1 - ab).sqrt())),
    }
    verdicts = {}
    for name, kw in records.items():
        cid = f"zz_test_only.erratum_{name}"
        register_errata(Erratum(cid, "test-only", "tests", printed="x / ab", corrected="Eq. 7", inputs=inputs,
                                reference=lambda x0, **_: x0, as_printed=lambda x, ab, **_: x / ab, dims=(None,),
                                **kw))
        try:
            verdicts[name] = run_check(REGISTRY[cid])
        finally:
            REGISTRY.pop(cid)
    assert verdicts["right"]["passed"] and verdicts["right"]["abs_err"] < 1e-14
    assert verdicts["right"]["printed"] == "x / ab" and verdicts["right"]["details"]["data"] == "seeded vectors"
    assert not verdicts["wrong_library"]["passed"]
