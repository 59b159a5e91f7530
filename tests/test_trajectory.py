"""Trajectory distillation objectives (dstar_edu.objectives.trajectory) against independent references:
formulas written out here, cases with closed-form answers (Dirac data: straight paths, exact Tweedie), and the
library's own CT/CD/flow-matching losses where a method is defined as one of them."""
import math

import pytest
import torch

from dstar_edu.objectives import consistency_training_loss
from dstar_edu.objectives.trajectory import (add_discriminator_loss, add_generator_loss, ct_score_target,
                                             dmd2_backward_simulation, ect_loss, ect_mapping, halve_timesteps,
                                             pd_halving_schedule, pd_target, phase_edges, phase_start,
                                             phased_consistency_distillation_loss, phased_sampling,
                                             progressive_distillation_loss, rectified_diffusion_loss, reflow_loss,
                                             sct_score_target, straightness, teacher_two_steps, velocity_mapped_loss)
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow
from dstar_edu.samplers.consistency import renoise
from toy_data.mixtures import EmpiricalDistribution, GaussianMixture, eight_gaussians_mixture

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- progressive distillation ------------------------------------------------------------------------------------
def test_pd_target_formula_and_inverse_of_the_ddim_step():
    """x_tilde written out (Wang talk Alg. 2), then one DDIM step t -> t'' with it lands on z''."""
    p = VP()
    z = torch.randn(6, 2, generator=gen(0), dtype=F64)
    z2 = torch.randn(6, 2, generator=gen(1), dtype=F64)
    t, t2 = 0.8, 0.3
    a, s, a2, s2 = (float(v) for v in (p.alpha(t), p.sigma(t), p.alpha(t2), p.sigma(t2)))
    x = pd_target(z, z2, t, t2, p)
    torch.testing.assert_close(x, (z2 - s2 / s * z) / (a2 - s2 / s * a), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a2 * x + s2 * (z - a * x) / s, z2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="SNR"):
        pd_target(z, z2, 0.3, 0.8, p)
    with pytest.raises(ValueError, match="x_next has shape"):
        pd_target(z, z2[:3], t, t2, p)


def test_pd_loss_spaces_differ_by_the_step_coefficient_and_vanish_for_the_ideal_student():
    p = DDPM(1000)
    teacher = eight_gaussians_mixture(p)
    ts = torch.tensor([1000.0, 750.0, 500.0, 250.0, 0.0], dtype=F64)
    x0 = teacher.sample(16, generator=gen(2))
    eps = torch.randn(16, 2, generator=gen(3), dtype=F64)
    torch.manual_seed(0)
    student = MLPPredictor(p, "eps", dim=2, hidden=16, depth=1).double()
    i = torch.tensor([1, 2] * 8)
    lx = progressive_distillation_loss(student, teacher, x0, ts, i=i, eps=eps, space="x", reduction="none")
    l0 = progressive_distillation_loss(student, teacher, x0, ts, i=i, eps=eps, space="x0", weighting="none",
                                       reduction="none")
    t = torch.where(i == 1, 500.0, 1000.0).to(F64)
    tn = torch.where(i == 1, 0.0, 500.0).to(F64)
    coef = p.alpha(tn) - p.sigma(tn) / p.sigma(t) * p.alpha(t)
    torch.testing.assert_close(lx, coef ** 2 * l0, rtol=1e-10, atol=1e-14)

    # the ideal student predicts x_tilde itself: zero loss in both spaces
    def ideal(x, tt, c):
        tt = torch.as_tensor(tt, dtype=F64).expand(x.shape[0])
        k = (tt == 1000).long()
        t_mid = torch.where(k == 1, 750.0, 250.0).to(F64)
        t_nx = torch.where(k == 1, 500.0, 0.0).to(F64)
        return pd_target(x, teacher_two_steps(teacher, x, tt, t_mid, t_nx), tt, t_nx, p)
    ideal_student = FunctionPredictor(ideal, p, "x0")
    for space in ("x", "x0"):
        val = progressive_distillation_loss(ideal_student, teacher, x0, ts, i=i, eps=eps, space=space)
        assert float(val) < 1e-20


