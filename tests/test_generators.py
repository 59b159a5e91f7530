"""One-step generators: exact generators against torch.distributions and autograd, SIM's teacher-initialised
generator against the teacher's own x0-prediction, sampling statistics within their standard errors."""
import copy
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from dstar_edu.generators import (AffineGaussianGenerator, DiracGenerator, MixtureGenerator, MLPGenerator,
                                  TeacherInitGenerator)
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow
from toy_data.mixtures import GaussianMixture

F64 = torch.float64


def g(seed):
    return torch.Generator().manual_seed(seed)


A2 = torch.tensor([[0.7, 0.2], [-0.3, 0.5]], dtype=F64)
MU2 = torch.tensor([0.4, -1.0], dtype=F64)


def autograd_score(model, x, t, process):
    x = x.detach().clone().requires_grad_(True)
    (s,) = torch.autograd.grad(model.log_prob(x, t, process).sum(), x)
    return s


@pytest.mark.parametrize("process", [VP(), VE(80.0), RectifiedFlow()], ids=repr)
def test_affine_full_matches_multivariate_normal(process):
    gen = AffineGaussianGenerator(2, mean=MU2, A=A2)
    t = torch.tensor([0.05, 0.3, 0.7], dtype=F64)
    x = torch.randn(3, 2, generator=g(0), dtype=F64)
    a, s = process.alpha(t), process.sigma(t)
    ref = torch.stack([MultivariateNormal(a[i] * MU2, a[i] ** 2 * A2 @ A2.T + s[i] ** 2 * torch.eye(2, dtype=F64)
                                          ).log_prob(x[i]) for i in range(3)])
    torch.testing.assert_close(gen.log_prob(x, t, process), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gen.score(x, t, process), autograd_score(gen, x, t, process), rtol=1e-10, atol=1e-12)


def test_affine_diagonal_images_match_normal():
    process = VP()
    gen = AffineGaussianGenerator((3, 4, 4), structure="diagonal", mean=torch.linspace(-1, 1, 48, dtype=F64),
                                  A=torch.linspace(0.2, 1.5, 48, dtype=F64))
    assert gen.structure == "diagonal"
    t = torch.tensor([0.2, 0.6], dtype=F64)
    x = torch.randn(2, 3, 4, 4, generator=g(1), dtype=F64)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    ref = Normal(a * gen.mu.detach(), torch.sqrt(a ** 2 * gen.A.detach() ** 2 + s ** 2)).log_prob(x.reshape(2, -1)).sum(1)
    torch.testing.assert_close(gen.log_prob(x, t, process), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gen.score(x, t, process), autograd_score(gen, x, t, process), rtol=1e-10, atol=1e-12)


def test_affine_sample_statistics_within_standard_errors():
    gen = AffineGaussianGenerator(2, mean=MU2, A=A2)
    n = 40000
    x = gen.sample(n, g(2)).detach()
    cov = A2 @ A2.T
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - MU2).abs() <= 5 * se_mean).all()
    emp = torch.cov(x.T)
    se_cov = torch.sqrt((cov ** 2 + torch.outer(torch.diagonal(cov), torch.diagonal(cov))) / n)  # Gaussian s.e.
    assert ((emp - cov).abs() <= 5 * se_cov).all()


def test_sample_carries_gradient_and_is_seeded():
    for gen in (AffineGaussianGenerator(2, mean=MU2, A=A2), MixtureGenerator(3, 2, init_generator=g(0)),
                MLPGenerator(2), DiracGenerator(2, MU2)):
        x = gen.sample(5, g(3))
        assert x.requires_grad and x.shape == (5, 2)
        x.sum().backward()
        assert all(p.grad is not None for p in gen.parameters())
        assert torch.equal(gen.sample(5, g(3)), gen.sample(5, g(3)))


