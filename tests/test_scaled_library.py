"""Library pieces the scaled runs used to patch in scaled_runs/adapters.py (issue 10, item 7)."""
from __future__ import annotations

import torch

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet
from dstar_edu.generators import TeacherInitGenerator
from dstar_edu.objectives.alignment import diff_instruct_star_loss
from dstar_edu.objectives.distill import sim_generator_loss
from dstar_edu.process import DDPM


def _teacher(**kw):
    return DiffusersUNetPredictor(tiny_unet(sample_size=8, seed=1, **kw), DDPM(), "epsilon")


def test_teacher_init_generator_condition_and_input_std():
    """g(z, c) = d(gain z, t*; c) with gain = alpha(t*) (SIM Eq. B.4) or input_std / sigma* (DMD2: unit-variance
    input at t* = 400), both against the copied denoiser called directly."""
    teacher = _teacher(num_class_embeds=3)
    z_rng = torch.Generator().manual_seed(0)
    g = TeacherInitGenerator(teacher, 400.0)
    z = g.noise(2, z_rng)
    c = torch.tensor([0, 2])
    t = torch.full((2,), 400.0)
    with torch.no_grad():
        assert torch.equal(g(z, c), g.denoiser.predict("x0", g.alpha_star * z, t, c))
        assert not torch.equal(g(z, c), g(z, torch.tensor([1, 1])))        # the condition reaches the network
        g1 = TeacherInitGenerator(teacher, 400.0, input_std=1.0)
        assert g1.input_gain == 1.0 / g1.sigma_star
        assert torch.equal(g1(z, c), g1.denoiser.predict("x0", g1.input_gain * z, t, c))
    # SIM's rule gives input std alpha* sigma* = sqrt(1 - alpha_bar(400)) (the 0.758 for SDXL's schedule)
    ab = float(DDPM().alpha(400.0)) ** 2
    assert abs(g.alpha_star * g.sigma_star - (1 - ab) ** 0.5) < 1e-12
    for bad in (0.0, -1.0, float("nan"), True):
        try:
            TeacherInitGenerator(teacher, 400.0, input_std=bad)
        except ValueError as e:
            assert "input_std" in str(e)
        else:
            raise AssertionError(f"input_std={bad!r} accepted")


def test_with_net_views_same_weights():
    teacher = _teacher()
    other = tiny_unet(sample_size=8, seed=1)
    view = teacher.with_net(other)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(view(x, torch.tensor([5.0, 900.0])), teacher(x, torch.tensor([5.0, 900.0])))
    assert view.unet is other and view.process is teacher.process and view.prediction == teacher.prediction


def test_distar_space_x0_is_sim_denoiser_space():
    """DI*'s divergence term with space="x0" is SIM's denoiser-space loss (Alg. 2), "score" the score-space one."""
    ref, fake = _teacher(), DiffusersUNetPredictor(tiny_unet(sample_size=8, seed=4), DDPM(), "epsilon")
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([30.0, 600.0])
    for space in ("x0", "score"):
        got = diff_instruct_star_loss(x0, ref, fake, t, alpha_rew=0.0, eps=eps, space=space, return_parts=True)[1]
        want = sim_generator_loss(x0, ref, fake, t, eps=eps, distance="pseudo_huber", space=space)
        assert torch.allclose(torch.as_tensor(got["divergence"]), want.detach(), rtol=0, atol=0), space
