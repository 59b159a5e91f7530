"""The graded exercises of notebook 07 (area ``trajectory``): references pass, every catalogued mistake fails with its
diagnosis on every seed, honest answers pass under the guards while the library implementations refuse, an
uncatalogued mistake gets property feedback, and hints get more specific with each failure."""
import contextlib
import re

import pytest
import torch

from dstar_edu import exercises as ex
from dstar_edu.exercises import core
from dstar_edu.process import DDPM

NAMES = ["pd_target", "cd_cfg_target", "ect_r"]


@pytest.fixture
def instructor(monkeypatch):
    """Grading the reference and the catalogued mistakes as answers is a cheat for a student
    (tests/test_exercises_cheats.py); here the guards are off and every check is a first failure."""
    monkeypatch.setattr(core, "_guarded", lambda exercise: contextlib.nullcontext())
    core._FAILURES.clear()


# honest answers, written from the prompts (as a student would), not from the library
def my_pd_target(z_t, z_next, alpha_t, sigma_t, alpha_next, sigma_next):
    r = sigma_next / sigma_t
    return (z_next - r * z_t) / (alpha_next - r * alpha_t)


def my_cd_cfg_target(x_start, times, eps_cond, eps_uncond, w):
    ab = DDPM(1000).alpha_bars
    x = x_start
    for t, t_next in zip(times[:-1], times[1:]):
        e_c, e_u = eps_cond(x, t), eps_uncond(x, t)
        eps_w = e_c + w * (e_c - e_u)
        x0 = (x - torch.sqrt(1 - ab[int(t)]) * eps_w) / torch.sqrt(ab[int(t)])
        x = torch.sqrt(ab[int(t_next)]) * x0 + torch.sqrt(1 - ab[int(t_next)]) * eps_w
    return x