def test_pd_schedule_and_bad_inputs():
    assert pd_halving_schedule(8, 1) == [8, 4, 2, 1]
    assert pd_halving_schedule(6, 1) == [6, 3, 2, 1]
    torch.testing.assert_close(halve_timesteps([4.0, 3.0, 2.0, 1.0, 0.0]), torch.tensor([4.0, 2.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="2N \\+ 1"):
        halve_timesteps([3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="n_final_steps=3"):
        pd_halving_schedule(8, 3)
    p = VP()
    teacher = eight_gaussians_mixture(p)
    with pytest.raises(ValueError, match="space='y'"):
        progressive_distillation_loss(teacher, teacher, torch.zeros(2, 2, dtype=F64), [0.9, 0.5, 0.1], space="y")
    with pytest.raises(ValueError, match="allowed 1..N=1"):
        progressive_distillation_loss(teacher, teacher, torch.zeros(2, 2, dtype=F64), [0.9, 0.5, 0.1], i=2)


# ---- ECT / SCT -----------------------------------------------------------------------------------------------------
def test_ect_mapping_values():
    t = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=F64)
    n = 1 + 8 * torch.sigmoid(-t)
    torch.testing.assert_close(ect_mapping(t, 3500, q=2.0, d=1000), (t * (1 - n / 8)).clamp_min(0), rtol=1e-14, atol=0)
    assert float(ect_mapping(t, 0).max()) == 0.0                         # stage 0: r = 0 (n(t) >= 1)
    with pytest.raises(ValueError, match="q=1"):
        ect_mapping(t, 10, q=1)
    with pytest.raises(ValueError, match="iters=-1"):
        ect_mapping(t, -1)


def test_ect_loss_is_ct_on_the_mapped_pair():
    """On VE (EDM levels = process times) ECT = consistency_training_loss on (r, t) with weight 1/(t - r)."""
    p = VE(80.0)
    torch.manual_seed(1)
    model = MLPPredictor(p, "cm_f", dim=2, hidden=16, depth=1).double()
    x0 = eight_gaussians_mixture().sample(32, generator=gen(4))
    eps = torch.randn(32, 2, generator=gen(5), dtype=F64)
    t = torch.linspace(0.05, 5.0, 32, dtype=F64)
    r = ect_mapping(t, 4000)
    got = ect_loss(model, x0, 4000, t=t, eps=eps, distance="l2", reduction="none")
    ref = consistency_training_loss(model, model, x0, t_pair=(r, t), eps=eps, distance="l2", reduction="none")
    torch.testing.assert_close(got, ref / (t - r), rtol=1e-9, atol=1e-12)


def test_sct_target_reduces_to_ct_with_one_reference_and_is_exact_with_all_points():
    p = VP()
    pts = torch.randn(10, 2, generator=gen(6), dtype=F64)
    x0 = pts[:4]
    x_t, _ = p.q_sample(x0, 0.6, generator=gen(7))
    one = sct_score_target(x_t, 0.6, p, torch.full((1, 2), 100.0, dtype=F64), include_self=x0)  # far: weight e^-1000
    torch.testing.assert_close(one, ct_score_target(x_t, x0, 0.6, p), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sct_score_target(x_t, 0.6, p, pts), EmpiricalDistribution(pts, process=p).score(x_t, 0.6),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reference has shape"):
        sct_score_target(x_t, 0.6, p, torch.zeros(3, 5, dtype=F64))


# ---- PCD -----------------------------------------------------------------------------------------------------------
def test_phase_edges_and_phase_start():
    g = torch.linspace(0.0, 1.0, 9, dtype=F64)
    e = phase_edges(g, 4)
    torch.testing.assert_close(e, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    torch.testing.assert_close(phase_start(torch.tensor([0.0, 0.1, 0.25, 0.26, 1.0]), e),
                               torch.tensor([0.0, 0.0, 0.0, 0.25, 0.75], dtype=F64))
    with pytest.raises(ValueError, match="n_phases=9"):
        phase_edges(g, 9)


def test_pcd_with_one_phase_is_cd_and_phased_sampling_with_one_phase_is_one_jump():
    from dstar_edu.objectives import consistency_distillation_loss
    p = VE(80.0)
    torch.manual_seed(2)
    model = MLPPredictor(p, "x0", dim=2, hidden=16, depth=1).double()
    teacher = eight_gaussians_mixture(p)
    x0 = teacher.sample(16, generator=gen(8))
    grid = torch.tensor([0.002, 0.1, 0.5, 1.0, 2.0], dtype=F64)
    eps = torch.randn(16, 2, generator=gen(9), dtype=F64)
    n = torch.tensor([0, 1, 2] * 5 + [0])
    got = phased_consistency_distillation_loss(model, None, teacher, x0, grid, 1, m=2, n=n, eps=eps, reduction="none")
    ref = consistency_distillation_loss(model, None, teacher, x0, grid, m=2, n=n, eps=eps, parameterization="x0",
                                        reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    z = torch.randn(4, 2, generator=gen(10), dtype=F64)
    torch.testing.assert_close(phased_sampling(model, [0.002, 2.0], z), model(z, 2.0))
    with pytest.raises(ValueError, match="different phases"):
        phased_consistency_distillation_loss(model, None, teacher, x0, grid, 4, m=1, n=torch.tensor([9]))


# ---- reflow / rectified diffusion / velocity mapping -------------------------------------------------------------
def test_reflow_and_rectified_diffusion_losses_written_out():
    torch.manual_seed(3)
    rf = RectifiedFlow()
    v = MLPPredictor(rf, "velocity", dim=2, hidden=16, depth=1).double()
    xh = torch.randn(8, 2, generator=gen(11), dtype=F64)
    z = torch.randn(8, 2, generator=gen(12), dtype=F64)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    x_t = (1 - t[:, None]) * xh + t[:, None] * z
    with torch.no_grad():
        ref = ((v(x_t, t) - (z - xh)) ** 2).sum(1)
        torch.testing.assert_close(reflow_loss(v, xh, z, t=t, reduction="none"), ref)
    vp = VP()
    e = MLPPredictor(vp, "eps", dim=2, hidden=16, depth=1).double()
    a, s = vp.coefficients(t, xh)
    with torch.no_grad():
        ref = ((e(a * xh + s * z, t) - z) ** 2).sum(1)
        torch.testing.assert_close(rectified_diffusion_loss(e, xh, z, t=t, reduction="none"), ref)
    with pytest.raises(ValueError, match="coupled noise"):
        reflow_loss(v, xh, z[:3])


def test_velocity_mapped_loss_is_zero_for_exact_tweedie_on_a_dirac_and_straightness_of_straight_paths():
    """One data point: E[x0|x_t] is the point, so v^y = x0 - eps exactly (loss 0 to round-off); the RF paths of a
    Dirac are straight lines, straightness 0."""
    p = VP()
    pt = torch.tensor([[0.7, -0.4]], dtype=F64)
    dirac = EmpiricalDistribution(pt, process=p)
    x0 = pt.expand(8, 2)
    t = torch.linspace(0.05, 0.95, 8, dtype=F64)
    assert float(velocity_mapped_loss(dirac, x0, t=t, generator=gen(13))) < 1e-24
    rf = RectifiedFlow()
    z = torch.randn(16, 2, generator=gen(14), dtype=F64)
    assert straightness(EmpiricalDistribution(pt, process=rf), z, torch.linspace(0.999, 0.0, 11, dtype=F64)) < 1e-24
    assert straightness(eight_gaussians_mixture(rf), z, torch.linspace(0.999, 0.0, 11, dtype=F64)) > 0.1


# ---- ADD / DMD2 ----------------------------------------------------------------------------------------------------
def test_add_losses_written_out_and_discriminator_frozen_for_the_generator():
    p = VP()
    teacher = eight_gaussians_mixture(p)
    torch.manual_seed(4)
    disc = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(8, 2, generator=gen(15), dtype=F64, requires_grad=True)
    eps = torch.randn(8, 2, generator=gen(16), dtype=F64)
    t = torch.full((8,), 0.5, dtype=F64)
    got = add_generator_loss(x, teacher, disc, t, distill_weight=2.0, eps=eps, reduction="none")
    a, s = p.coefficients(t, x)
    target = teacher.predict("x0", (a * x + s * eps).detach(), t)
    ref = 2.0 * ((x - target) ** 2).sum(1) + torch.nn.functional.softplus(-disc(x)).reshape(-1)
    torch.testing.assert_close(got, ref)
    got.mean().backward()
    assert all(q.grad is None for q in disc.parameters()) and x.grad.abs().sum() > 0
    real = torch.randn(8, 2, generator=gen(17), dtype=F64)
    d = add_discriminator_loss(x, real, disc)
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(d, sp(-disc(real)).mean() + sp(disc(x.detach())).mean())


def test_dmd2_backward_simulation_reproduces_the_student_chain():
    p = VP()
    c = torch.tensor([0.3, -0.2], dtype=F64)
    student = FunctionPredictor(lambda x, t, cond: c.expand_as(x), p, "x0")
    ts = torch.tensor([1.0, 0.7, 0.4, 0.0], dtype=F64)
    z = torch.randn(5, 2, generator=gen(18), dtype=F64)
    x, t = dmd2_backward_simulation(student, ts, z, stop=2, generator=gen(19))
    g = gen(19)
    torch.randn(5, 2, generator=g, dtype=F64)                          # the first re-noising's draw
    expected = renoise(c.expand(5, 2), 0.0, 0.4, p, torch.randn(5, 2, generator=g, dtype=F64))
    torch.testing.assert_close(x, expected)
    assert float(t) == 0.4
    x0_, t0_ = dmd2_backward_simulation(student, ts, z, stop=0)
    assert torch.equal(x0_, z) and float(t0_) == 1.0
    with pytest.raises(ValueError, match="stop=3"):
        dmd2_backward_simulation(student, ts, z, stop=3)


def test_float32_pd_loss_agrees_with_float64():
    p = VP()
    teacher = eight_gaussians_mixture(p)
    torch.manual_seed(5)
    st = MLPPredictor(p, "eps", dim=2, hidden=16, depth=1)
    st64 = MLPPredictor(p, "eps", dim=2, hidden=16, depth=1).double()
    st64.load_state_dict({k: v.double() for k, v in st.state_dict().items()})
    x0 = teacher.sample(32, generator=gen(20))
    eps = torch.randn(32, 2, generator=gen(21), dtype=F64)
    ts = [0.95, 0.7, 0.45, 0.25, 0.05]
    l32 = progressive_distillation_loss(st, teacher, x0.float(), ts, i=torch.tensor([1, 2] * 16), eps=eps.float())
    l64 = progressive_distillation_loss(st64, teacher, x0, ts, i=torch.tensor([1, 2] * 16), eps=eps)
    assert math.isclose(float(l32.detach()), float(l64.detach()), rel_tol=1e-4)          # float32 round-off through two DDIM steps
