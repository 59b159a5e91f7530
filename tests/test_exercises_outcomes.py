"""The exercises added for the course: outcome-graded sampler loops and the formula exercises of notebooks 01, 04,
05, 06 and 09. References pass, catalogued mistakes are diagnosed, honest answers pass under the guards, and a
wrong loop gets property feedback (model calls, spread, distance to the exact flow map)."""
import contextlib

import pytest
import torch

from dstar_edu import exercises as ex
from dstar_edu.exercises import core

NEW = ex.list_exercises("samplers") + ex.list_exercises("formulas")


@pytest.fixture
def instructor(monkeypatch):
    monkeypatch.setattr(core, "_guarded", lambda exercise: contextlib.nullcontext())
    core._FAILURES.clear()


@pytest.mark.parametrize("name", NEW)
def test_reference_passes_and_mistakes_are_diagnosed(name, instructor, capsys):
    assert ex.check(name, ex.reference(name), seed=11) is True
    assert "\nCorrect!" in capsys.readouterr().out
    for wrong, why in ex.EXERCISES[name].mistakes:
        assert ex.check(name, wrong, seed=11) is False, why
        assert f"Likely mistake: {why}" in capsys.readouterr().out


def my_ddim(x_T, timesteps, eps_model, alpha_bar):
    x = x_T
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        ab, ab_prev = alpha_bar(t), alpha_bar(t_prev)
        eps = eps_model(x, t)
        x0 = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
        x = torch.sqrt(ab_prev) * x0 + torch.sqrt(1 - ab_prev) * eps
    return x


def test_honest_sampler_loops_pass_under_the_guards(capsys):
    assert ex.check("ddim_sampler", my_ddim)

    def my_euler(x_1, timesteps, velocity_model):
        x = x_1
        for t, t_next in zip(timesteps[:-1], timesteps[1:]):
            x = x + (t_next - t) * velocity_model(x, t)
        return x
    assert ex.check("rf_euler_sampler", my_euler)


def test_wrong_loop_gets_property_feedback(capsys):
    def half_loop(x_T, timesteps, eps_model, alpha_bar):       # skips every other grid point: fewer model calls
        return my_ddim(x_T, torch.cat([timesteps[:-1:2], timesteps[-1:]]), eps_model, alpha_bar)
    assert ex.check("ddim_sampler", half_loop, seed=2) is False
    out = capsys.readouterr().out
    assert "away from the exact flow map" in out and "called the model" in out

    def too_wide(x_T, timesteps, eps_model, alpha_bar):        # 30 % more spread than the DDIM end points
        y = my_ddim(x_T, timesteps, eps_model, alpha_bar)
        return y.mean(0) + 1.3 * (y - y.mean(0))
    assert ex.check("ddim_sampler", too_wide, seed=2) is False
    out = capsys.readouterr().out                              # batch-4 sample std: the ratio is near, not at, 1.3
    assert "The spread of your samples is 1.2" in out or "The spread of your samples is 1.3" in out


def test_library_sampler_refuses_while_graded(capsys):
    from dstar_edu.samplers.diffusion import ddim
    from dstar_edu.samplers.common import run_loop  # noqa: F401

    def via_library(x_T, timesteps, eps_model, alpha_bar):
        return ddim(None, timesteps, x_T)
    assert ex.check("ddim_sampler", via_library) is False
    assert "dstar_edu.samplers.diffusion.ddim refuses to run" in capsys.readouterr().out