def my_ect_r(t, iters, q, d):
    return (t * (1 - (1 + 8 * torch.sigmoid(-t)) / q ** (iters // d))).clamp_min(0)


HONEST = {"pd_target": my_pd_target, "cd_cfg_target": my_cd_cfg_target, "ect_r": my_ect_r}


def test_the_area_is_registered_with_the_grader():
    # the autograder's hidden tests import only dstar_edu.exercises: the area must register there
    assert ex.list_exercises("trajectory") == NAMES
    for name in NAMES:
        assert ex.EXERCISES[name].guards and len(ex.EXERCISES[name].hints) >= 1, name


@pytest.mark.parametrize("name", NAMES)
def test_reference_passes_and_every_catalogued_mistake_fails_with_its_diagnosis(name, instructor, capsys):
    # several seeds: the draws are built so that each catalogued mistake is exposed whatever the seed
    for seed in range(5):
        assert ex.check(name, ex.reference(name), seed=seed) is True
        assert "\nCorrect!" in capsys.readouterr().out
        for wrong, why in ex.EXERCISES[name].mistakes:
            assert ex.check(name, wrong, seed=seed) is False, (seed, why)
            assert f"Likely mistake: {why}" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_honest_answer_passes_under_the_guards_on_a_fresh_seed(name, capsys):
    assert ex.check(name, HONEST[name]) is True
    assert "\nCorrect!" in capsys.readouterr().out


def test_the_honest_answers_match_the_library_outside_grading():
    from dstar_edu.objectives.trajectory import ect_mapping
    t = torch.logspace(-3, 2, 50, dtype=torch.float64)
    for iters in (0, 999, 1000, 4321):                    # stage 0 (r clamped), the edge of stage 1, stage 4
        torch.testing.assert_close(my_ect_r(t, iters, 2.0, 1000), ect_mapping(t, iters), rtol=0, atol=0)


def test_ect_draws_cover_the_clamped_early_stage_and_never_a_stage_edge():
    # every seed: trial 0 has an r that the clamp sets to 0, and iters / d is never an integer
    for seed in range(20):
        trials = ex.sample_inputs("ect_r", seed=seed)
        d0 = trials[0]
        unclamped = d0["t"] * (1 - (1 + 8 * torch.sigmoid(-d0["t"])) / d0["q"] ** (d0["iters"] // d0["d"]))
        assert (unclamped < 0).any(), seed
        assert all(d["iters"] % d["d"] != 0 for d in trials), seed


def test_library_implementations_refuse_while_graded(capsys):
    from dstar_edu.objectives.pretrain import ddim_denoise
    from dstar_edu.objectives.trajectory import ect_mapping, pd_target
    from dstar_edu.predictors import FunctionPredictor
    from dstar_edu.process import VP

    def via_pd(z_t, z_next, alpha_t, sigma_t, alpha_next, sigma_next):
        vp = VP()
        t = vp.t_from_edm_sigma((sigma_t / alpha_t).reshape(-1))
        return pd_target(z_t, z_next, t, vp.t_from_edm_sigma((sigma_next / alpha_next).reshape(-1)), vp)

    def via_ddim_denoise(x_start, times, eps_cond, eps_uncond, w):
        teacher = FunctionPredictor(lambda x, t, c: eps_uncond(x, t) if c is None else eps_cond(x, t), DDPM(1000),
                                    "eps")
        x = x_start
        for t, t_next in zip(times[:-1], times[1:]):
            x = ddim_denoise(teacher, x, t.expand(len(x)), t_next.expand(len(x)), cond=torch.ones(len(x)),
                             cfg_scale=w)
        return x

    def via_ect(t, iters, q, d):
        return ect_mapping(t, iters, q=q, d=d)

    for name, cheat, label in (("pd_target", via_pd, "dstar_edu.objectives.trajectory.pd_target"),
                               ("cd_cfg_target", via_ddim_denoise, "dstar_edu.objectives.pretrain.ddim_denoise"),
                               ("ect_r", via_ect, "dstar_edu.objectives.trajectory.ect_mapping")):
        assert ex.check(name, cheat) is False
        assert f"{label} refuses to run while exercise {name!r} is being graded" in capsys.readouterr().out
    # after grading the library computes again: r at stage 0 is clamped to 0 (n(t) > 1 for every t)
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(ect_mapping(torch.tensor([0.5, 5.0], dtype=torch.float64), 0), zero)


def test_uncatalogued_mistakes_get_property_feedback(instructor, capsys):
    def wrong_below_one(t, iters, q, d):          # 10 % off wherever t < 1 and r > 0
        return my_ect_r(t, iters, q, d) * (1 + 0.1 * (t < 1).double())
    assert ex.check("ect_r", wrong_below_one, seed=1) is False
    out = capsys.readouterr().out
    # uncatalogued, and 1-d (one number per noise level): no per-sample-factor message
    assert "Likely mistake" not in out and "factor changes from sample to sample" not in out
    found = re.search(r"correct for t in \[([\d.e+-]+), ([\d.e+-]+)\], wrong for t in \[([\d.e+-]+), ([\d.e+-]+)\]",
                      out)
    assert found, out
    assert float(found.group(4)) < 1.0                # every entry reported wrong has t < 1, as planted

    def flipped(z_t, z_next, alpha_t, sigma_t, alpha_next, sigma_next):
        return -my_pd_target(z_t, z_next, alpha_t, sigma_t, alpha_next, sigma_next)
    assert ex.check("pd_target", flipped, seed=2) is False
    assert "the right magnitude everywhere but the opposite sign" in capsys.readouterr().out


def test_hints_get_more_specific_with_each_failure(instructor, capsys):
    wrong, _ = ex.EXERCISES["cd_cfg_target"].mistakes[0]
    hints = ex.EXERCISES["cd_cfg_target"].hints
    outs = []
    for _ in range(1 + 1 + len(hints)):
        assert ex.check("cd_cfg_target", wrong, seed=3) is False
        outs.append(capsys.readouterr().out)
    assert "Hint 1" in outs[0] and "Hint 2" not in outs[0]
    assert "Hint 2: " + ex.EXERCISES["cd_cfg_target"].hint in outs[1] and "Hint 3" not in outs[1]
    for k, more in enumerate(hints, start=3):
        assert f"Hint {k}: {more}" in outs[k - 1]
    assert "each further failure reveals one more hint" not in outs[-1]