def test_score_predictor_live_vs_frozen():
    process = VP()
    gen = MixtureGenerator(2, (3, 2, 2), init_generator=g(4), log_scales=torch.tensor([-1.0, 0.3], dtype=F64))
    x = torch.randn(4, 3, 2, 2, generator=g(5), dtype=F64)
    t = torch.full((4,), 0.4, dtype=F64)
    live, frozen = gen.score_predictor(process), gen.score_predictor(process, frozen=True)
    assert live.prediction == "score" and list(live.parameters()) == [] and list(frozen.parameters()) == []
    live(x, t).pow(2).sum().backward()
    assert gen.means.grad.abs().sum() > 0 and gen.log_scales.grad.abs().sum() > 0
    assert not frozen(x, t).requires_grad
    before = frozen(x, t)
    with torch.no_grad():
        gen.means.add_(1.0)
    torch.testing.assert_close(frozen(x, t), before, rtol=0, atol=0)        # a snapshot of p_sg[theta]
    assert not torch.allclose(live(x, t), before)                            # the live one follows theta
    # x0 prediction through the conversion = the exact posterior mean of the generator's mixture
    torch.testing.assert_close(live.predict("x0", x, t), gen.mixture(process).posterior_mean(x, t), rtol=1e-10,
                               atol=1e-12)


