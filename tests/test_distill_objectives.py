"""Distillation objectives: per-sample values against hand-written formulas, gradients against explicit
vector-Jacobian products, where the gradient must (and must not) flow, zero gradient at the optimum, the SIM
App. B.2 time distributions, and errors on bad input. The gradient *theorems* are registered checks
(``distill.*``, run by tests/test_checks.py)."""
import math

import pytest
import torch

from dstar_edu.generators import AffineGaussianGenerator, MixtureGenerator
from dstar_edu.objectives.distill import (FeatureDiscriminator, diff_instruct_loss, dmd_gan_discriminator_loss,
                                          dmd_gan_generator_loss, dmd_loss, dmd_regression_loss, fake_score_loss,
                                          fgm_generator_loss, karras_sigma_grid, p_edm, p_sid, p_sim,
                                          score_divergence, sds_loss, sid_generator_loss, sim_generator_loss,
                                          vsd_loss)
from dstar_edu.objectives.divergences import get_distance
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow

F64 = torch.float64


def g(seed):
    return torch.Generator().manual_seed(seed)


def nets(process, seed=0, dim=2):
    """A float64 MLP teacher and a different MLP fake (eps and x0 parameterisations)."""
    torch.manual_seed(seed)
    return (MLPPredictor(process, "eps", dim=dim, hidden=32).double(),
            MLPPredictor(process, "x0", dim=dim, hidden=32).double())


def batch(process, n=8, seed=1):
    gen = AffineGaussianGenerator(2, mean=torch.tensor([0.3, -0.2], dtype=F64),
                                  A=torch.tensor([[0.8, 0.1], [-0.2, 0.5]], dtype=F64))
    t = 0.1 + 0.8 * torch.rand(n, generator=g(seed), dtype=F64) * (process.t_max if not process.discrete else 1)
    if process.discrete:
        t = torch.randint(1, process.T, (n,), generator=g(seed)).to(F64)
    eps = torch.randn(n, 2, generator=g(seed + 1), dtype=F64)
    return gen, gen.noise(n, g(seed + 2)), t, eps


def grads(gen, loss):
    return torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(gen.parameters()), retain_graph=True)])


def vjp(gen, x, v):
    """sum_i v_i . dx_i/dtheta as a flat vector (the explicit route)."""
    return torch.cat([p.reshape(-1) for p in torch.autograd.grad(x, list(gen.parameters()), grad_outputs=v,
                                                                 retain_graph=True)])


# ---- SIM -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [("l2", {}), ("pseudo_huber", {"c": 0.4}), ("huber", {"delta": 0.3}),
                                         ("alpha_power", {"alpha": 4}), ("exp_power", {"alpha": 2, "beta": 0.01}),
                                         ("l1", {})])
def test_sim_per_sample_value_is_eq_3_7(name, params):
    process = VP()
    teacher, fake = nets(process)
    gen, z, t, eps = batch(process)
    x0 = gen(z)
    per = sim_generator_loss(x0, teacher, fake, t, eps=eps, distance=name, reduction="none", **params)
    x_t = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    s_q, s_psi = teacher.predict("score", x_t, t), fake.predict("score", x_t, t)
    d = get_distance(name, **params)
    ref = -(d.grad(s_psi - s_q) * (s_psi + eps / process.sigma(t)[:, None])).sum(1)   # grad log q(x_t|x0) = -eps/sigma
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    mean = sim_generator_loss(x0, teacher, fake, t, eps=eps, distance=name, **params)
    torch.testing.assert_close(mean, per.mean())


def test_sim_x0_space_is_score_space_with_scaled_distance():
    """Alg. 2 (denoiser space) with L2 = score-space L2 with weight (sigma^2/alpha)^2 (y_x0 = k y_s, s-term = (D - x0)/k)."""
    process = VP()
    teacher, fake = nets(process, 1)
    gen, z, t, eps = batch(process, seed=3)
    x0 = gen(z)
    k = process.sigma(t) ** 2 / process.alpha(t)
    a = sim_generator_loss(x0, teacher, fake, t, eps=eps, distance="l2", space="x0", reduction="none")
    b = sim_generator_loss(x0, teacher, fake, t, eps=eps, distance="l2", space="score", weight=k ** 2, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads(gen, a.sum()), grads(gen, b.sum()), rtol=1e-9, atol=1e-12)


