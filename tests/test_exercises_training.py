"""Exercise ``denoising_step`` (notebook 03): one training step of the 2D denoising loss, graded by the model it
trains (sliced Wasserstein distance of its DDIM samples to the data against the noise floor). The reference and an
honest answer written differently pass, each catalogued mistake fails with its diagnosis, a non-catalogued mistake
gets property feedback, and the library loss refuses to run while an answer is graded."""
import contextlib

import pytest
import torch

from dstar_edu import exercises as ex
from dstar_edu.exercises import core
from dstar_edu.exercises import training as tr

SEED = 11          # a fixed grading seed: each test trains once per call (about 2-4 s on one core)


@pytest.fixture
def instructor(monkeypatch):
    monkeypatch.setattr(core, "_guarded", lambda exercise: contextlib.nullcontext())
    core._FAILURES.clear()


def test_reference_passes(instructor, capsys):
    assert ex.check("denoising_step", ex.reference("denoising_step"), seed=SEED) is True
    assert "\nCorrect!" in capsys.readouterr().out


@pytest.mark.parametrize("k", range(len(ex.EXERCISES["denoising_step"].mistakes)))
def test_catalogued_mistake_fails_with_its_diagnosis(k, instructor, capsys):
    wrong, why = ex.EXERCISES["denoising_step"].mistakes[k]
    assert ex.check("denoising_step", wrong, seed=SEED) is False
    out = capsys.readouterr().out
    assert f"Likely mistake: {why}" in out
    assert "Not yet:" in out


def my_step(eps_model, x0, alpha, sigma, generator):
    """An honest answer written differently: (n, 1) times, mean over every entry (half the reference's scale)."""
    t = torch.rand(x0.shape[0], 1, generator=generator, dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    noisy = alpha(t.flatten()) * x0 + sigma(t.flatten()) * z
    return torch.nn.functional.mse_loss(eps_model(noisy, t.flatten()), z)


def test_honest_answer_passes_under_the_guards(capsys):
    assert ex.check("denoising_step", my_step, seed=SEED) is True


def test_non_catalogued_mistake_gets_property_feedback(capsys):
    def late_times_only(eps_model, x0, alpha, sigma, generator):     # times in [0.5, 1]: never sees low noise
        t = 0.5 + 0.5 * torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return ((eps_model(alpha(t) * x0 + sigma(t) * eps, t) - eps) ** 2).sum(1).mean()
    assert ex.check("denoising_step", late_times_only, seed=SEED) is False
    out = capsys.readouterr().out
    assert "Not yet:" in out and "Likely mistake" not in out
    assert "noise prediction is far from the exact one at t = [0.02" in out     # the time region that fails
    assert "0.6" not in out.split("far from the exact one at t = ")[1].split("]")[0]

    def constant(eps_model, x0, alpha, sigma, generator):              # not a scalar
        t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
        return eps_model(x0, t)
    assert ex.check("denoising_step", constant, seed=SEED) is False
    assert "return one number for the whole batch" in capsys.readouterr().out


def test_library_loss_refuses_while_graded(capsys):
    from dstar_edu.objectives import denoising_loss
    from dstar_edu.predictors import FunctionPredictor

    def via_library(eps_model, x0, alpha, sigma, generator):
        pred = FunctionPredictor(lambda x, t, c: eps_model(x, t), tr.PROCESS, "eps")
        return denoising_loss(pred, x0, generator=generator)
    assert ex.check("denoising_step", via_library, seed=SEED) is False
    assert "dstar_edu.objectives.pretrain.denoising_loss refuses to run" in capsys.readouterr().out



def test_graded_error_is_the_geometric_mean_over_the_graded_times():
    # independent reference: the cube root of the product, by hand (the statistic is scale-aware: a 10x smaller
    # error at one time offsets a 10x larger one at another)
    errs = {t: 1.0 for t in tr.PROBE_TIMES} | {0.1: 0.08, 0.2: 0.01, 0.3: 0.002}
    assert tr.GRADED_TIMES == (0.1, 0.2, 0.3)
    assert tr.graded_error(errs) == pytest.approx((0.08 * 0.01 * 0.002) ** (1 / 3), rel=1e-12)


def test_noise_without_sigma_fails_on_the_denoiser_criterion(instructor, capsys):
    # the catalogued mistake whose samples can look right (SW ratio 1.3-5 in the bench): the denoiser criterion
    # is what fails it, so its feedback must state the denoiser error
    wrong, _ = ex.EXERCISES["denoising_step"].mistakes[3]
    assert ex.check("denoising_step", wrong, seed=SEED) is False
    assert "(geometric mean over these times)" in capsys.readouterr().out