def test_mixture_generator_matches_gaussian_mixture_and_autograd():
    process = VE(80.0)
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.0, -1.0]], dtype=F64)
    ls = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=F64))
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    gen = MixtureGenerator(3, 2, means=means, log_scales=ls, weights=w)
    ref = GaussianMixture(means, torch.exp(2 * ls), w, process=process)
    x = torch.randn(6, 2, generator=g(6), dtype=F64)
    t = torch.linspace(0.1, 2.0, 6, dtype=F64)
    torch.testing.assert_close(gen.log_prob(x, t, process), ref.log_prob(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gen.score(x, t, process), autograd_score(gen, x, t, process), rtol=1e-9, atol=1e-12)
    # sampling: component frequencies and per-component means within 5 standard errors
    n = 30000
    z = gen.noise(n, g(7))
    k = z[:, 0].long()
    x0 = gen(z).detach()
    freq = torch.bincount(k, minlength=3).double() / n
    assert ((freq - w).abs() <= 5 * torch.sqrt(w * (1 - w) / n)).all()
    for j in range(3):
        xs = x0[k == j]
        assert ((xs.mean(0) - means[j]).abs() <= 5 * torch.exp(ls[j]) / math.sqrt(len(xs))).all()


def test_mixture_diagonal_scales_and_errors():
    gen = MixtureGenerator(2, (3, 4), scale="diagonal", init_generator=g(8))
    assert gen.log_scales.shape == (2, 12)
    x = gen.sample(3, g(9))
    assert x.shape == (3, 3, 4)
    with pytest.raises(ValueError, match="K=0 must be a positive integer"):
        MixtureGenerator(0, 2)
    with pytest.raises(ValueError, match="weights="):
        MixtureGenerator(2, 2, weights=torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="scale='full' is unknown"):
        MixtureGenerator(2, 2, scale="full")
    with pytest.raises(ValueError, match=r"means has shape \(2, 3\)"):
        MixtureGenerator(2, 2, means=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="component column"):
        gen(torch.cat([torch.full((1, 1), 5.0, dtype=F64), torch.zeros(1, 12, dtype=F64)], 1))
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        gen.sample(0)


def test_dirac_score_is_the_conditional_score():
    process = VP()
    point = torch.tensor([0.3, -0.8], dtype=F64)
    gen = DiracGenerator(2, point)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    eps = torch.randn(3, 2, generator=g(10), dtype=F64)
    x_t, _ = process.q_sample(gen.sample(3).detach(), t, eps=eps)
    torch.testing.assert_close(gen.score(x_t, t, process), -eps / process.sigma(t)[:, None], rtol=1e-12, atol=1e-12)
    ref = Normal(process.alpha(t)[:, None] * point, process.sigma(t)[:, None]).log_prob(x_t).sum(1)
    torch.testing.assert_close(gen.log_prob(x_t, t, process), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        gen.score(x_t, torch.zeros(3, dtype=F64), process)


@pytest.mark.parametrize("process", [VE(80.0), VP(), DDPM(1000), RectifiedFlow()], ids=repr)
def test_teacher_init_generator_is_the_teacher_x0_prediction_at_sigma_2_5(process):
    torch.manual_seed(0)
    teacher = MLPPredictor(process, "eps", dim=2, hidden=32).double()
    gen = TeacherInitGenerator(teacher)
    sig = process.edm_sigma(gen.t_star).item()
    if process.discrete:
        assert float(gen.t_star).is_integer()
        lo, hi = process.edm_sigma(gen.t_star - 1).item(), process.edm_sigma(gen.t_star + 1).item()
        assert lo < 2.5 < hi
    else:
        assert sig == pytest.approx(2.5, rel=1e-9)
    z = gen.noise(20000, g(11))
    assert z.std().item() == pytest.approx(sig, rel=5 * math.sqrt(0.5 / 40000) * 2)   # z ~ N(0, sigma*^2 I)
    z = z[:4]
    t = torch.full((4,), gen.t_star, dtype=F64)
    ref = teacher.predict("x0", process.alpha(gen.t_star) * z, t)
    torch.testing.assert_close(gen(z), ref, rtol=1e-12, atol=1e-12)
    # a trainable copy: the teacher is untouched by updates of the generator
    before = copy.deepcopy(teacher.state_dict())
    gen(z).sum().backward()
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.1)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.allclose(gen(z), ref)


def test_teacher_init_generator_explicit_t_and_errors():
    teacher = MLPPredictor(VP(), "eps", dim=2, hidden=16)
    gen = TeacherInitGenerator(teacher, t_star=0.5)
    assert gen.t_star == 0.5 and gen.sigma_star == pytest.approx(VP().edm_sigma(0.5).item())
    with pytest.raises(ValueError, match="outside the time domain"):
        TeacherInitGenerator(teacher, t_star=2.0)
    with pytest.raises(ValueError, match="EDM noise level 0"):
        TeacherInitGenerator(teacher, t_star=0.0)
    with pytest.raises(ValueError, match="must be a dstar_edu Predictor"):
        TeacherInitGenerator(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="z has shape"):
        gen(torch.zeros(3, 5))


def test_teacher_init_generator_from_a_diffusers_unet():
    from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet
    teacher = DiffusersUNetPredictor(tiny_unet(), DDPM(1000), "epsilon")
    gen = TeacherInitGenerator(teacher)
    assert gen.event_shape == (3, 32, 32)
    assert gen.t_star == 441.0    # sigma_EDM = 2.5 on the linear DDPM schedule (diffusers timestep 440)
    x = gen.sample(2, g(12))
    assert x.shape == (2, 3, 32, 32) and x.requires_grad


def test_affine_errors():
    with pytest.raises(ValueError, match="structure='lowrank' is unknown"):
        AffineGaussianGenerator(2, structure="lowrank")
    with pytest.raises(ValueError, match=r"A has shape \(3, 3\); structure='full' needs \(2, 2\)"):
        AffineGaussianGenerator(2, A=torch.eye(3))
    with pytest.raises(ValueError, match="event shape"):
        AffineGaussianGenerator(0)
    gen = AffineGaussianGenerator(2)
    with pytest.raises(ValueError, match=r"x_t has shape \(3, 3\)"):
        gen.score(torch.zeros(3, 3, dtype=F64), 0.5, VP())
    with pytest.raises(ValueError, match="process must be a dstar_edu Process"):
        gen.score(torch.zeros(3, 2, dtype=F64), 0.5, "vp")
    with pytest.raises(ValueError, match="outside the time domain"):
        gen.score(torch.zeros(3, 2, dtype=F64), 1.5, VP())


def test_mlp_generator_shapes_and_errors():
    gen = MLPGenerator(2, latent_dim=4, hidden=16, depth=2)
    assert gen.sample(3, g(0)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"z has shape \(3, 2\)"):
        gen(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="hidden=0"):
        MLPGenerator(2, hidden=0)
