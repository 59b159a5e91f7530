"""Failures say where (issue 13 item 4): step, phase, loss and the partial history; the divergence detector."""
import functools
import math

import pytest
import torch

from dstar_edu.distillation import distill
from dstar_edu.failures import Diverged, DivergenceDetector, TrainingFailure
from dstar_edu.generators import MLPGenerator
from dstar_edu.objectives import denoising_loss
from dstar_edu.objectives.distill import p_edm, p_sim, sim_generator_loss
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import VP
from dstar_edu.training import train
from toy_data.mixtures import GaussianMixture


def _param():
    return torch.nn.Parameter(torch.tensor([1.0]))


def test_nan_loss_names_step_and_keeps_history():
    w = _param()

    def loss_fn(step, g):
        return (w ** 2).sum() * (math.nan if step == 3 else 1.0)

    with pytest.raises(TrainingFailure, match=r"loss is nan at step 3 \(phase 'loss', loss_fn .*loss_fn\)") as info:
        train(loss_fn, [w], steps=10, lr=1e-3, progress=False)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert (err.step, err.phase) == (3, "loss")
    assert len(err.history["loss"]) == 3            # steps 0, 1, 2 completed


def test_library_loss_nan_names_step_phase_and_loss():
    """denoising_loss itself raises on a NaN batch; the loop adds the step and keeps the curve."""
    process = VP()
    model = MLPPredictor(process, "eps", dim=2, hidden=8, depth=1)
    x0 = torch.randn(16, 2)

    def loss_fn(step, g):
        x = x0 if step < 2 else x0 * math.nan
        return denoising_loss(model, x, generator=g)

    with pytest.raises(TrainingFailure, match=r"training step 2 \(phase 'loss', loss_fn .*\): denoising_loss") as info:
        train(loss_fn, model, steps=5, progress=False)
    assert info.value.step == 2 and len(info.value.history["loss"]) == 2


def test_exploding_loss_is_reported_as_diverged():
    """Loss 1 for 51 steps (floor log 1 = 0), then x10 per step: log v - floor > log(1e3) first at step 54
    (10^4; 10^3 at step 53 is not >), patience 5 -> Diverged at step 58 with 58 losses recorded."""
    w = _param()

    def loss_fn(step, g):
        return (w ** 2).sum() / w.detach() ** 2 * 10.0 ** max(0, step - 50)

    with pytest.raises(Diverged, match=r"diverged: training loss is .* at step 58.*since step 54") as info:
        train(loss_fn, [w], steps=200, lr=1e-6, progress=False)
    assert info.value.step == 58 and len(info.value.history["loss"]) == 58


def test_noisy_healthy_loss_does_not_trigger():
    """Log-normal minibatch noise with sd 1.5 (a factor ~4.5 per sd) around a slowly decreasing level over 3000
    steps: the rule needs log v - floor > 6.9 five times in a row, a > 4-sd event repeated: no false positive."""
    det = DivergenceDetector("loss")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3000, generator=g, dtype=torch.float64) * 1.5
    for k in range(3000):
        det.observe(k, math.exp(-k / 1000 + float(noise[k])))


def test_detector_argument_checks():
    with pytest.raises(ValueError, match=r"factor=0.5 must be a finite number > 1"):
        DivergenceDetector(factor=0.5)
    with pytest.raises(ValueError, match=r"patience=0 must be a positive integer"):
        DivergenceDetector(patience=0)
    with pytest.raises(ValueError, match=r"divergence='yes' must be True"):
        train(lambda k, g: (_param() ** 2).sum(), [_param()], steps=1, progress=False, divergence="yes")


def _setup():
    process = VP()
    teacher = GaussianMixture(torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.2, process=process)
    torch.manual_seed(0)
    return process, teacher, MLPGenerator(2, hidden=16, depth=1), MLPPredictor(process, "v", dim=2, hidden=16, depth=1)


def test_distill_loss_nan_names_step_phase_loss_and_keeps_history():
    process, teacher, gen, fake = _setup()
    sim = functools.partial(sim_generator_loss, distance="pseudo_huber", c=1e-3, space="x0")
    calls = {"n": 0}

    def flaky(x0, *a, **kw):
        calls["n"] += 1
        return sim(x0 * (math.nan if calls["n"] == 4 else 1.0), *a, **kw)

    with pytest.raises(TrainingFailure, match=r"distillation step 3, phase 'generator' \(loss flaky\).*"
                                              r"sim_generator_loss.*not finite") as info:
        distill(gen, teacher, fake, flaky, steps=10, lr_gen=1e-3, lr_fake=1e-3, batch_size=32,
                t_sampler_gen=p_sim(process, sigma_min=0.002, sigma_max=80.0),
                t_sampler_fake=p_edm(process, sigma_min=0.002, sigma_max=80.0), progress=False)
    err = info.value
    assert (err.step, err.phase) == (3, "generator")
    assert len(err.history["gen_loss"]) == 3 and len(err.history["fake_loss"]) == 4


def test_distill_divergence_stops_the_run():
    """A generator loss -||x0||^2 pushes samples out geometrically; the fake-score loss grows like their squared
    scale and the generator's gradient norm like their scale: the detector stops the run with 'diverged'."""
    process, teacher, gen, fake = _setup()

    def push_out(x0, teacher, fake, t, generator=None, cond=None):
        return -(x0 ** 2).sum(1).mean()

    with pytest.raises(Diverged, match=r"diverged: (fake-score loss|generator gradient norm) .* at step \d+") as info:
        distill(gen, teacher, fake, push_out, steps=3000, lr_gen=3e-2, lr_fake=1e-3, batch_size=32,
                t_sampler_gen=p_sim(process, sigma_min=0.002, sigma_max=80.0),
                t_sampler_fake=p_edm(process, sigma_min=0.002, sigma_max=80.0), progress=False)
    err = info.value
    assert err.step < 3000 and len(err.history["gen_loss"]) in (err.step, err.step + 1)
    assert err.loss == {"fake-score": "fake_score_loss", "generator": "push_out"}[err.phase] and err.loss in str(err)