def test_sim_gradient_flows_to_generator_not_to_networks():
    process = VE(80.0)
    teacher, fake = nets(process, 2)
    gen, z, t, eps = batch(process, seed=5)
    flags = [p.requires_grad for p in fake.parameters()]
    loss = sim_generator_loss(gen(z), teacher, fake, t, eps=eps, distance="pseudo_huber", c=0.5)
    loss.backward()
    assert all(p.grad is None for p in list(teacher.parameters()) + list(fake.parameters()))
    assert [p.requires_grad for p in fake.parameters()] == flags          # restored after the loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_sim_needs_the_input_gradient_inside_the_scores():
    """Computing the same per-sample loss with x_t detached inside both networks changes the gradient: the
    remaining d'(y)^T eps/sigma term does not depend on theta, so the gradient vanishes."""
    process = VP()
    teacher, fake = nets(process, 3)
    gen, z, t, eps = batch(process, seed=7)
    x0 = gen(z)
    good = grads(gen, sim_generator_loss(x0, teacher, fake, t, eps=eps, distance="l2"))
    x_t = (process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps).detach()
    y = fake.predict("score", x_t, t) - teacher.predict("score", x_t, t)
    bad = -(2 * y * (fake.predict("score", x_t, t) + eps / process.sigma(t)[:, None])).sum(1).mean()
    assert not bad.requires_grad or torch.autograd.grad(bad, list(gen.parameters()), allow_unused=True)[0] is None
    assert good.abs().max() > 1e-3


@pytest.mark.parametrize("loss,kw", [(sim_generator_loss, {"distance": "pseudo_huber", "c": 0.1}),
                                     (sim_generator_loss, {"distance": "l2"}),
                                     (sid_generator_loss, {"alpha": 1.2}),
                                     (diff_instruct_loss, {}), (vsd_loss, {}), (dmd_loss, {"weighting": "none"}),
                                     (fgm_generator_loss, {})])
def test_zero_gradient_when_the_generator_matches_the_teacher(loss, kw):
    """Teacher = fake = the generator's exact score: y_t = 0 for every x_t, so every method's gradient is 0."""
    process = VP()
    gen = MixtureGenerator(2, 2, means=torch.tensor([[0.5, 0.0], [-1.0, 1.0]], dtype=F64),
                           log_scales=torch.tensor([-1.0, -0.5], dtype=F64))
    exact = gen.score_predictor(process, frozen=True)
    z = gen.noise(32, g(9))
    t = 0.05 + 0.9 * torch.rand(32, generator=g(10), dtype=F64)
    out = loss(gen(z), exact, exact, t, generator=g(11), **kw)
    assert grads(gen, out).abs().max() < 1e-12


def test_score_divergence_is_eq_3_3_integrand():
    process = VP()
    teacher, fake = nets(process, 4)
    x_t = torch.randn(5, 2, generator=g(12), dtype=F64)
    t = torch.full((5,), 0.3, dtype=F64)
    v = score_divergence(x_t, t, fake, teacher, distance="pseudo_huber", c=0.2)
    y = fake.predict("score", x_t, t) - teacher.predict("score", x_t, t)
    torch.testing.assert_close(v, torch.sqrt((y ** 2).sum(1) + 0.04) - 0.2, rtol=1e-12, atol=1e-12)


