import contextlib
import math

import pytest
import torch

from dstar_edu import conversions as cv
from dstar_edu import exercises as ex
from dstar_edu.exercises import core
from dstar_edu.process import DDPM

NAMES = ex.list_exercises("basics")


@pytest.fixture(autouse=True)
def _instructor_mode(monkeypatch):
    """These tests grade the reference and the catalogued mistakes as if they were answers, which the guards
    forbid a student (tests/test_exercises_cheats.py proves that); here the guards are off and the hint level is
    reset, so every test sees a first failure."""
    monkeypatch.setattr(core, "_guarded", lambda exercise: contextlib.nullcontext())
    core._FAILURES.clear()


def test_registry_has_the_required_exercises():
    assert {"tweedie_x0", "posterior_mean_ddpm", "v_prediction", "score_from_eps"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes(name, capsys):
    assert ex.check(name, ex.reference(name)) is True
    out = capsys.readouterr().out
    assert out.startswith(f"Grading {name!r} on fresh problems, seed ") and "\nCorrect!" in out


@pytest.mark.parametrize("name", NAMES)
def test_every_catalogued_mistake_fails_with_its_diagnosis(name, capsys):
    for wrong, why in ex.EXERCISES[name].mistakes:
        assert ex.check(name, wrong) is False
        out = capsys.readouterr().out
        assert f"Likely mistake: {why}" in out
        assert "max |got - expected|" in out and "expected" in out and "Hint" in out


def test_trials_cover_points_images_and_shared_t():
    trials = ex.sample_inputs("tweedie_x0", n_trials=5)
    shapes = [tuple(d["x_t"].shape) for d in trials]
    assert any(len(s) == 2 and s[1] == 2 for s in shapes)
    assert any(s[1:] == (3, 32, 32) for s in shapes)
    assert any(d["alpha_bar"].ndim == 0 for d in trials)
    assert all(v.dtype == torch.float64 for d in trials for v in d.values())


def test_tweedie_typical_mistakes(capsys):
    def no_sqrt(x_t, eps_hat, alpha_bar):
        return (x_t - (1 - alpha_bar) * eps_hat) / alpha_bar

    assert not ex.check("tweedie_x0", no_sqrt)
    out = capsys.readouterr().out
    assert "Not yet" in out and "square roots are missing" in out and "trial 1/5" in out

    def plus_sign(x_t, eps_hat, alpha_bar):
        return (x_t + torch.sqrt(1 - alpha_bar) * eps_hat) / torch.sqrt(alpha_bar)

    assert not ex.check("tweedie_x0", plus_sign)
    assert "sign error" in capsys.readouterr().out


def test_posterior_mean_per_step_alpha_hint(capsys):
    def used_alpha_bar(x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev):
        return (torch.sqrt(alpha_bar_prev) * (1 - alpha_bar_t) * x0_hat
                + torch.sqrt(alpha_bar_t) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t)

    assert not ex.check("posterior_mean_ddpm", used_alpha_bar)
    out = capsys.readouterr().out
    assert "did you use alpha_bar_t or the per-step alpha_t?" not in out      # hint 2 waits for a second try
    assert not ex.check("posterior_mean_ddpm", used_alpha_bar)
    out += capsys.readouterr().out
    assert "did you use alpha_bar_t or the per-step alpha_t?" in out
    assert "per-step alpha_t belongs" in out


def test_posterior_mean_matches_library_eq10():
    """The Eq. 8 mean written in exercises/basics.py agrees with the Eq. 9 (eps) form via Tweedie (Eq. 7)."""
    p = DDPM(1000)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([2, 50, 700], dtype=torch.float64)
    x_t = torch.randn(3, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, generator=g, dtype=torch.float64)
    a = p.step_alpha(t)[:, None]
    ab, abp = p.alpha_bars[t.long()][:, None], p.alpha_bars[t.long() - 1][:, None]
    x0 = cv.x0_from_eps(x_t, eps, ab.sqrt(), (1 - ab).sqrt())
    eq9_mean = x_t / a.sqrt() - (1 - a) / ((1 - ab).sqrt() * a.sqrt()) * eps
    torch.testing.assert_close(ex.ddpm_posterior_mean(x_t, x0, a, ab, abp), eq9_mean, rtol=1e-12, atol=1e-12)


def test_v_sign_hint(capsys):
    assert not ex.check("v_prediction", lambda x0, eps, ab: torch.sqrt(ab) * eps - torch.sqrt(1 - ab) * x0)
    assert "opposite sign" in capsys.readouterr().out


def test_score_missing_sqrt_hint(capsys):
    assert not ex.check("score_from_eps", lambda eps_hat, ab: -eps_hat / (1 - ab))
    assert "standard deviation" in capsys.readouterr().out


def test_unlisted_wrong_answer_gets_generic_hint(capsys):
    ref = ex.reference("tweedie_x0")
    assert not ex.check("tweedie_x0", lambda *a: 1.01 * ref(*a))
    out = capsys.readouterr().out
    assert "Likely mistake" not in out and "Hint 1 (re-read handbook Eq. 7)" in out
    # a uniform 1 % scale error is named as such (a property, not the formula), and the next failure adds hint 2
    assert "an overall constant factor is off" in out and "times 1.01" in out and "Hint 2" not in out
    assert not ex.check("tweedie_x0", lambda *a: 1.01 * ref(*a))
    assert "Hint 2: Eq. 6 scales x0" in capsys.readouterr().out


def test_float32_result_is_flagged(capsys):
    ref = ex.reference("tweedie_x0")
    assert not ex.check("tweedie_x0", lambda *a: ref(*a).float())
    assert "float32" in capsys.readouterr().out


def test_exceptions_are_reported_not_raised(capsys):
    def uses_math_sqrt(x_t, eps_hat, alpha_bar):
        return (x_t - math.sqrt(1 - alpha_bar) * eps_hat) / math.sqrt(alpha_bar)

    assert ex.check("tweedie_x0", uses_math_sqrt) is False
    out = capsys.readouterr().out
    assert "raised" in out and "torch.sqrt" in out and "Hint" in out

    def stub(x_t, eps_hat, alpha_bar):
        raise NotImplementedError

    assert ex.check("tweedie_x0", stub) is False
    assert "Not implemented yet" in capsys.readouterr().out

    def wrong_arity(x_t):
        return x_t

    assert ex.check("tweedie_x0", wrong_arity) is False
    assert "TypeError" in capsys.readouterr().out


def test_bad_return_values_are_reported(capsys):
    assert ex.check("score_from_eps", lambda eps_hat, ab: None) is False
    assert "return" in capsys.readouterr().out
    assert ex.check("score_from_eps", lambda eps_hat, ab: (-eps_hat / torch.sqrt(1 - ab))[0]) is False
    assert "Wrong shape" in capsys.readouterr().out
    assert ex.check("score_from_eps", lambda eps_hat, ab: eps_hat[None] * 0) is False
    assert "broadcasts along a new axis" in capsys.readouterr().out
    assert ex.check("score_from_eps", "not a function") is False
    assert "Not a function" in capsys.readouterr().out
    assert ex.check("score_from_eps", lambda eps_hat, ab: eps_hat / 0 * 0) is False
    assert "NaN" in capsys.readouterr().out


def test_unknown_name_raises_with_allowed_names():
    for fn in (ex.describe, ex.reference):
        with pytest.raises(ValueError) as err:
            fn("tweedie")
        assert all(n in str(err.value) for n in NAMES)
    with pytest.raises(ValueError, match="tweedie_x0"):
        ex.check("no_such_exercise", lambda *a: None)


def test_describe_prints_prompt_and_signature(capsys):
    ex.describe("posterior_mean_ddpm")
    out = capsys.readouterr().out
    assert "Eq. 8" in out
    assert "def my_posterior_mean_ddpm(x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev):" in out
    assert "1e-08" in out


def test_seeds_are_deterministic(capsys):
    a, b, c = (ex.sample_inputs("posterior_mean_ddpm", 4, seed=s) for s in (7, 7, 8))
    for da, db in zip(a, b):
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    assert not all(torch.equal(da["x_t"], dc["x_t"]) for da, dc in zip(a, c) if da["x_t"].shape == dc["x_t"].shape)

    seen = []

    def recorder(x_t, eps_hat, alpha_bar):
        seen.append(x_t.clone())
        return ex.reference("tweedie_x0")(x_t, eps_hat, alpha_bar)

    assert ex.check("tweedie_x0", recorder, n_trials=3, seed=5)
    first = seen[:]
    seen.clear()
    assert ex.check("tweedie_x0", recorder, n_trials=3, seed=5)
    assert len(first) == 3 and all(torch.equal(u, v) for u, v in zip(first, seen))
    assert all(torch.equal(u, d["x_t"]) for u, d in zip(first, ex.sample_inputs("tweedie_x0", 3, seed=5)))

    failed = [ex.check("tweedie_x0", lambda *a: 1.01 * ex.reference("tweedie_x0")(*a), seed=5) for _ in range(2)]
    outs = [o.split("Hint 1")[0] for o in capsys.readouterr().out.split("Not yet")]
    assert failed == [False, False] and outs[1] == outs[2]


def test_student_cannot_corrupt_reference_inputs():
    def in_place(x_t, eps_hat, alpha_bar):
        x_t -= torch.sqrt(1 - alpha_bar) * eps_hat
        return x_t.div_(torch.sqrt(alpha_bar))

    assert ex.check("tweedie_x0", in_place)
