"""The graded exercises of the distill and align areas (moved here from test_distill_objectives.py and
test_alignment.py when the grader gained guards): references pass, catalogued mistakes are diagnosed."""
import contextlib

import pytest
import torch

from dstar_edu.exercises import core


@pytest.fixture(autouse=True)
def _instructor_mode(monkeypatch):
    """Grading the reference itself is a cheat for a student (tests/test_exercises_cheats.py); here it is the test."""
    monkeypatch.setattr(core, "_guarded", lambda exercise: contextlib.nullcontext())
    core._FAILURES.clear()


# ---- graded exercises (dstar_edu.exercises, area distill) ----------------------------------------------------------
def test_exercise_references_pass_and_catalogued_mistakes_are_diagnosed(capsys):
    from dstar_edu import exercises as ex
    assert ex.list_exercises("distill") == ["pseudo_huber_grad", "huber_grad", "sim_loss"]
    for name in ex.list_exercises("distill"):
        assert ex.check(name, ex.reference(name)) is True
        assert "\nCorrect!" in capsys.readouterr().out
        for wrong, why in ex.EXERCISES[name].mistakes:
            assert ex.check(name, wrong) is False
            out = capsys.readouterr().out
            assert f"Likely mistake: {why}" in out and "Hint" in out


def test_exercise_student_errors_are_reported(capsys):
    from dstar_edu import exercises as ex

    def stub(*args):
        raise NotImplementedError
    assert ex.check("sim_loss", stub) is False
    assert "Not implemented yet" in capsys.readouterr().out
    assert ex.check("pseudo_huber_grad", lambda y, c: None) is False
    assert "return" in capsys.readouterr().out
    assert ex.check("pseudo_huber_grad", lambda y, c: y[0]) is False
    assert "Wrong shape" in capsys.readouterr().out

    def no_grad_loss(x0, eps, alpha, sigma, teacher_score, fake_score, c):
        with torch.no_grad():
            return (fake_score(alpha * x0 + sigma * eps) ** 2).mean()
    assert ex.check("sim_loss", no_grad_loss) is False
    assert "does not depend on x0" in capsys.readouterr().out
    assert ex.check("huber_grad", "not a function") is False
    assert "Not a function" in capsys.readouterr().out
    with pytest.raises(ValueError, match="name='sim' is unknown"):
        ex.describe("sim")
    ex.describe("sim_loss")
    assert "def my_sim_loss(x0, eps, alpha, sigma, teacher_score, fake_score, c):" in capsys.readouterr().out
    a, b = ex.sample_inputs("huber_grad", 2, seed=4), ex.sample_inputs("huber_grad", 2, seed=4)
    assert all(torch.equal(u["y"], v["y"]) for u, v in zip(a, b))




# ---- graded exercises (dstar_edu.exercises, area align) -------------------------------------------------------
@pytest.mark.parametrize("name", ["cfg_implicit_reward_loss", "guided_score", "dpo_loss", "drwr_weights"])
def test_exercise_reference_passes_and_every_catalogued_mistake_is_diagnosed(name, capsys):
    from dstar_edu import exercises as ex
    assert ex.check(name, ex.reference(name)) is True
    assert "\nCorrect!" in capsys.readouterr().out
    for wrong, why in ex.EXERCISES[name].mistakes:
        assert ex.check(name, wrong) is False
        assert f"Likely mistake: {why}" in capsys.readouterr().out


def test_exercise_grader_reports_instead_of_raising(capsys):
    from dstar_edu import exercises as ex

    def stub(x_t, score, cond, weight):
        raise NotImplementedError
    assert ex.check("cfg_implicit_reward_loss", stub) is False
    assert "Not implemented yet" in capsys.readouterr().out
    assert ex.check("cfg_implicit_reward_loss", lambda x_t, score, cond, weight: x_t.detach().sum()) is False
    assert "does not depend on x_t" in capsys.readouterr().out
    assert ex.check("guided_score", lambda a, b, c: None) is False
    assert "return" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown"):
        ex.check("nope", lambda: None)