# ---- SiD ------------------------------------------------------------------------------------------------------
def test_sid_formula_and_alpha_one_equals_sim_l2():
    process = VE(80.0)
    teacher, fake = nets(process, 5)
    gen, z, t, eps = batch(process, seed=13)
    x0 = gen(z)
    per = sid_generator_loss(x0, teacher, fake, t, eps=eps, alpha=1.2, reduction="none")
    x_t = x0 + t[:, None] * eps
    Dq, Df = teacher.predict("x0", x_t, t), fake.predict("x0", x_t, t)
    ref = ((Dq - Df) * ((Dq - x0) - 1.2 * (Dq - Df))).sum(1) / (x0 - Dq).abs().mean(1)
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    # alpha = 1 with weight 1: SIM's squared-L2 loss with weight t^4 / 2 (EDM: sigma^2/alpha = t^2), for networks too
    a = sid_generator_loss(x0, teacher, fake, t, eps=eps, alpha=1.0, weighting="none")
    b = sim_generator_loss(x0, teacher, fake, t, eps=eps, distance="l2", weight=t ** 4 / 2)
    torch.testing.assert_close(grads(gen, a), grads(gen, b), rtol=1e-9, atol=1e-12)


# ---- Diff-Instruct, SDS, VSD, DMD --------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["score", "x0"])
def test_diff_instruct_gradient_is_detached_difference_times_dxt(space):
    process = VP()
    teacher, fake = nets(process, 6)
    gen, z, t, eps = batch(process, seed=15)
    x0 = gen(z)
    w = torch.linspace(0.5, 2.0, 8, dtype=F64)
    loss = diff_instruct_loss(x0, teacher, fake, t, eps=eps, weight=w, space=space)
    x_t = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    target = "score" if space == "score" else "x0"
    with torch.no_grad():
        diff = fake.predict(target, x_t, t) - teacher.predict(target, x_t, t)
    torch.testing.assert_close(grads(gen, loss), vjp(gen, x_t, w[:, None] * diff / 8), rtol=1e-10, atol=1e-12)


def test_sds_gradient_is_dreamfusion():
    process = DDPM(1000)
    teacher, _ = nets(process, 7)
    gen, z, t, eps = batch(process, seed=17)
    x0 = gen(z)
    loss = sds_loss(x0, teacher, t, eps=eps)
    x_t = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    with torch.no_grad():
        eps_hat = teacher.predict("eps", x_t, t)
    torch.testing.assert_close(grads(gen, loss), vjp(gen, x0, (eps_hat - eps) / 8), rtol=1e-10, atol=1e-12)


def test_vsd_and_dmd_forms_agree():
    process = VP()
    teacher, fake = nets(process, 8)
    gen, z, t, eps = batch(process, seed=19)
    x0 = gen(z)
    w = torch.linspace(0.5, 2.0, 8, dtype=F64)
    a = vsd_loss(x0, teacher, fake, t, eps=eps, weight=w)
    b = dmd_loss(x0, teacher, fake, t, eps=eps, weighting=w)
    torch.testing.assert_close(grads(gen, a), grads(gen, b), rtol=1e-9, atol=1e-12)
    # DMD weighting: C / ||x0 - D_q||_1 times ||x0 - sg(x0 - (D_fake - D_real))||^2
    x_t = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * eps
    with torch.no_grad():
        Dq, Df = teacher.predict("x0", x_t, t), fake.predict("x0", x_t, t)
    per = dmd_loss(x0, teacher, fake, t, eps=eps, reduction="none")
    torch.testing.assert_close(per, 2 * ((Df - Dq) ** 2).sum(1) / (x0 - Dq).abs().sum(1), rtol=1e-12, atol=1e-12)


def test_dmd_regression_loss():
    x = torch.randn(4, 3, 2, 2, generator=g(20), dtype=F64, requires_grad=True)
    y = torch.randn(4, 3, 2, 2, generator=g(21), dtype=F64)
    torch.testing.assert_close(dmd_regression_loss(x, y), ((x - y) ** 2).reshape(4, -1).sum(1).mean())
    r = ((x - y) ** 2).reshape(4, -1).sum(1)
    torch.testing.assert_close(dmd_regression_loss(x, y, distance="pseudo_huber", c=0.1, reduction="none"),
                               torch.sqrt(r + 0.01) - 0.1)
    with pytest.raises(ValueError, match="must match x0"):
        dmd_regression_loss(x, y[:2])


def test_dmd_gan_term_shares_the_fake_backbone():
    process = VP()
    teacher, fake = nets(process, 9)
    disc = FeatureDiscriminator(fake, "blocks.1", features=32, hidden=16).double()
    gen, z, t, eps = batch(process, seed=23)
    real = torch.randn(8, 2, generator=g(24), dtype=F64)
    d_loss = dmd_gan_discriminator_loss(gen(z), real, disc, t, process, generator=g(25))
    d_loss.backward()
    assert all(p.grad is not None for p in disc.head.parameters())
    assert fake.blocks[0][1].weight.grad is not None and fake.blocks[0][1].weight.grad.abs().sum() > 0
    assert gen.mu.grad is None                                         # fake samples are detached for D
    fake.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)
    base = dmd_loss(gen(z), teacher, fake, t, eps=eps, reduction="none")
    with_gan = dmd_loss(gen(z), teacher, fake, t, eps=eps, discriminator=disc, gan_weight=0.5, reduction="none")
    gan = dmd_gan_generator_loss(gen(z), disc, t, process, eps=eps, reduction="none")
    torch.testing.assert_close(with_gan, base + 0.5 * gan)
    with_gan.mean().backward()
    assert all(p.grad is None for p in list(disc.parameters()) + list(fake.parameters()))
    assert gen.mu.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layer='nope' is not a submodule"):
        FeatureDiscriminator(fake, "nope", 32)


# ---- FGM ---------------------------------------------------------------------------------------------------------
def test_fgm_value_and_conditional_field_gradient():
    process = RectifiedFlow()
    torch.manual_seed(10)
    teacher = MLPPredictor(process, "velocity", dim=2, hidden=32).double()
    fake = MLPPredictor(process, "velocity", dim=2, hidden=32).double()
    gen, z, t, eps = batch(process, seed=27)
    x0 = gen(z)
    per = fgm_generator_loss(x0, teacher, fake, t, eps=eps, reduction="none")
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    u, v = teacher(x_t, t), fake(x_t, t)
    ref = ((u - v) ** 2).sum(1) + 2 * ((u - v) * (v - (eps - x0))).sum(1)    # u(x_t|x0) = eps - x0 = (x_t - x0)/t
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    detached = (((u - v) ** 2).sum(1) + 2 * ((u - v) * (v - (eps - x0.detach()))).sum(1)).mean()
    assert (grads(gen, per.mean()) - grads(gen, detached)).abs().max() > 1e-3


# ---- fake score update -------------------------------------------------------------------------------------------
def test_fake_score_loss_is_denoising_on_detached_samples():
    from dstar_edu.objectives.pretrain import denoising_loss
    process = VP()
    _, fake = nets(process, 11)
    gen, z, t, eps = batch(process, seed=29)
    x0 = gen(z)
    a = fake_score_loss(fake, x0, t=t, eps=eps, target="eps", weighting="edm")
    b = denoising_loss(fake, x0.detach(), t=t, eps=eps, target="eps", weighting="edm")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.backward()
    assert gen.mu.grad is None and all(p.grad is not None for p in fake.parameters())


# ---- time distributions (SIM App. B.2) -----------------------------------------------------------------------------
def test_lognormal_time_distributions_within_standard_errors():
    process = VE(1e6)                  # t = sigma and no clamping in practice
    n = 20000
    for sampler, (m, s) in ((p_sim(process), (-3.5, 2.5)), (p_edm(process), (-1.2, 1.2))):
        log_sigma = torch.log(process.edm_sigma(sampler(n, g(31))))
        assert abs(log_sigma.mean().item() - m) <= 5 * s / math.sqrt(n)
        assert abs(log_sigma.std().item() - s) <= 5 * s / math.sqrt(2 * n)
    vp = VP()
    t = p_sim(vp, sigma_min=0.002, sigma_max=80.0)(5000, g(32))
    sig = vp.edm_sigma(t)
    assert sig.min().item() >= 0.002 * (1 - 1e-9) and sig.max().item() <= 80 * (1 + 1e-9)
    assert (t > 0).all() and (t <= 1).all()
    with pytest.raises(ValueError, match="sigma_min"):
        p_sim(vp, sigma_min=100.0, sigma_max=80.0)


def test_sid_karras_times():
    grid = karras_sigma_grid()
    assert grid[0].item() == pytest.approx(80.0) and grid[-1].item() == pytest.approx(0.002)
    ve = VE(80.0)
    t = p_sid(ve)(4000, g(33))
    assert t.max().item() == pytest.approx(80.0) and t.min().item() == pytest.approx(grid[800].item())
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert grid[800].item() == pytest.approx((a + 800 / 999 * (b - a)) ** 7)   # Eq. B.8 as printed: sigma in [0.084, 80]
    assert grid[800].item() == pytest.approx(0.0841, abs=1e-4)
    t = p_sid(ve, from_end="min")(4000, g(34))
    assert t.min().item() == pytest.approx(0.002)
    assert t.max().item() == pytest.approx((a + 199 / 999 * (b - a)) ** 7)     # counted from sigma_min: [0.002, 24.5]
    with pytest.raises(ValueError, match="from_end"):
        p_sid(ve, from_end="middle")


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_errors_name_the_argument():
    process = VP()
    teacher, fake = nets(process, 12)
    gen, z, t, eps = batch(process, seed=35)
    x0 = gen(z)
    with pytest.raises(ValueError, match="t is required"):
        sim_generator_loss(x0, teacher, fake, None)
    with pytest.raises(ValueError, match="outside the time domain"):
        sim_generator_loss(x0, teacher, fake, t + 2)
    with pytest.raises(ValueError, match="sigma\\(t\\) = 0"):
        sim_generator_loss(x0, teacher, fake, torch.zeros(8, dtype=F64))
    with pytest.raises(ValueError, match="eps has shape"):
        sim_generator_loss(x0, teacher, fake, t, eps=eps[:3])
    with pytest.raises(ValueError, match="teacher.process=.* and fake.process=.* differ"):
        sim_generator_loss(x0, teacher, MLPPredictor(VE(80.0), "eps", dim=2).double(), t)
    with pytest.raises(ValueError, match="space='eps' is unknown"):
        sim_generator_loss(x0, teacher, fake, t, space="eps")
    with pytest.raises(ValueError, match="reduction='max' is unknown"):
        sim_generator_loss(x0, teacher, fake, t, reduction="max")
    with pytest.raises(ValueError, match="distance='kl' is unknown"):
        sim_generator_loss(x0, teacher, fake, t, distance="kl")
    with pytest.raises(ValueError, match="weight has shape"):
        sim_generator_loss(x0, teacher, fake, t, weight=torch.ones(3))
    with pytest.raises(ValueError, match="x0 must be a floating tensor"):
        sim_generator_loss(torch.zeros(8, 2, dtype=torch.long), teacher, fake, t)
    with pytest.raises(ValueError, match="weighting='snr' is unknown"):
        sid_generator_loss(x0, teacher, fake, t, weighting="snr")
    with pytest.raises(ValueError, match="weighting='x' is unknown"):
        dmd_loss(x0, teacher, fake, t, weighting="x")
    with pytest.raises(ValueError, match="teacher=Linear must be a Predictor"):
        diff_instruct_loss(x0, torch.nn.Linear(2, 2), fake, t)


def test_nan_in_a_loss_raises():
    process = VP()
    teacher, _ = nets(process, 13)
    broken = FunctionPredictor(lambda x, t, c: torch.full_like(x, float("nan")), process, "eps")
    gen, z, t, eps = batch(process, seed=37)
    for loss in (sim_generator_loss, sid_generator_loss, diff_instruct_loss, vsd_loss, dmd_loss, fgm_generator_loss):
        with pytest.raises(FloatingPointError, match="not finite"):
            loss(gen(z), teacher, broken, t, eps=eps)
