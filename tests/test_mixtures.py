"""Exact mixtures against torch.distributions, autograd, importance sampling and direct formulas."""
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from dstar_edu.process import DDPM, VE, RectifiedFlow
from toy_data.mixtures import EmpiricalDistribution, GaussianMixture

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


MEANS2 = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64)
W3 = torch.tensor([0.5, 0.3, 0.2], dtype=F64)


def full_covs2():
    A = torch.tensor([[[0.5, 0.2], [0.1, 0.3]], [[0.3, -0.1], [0.0, 0.4]], [[0.4, 0.0], [0.2, 0.2]]], dtype=F64)
    return A @ A.transpose(1, 2) + 0.02 * torch.eye(2, dtype=F64)


def case(kind, process=None):
    """(mixture, dense (K, D, D) covariances, means (K, D), weights, event_shape)."""
    if kind == "iso2":
        var = torch.tensor([0.05, 0.2, 0.1], dtype=F64)
        dense = var[:, None, None] * torch.eye(2, dtype=F64)
        return GaussianMixture(MEANS2, var, W3, process=process), dense, MEANS2, W3, (2,)
    if kind == "diag2":
        var = torch.tensor([[0.05, 0.3], [0.2, 0.02], [0.1, 0.1]], dtype=F64)
        return GaussianMixture(MEANS2, var, W3, process=process), torch.diag_embed(var), MEANS2, W3, (2,)
    if kind == "full2":
        c = full_covs2()
        return GaussianMixture(MEANS2, c, W3, process=process), c, MEANS2, W3, (2,)
    if kind == "diag3x8x8":
        g = gen(11)
        means = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
        var = 0.05 + 0.5 * torch.rand(3, 3, 8, 8, generator=g, dtype=F64)
        return (GaussianMixture(means, var, W3, process=process), torch.diag_embed(var.reshape(3, -1)),
                means.reshape(3, -1), W3, (3, 8, 8))
    raise KeyError(kind)


KINDS = ["iso2", "diag2", "full2", "diag3x8x8"]


def reference(dense, means, weights, a=1.0, s=0.0):
    """torch.distributions mixture of N(a mu_k, a^2 Sigma_k + s^2 I), built independently."""
    D = means.shape[1]
    cov = a * a * dense + s * s * torch.eye(D, dtype=F64)
    if D > 2:  # the image case is diagonal: a product of univariate normals is cheaper than a 192-d Cholesky
        assert torch.equal(cov, torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2)))
        comps = Independent(Normal(a * means, torch.diagonal(cov, dim1=1, dim2=2).sqrt()), 1)
    else:
        comps = MultivariateNormal(a * means, covariance_matrix=cov)
    return MixtureSameFamily(Categorical(probs=weights), comps)


def ref_score(ref, x):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ref.log_prob(x).sum(), x)
    return g


def points(kind, n, seed):
    mix, dense, means, w, shape = case(kind)
    return torch.randn(n, *shape, generator=gen(seed), dtype=F64) * 1.5


# float64 throughout; the mixture works in the eigenbasis, torch.distributions with Cholesky factors;
# both lose ~D * eps64 * (|log p| + Mahalanobis^2) ~ 1e-12 for D <= 192 here, so rtol 1e-10.
RTOL = 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_data_vs_torch_distributions(kind):
    mix, dense, means, w, shape = case(kind)
    x = points(kind, 16, 1)
    ref = reference(dense, means, w)
    torch.testing.assert_close(mix.log_prob(x), ref.log_prob(x.reshape(16, -1)), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("proc, t", [(DDPM(1000), 250.0), (VE(80.0), 1.5), (RectifiedFlow(), 0.6)],
                         ids=["ddpm", "ve", "rf"])
def test_diffused_log_prob_and_score(kind, proc, t):
    mix, dense, means, w, shape = case(kind, proc)
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    x = points(kind, 16, 2)
    ref = reference(dense, means, w, a, s)
    xf = x.reshape(16, -1)
    torch.testing.assert_close(mix.log_prob(x, t), ref.log_prob(xf), rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(mix.score(x, t).reshape(16, -1), ref_score(ref, xf), rtol=1e-9, atol=1e-9)
    # per-sample times: the same numbers row by row
    tb = torch.full((16,), t, dtype=F64)
    torch.testing.assert_close(mix.score(x, tb), mix.score(x, t), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_score_vs_autograd_of_own_log_prob(kind):
    mix, *_ = case(kind, DDPM(1000))
    x = points(kind, 8, 3).requires_grad_(True)
    t = torch.tensor([5.0, 50, 100, 200, 400, 600, 800, 999], dtype=F64)
    (g,) = torch.autograd.grad(mix.log_prob(x, t).sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), t), g, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_responsibilities_bayes_rule(kind):
    mix, dense, means, w, shape = case(kind, DDPM(1000))
    t = 150.0
    a, s = float(mix.process.alpha(t)), float(mix.process.sigma(t))
    x = points(kind, 16, 4)
    r = mix.responsibilities(x, t)
    comps = reference(dense, means, w, a, s).component_distribution
    joint = torch.log(w) + comps.log_prob(x.reshape(16, 1, -1))
    torch.testing.assert_close(r, torch.softmax(joint, -1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.sum(-1), torch.ones(16, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_mean_tweedie(kind):
    """E[x0 | x_t] by Gaussian conditioning vs Tweedie (x_t + sigma^2 score)/alpha, score from torch.distributions."""
    proc = DDPM(1000)
    mix, dense, means, w, shape = case(kind, proc)
    t = torch.tensor([10.0, 100, 300, 600], dtype=F64)
    x = points(kind, 4, 5)
    xf = x.reshape(4, -1)
    tweedie = []
    for i in range(4):
        a, s = float(proc.alpha(t[i])), float(proc.sigma(t[i]))
        sc = ref_score(reference(dense, means, w, a, s), xf[i:i + 1])
        tweedie.append((xf[i:i + 1] + s * s * sc) / a)
    # dividing by alpha (>= 0.27 here) and multiplying by sigma^2 keeps errors at ~1e-12
    torch.testing.assert_close(mix.posterior_mean(x, t).reshape(4, -1), torch.cat(tweedie), rtol=1e-9, atol=1e-9)


def test_posterior_mean_importance_sampling_2d():
    """Self-normalised importance sampling with the prior as proposal: p(x0|x_t) propto p(x0) N(x_t; a x0, s^2 I)."""
    proc = DDPM(1000)
    mix, dense, means, w, _ = case("full2", proc)
    t = 200.0
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    x_t = torch.tensor([[0.3, -0.4], [-1.0, 0.8], [1.2, 0.1]], dtype=F64)
    n = 400_000
    torch.manual_seed(0)
    x0 = reference(dense, means, w).sample((n,))     # proposal: the data distribution
    logw = -((x_t[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s * s)   # (3, n)
    wt = torch.softmax(logw, -1)
    est = wt @ x0                                     # (3, 2)
    # delta-method standard error of a self-normalised estimator: sqrt(sum w_i^2 (x_i - est)^2)
    se = torch.sqrt((wt[:, :, None] ** 2 * (x0[None] - est[:, None]) ** 2).sum(1))
    ess = 1 / (wt ** 2).sum(-1)
    assert (ess > 10_000).all()                       # the normal approximation of the estimator is valid
    exact = mix.posterior_mean(x_t, t)
    z = ((exact - est).abs() / se).max().item()
    assert z <= 5, f"max z = {z:.2f}, se = {se.max().item():.2e}"


def test_sample_moments():
    mix, dense, means, w, _ = case("full2")
    n = 200_000
    x, k = mix.sample(n, generator=gen(6), return_components=True)
    m = w @ means
    cov = (w[:, None, None] * (dense + means[:, :, None] * means[:, None, :])).sum(0) - m[:, None] * m[None, :]
    # mean: s.e. sqrt(diag cov / n); second moments about the true mean: s.e. from the sample std of the products
    se_m = torch.sqrt(torch.diag(cov) / n)
    assert ((x.mean(0) - m).abs() <= 5 * se_m).all()
    c = x - m
    prod = c[:, :, None] * c[:, None, :]
    se_c = prod.std(0) / math.sqrt(n)
    assert ((prod.mean(0) - cov).abs() <= 5 * se_c).all()
    # component frequencies: binomial s.e.
    freq = torch.bincount(k, minlength=3).to(F64) / n
    assert ((freq - w).abs() <= 5 * torch.sqrt(w * (1 - w) / n)).all()
    torch.testing.assert_close(mix.mean(), m, rtol=1e-14, atol=1e-14)


def test_sample_moments_diag_images():
    mix, dense, means, w, shape = case("diag3x8x8")
    n = 20_000
    x = mix.sample(n, generator=gen(7)).reshape(n, -1)
    m = w @ means
    var = (w[:, None] * (torch.diagonal(dense, dim1=1, dim2=2) + means ** 2)).sum(0) - m ** 2
    assert ((x.mean(0) - m).abs() <= 5 * torch.sqrt(var / n)).all()
    # 192 coordinates tested at 5 s.e.: the chance of a false alarm is 192 * 5.7e-7 ~ 1e-4
    v = ((x - m) ** 2)
    assert ((v.mean(0) - var).abs() <= 5 * v.std(0) / math.sqrt(n)).all()


@pytest.mark.parametrize("shape", [(2,), (3, 4, 4)], ids=["2d", "3x4x4"])
def test_empirical_posterior_mean_is_softmax_average(shape):
    proc = DDPM(1000)
    pts = torch.randn(20, *shape, generator=gen(8), dtype=F64)
    emp = EmpiricalDistribution(pts, process=proc)
    t = torch.tensor([20.0, 200, 700], dtype=F64)
    x = torch.randn(3, *shape, generator=gen(9), dtype=F64)
    P, X = pts.reshape(20, -1), x.reshape(3, -1)
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    logits = -((X[:, None, :] - a[:, :, None] * P[None]) ** 2).sum(-1) / (2 * s ** 2)
    post = torch.softmax(logits, -1) @ P
    torch.testing.assert_close(emp.posterior_mean(x, t).reshape(3, -1), post, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(emp.score(x, t).reshape(3, -1), (a * post - X) / s ** 2, rtol=1e-9, atol=1e-9)
    lp = torch.logsumexp(logits, -1) - math.log(20) - 0.5 * X.shape[1] * torch.log(2 * math.pi * s[:, 0] ** 2)
    torch.testing.assert_close(emp.log_prob(x, t), lp, rtol=1e-10, atol=1e-10)


def _labelled(process):
    return GaussianMixture(MEANS2, full_covs2(), W3, labels=[0, 1, 0], process=process)


def test_class_conditional_selects_components():
    proc = DDPM(1000)
    mix = _labelled(proc)
    x = points("full2", 6, 10)
    t = 120.0
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    dense = full_covs2()
    for label, keep in ((0, [0, 2]), (1, [1])):
        w = W3[keep] / W3[keep].sum()
        ref = reference(dense[keep], MEANS2[keep], w, a, s)
        torch.testing.assert_close(mix.score(x, t, cond=label), ref_score(ref, x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mix.score(x, t, cond=label), mix.conditional(label).score(x, t),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mix.log_prob(x, t, cond=label), ref.log_prob(x), rtol=RTOL, atol=RTOL)
    # per-sample labels equal the row-wise conditional scores
    cond = torch.tensor([0, 1, 0, 1, 1, 0])
    rows = torch.stack([mix.score(x[i:i + 1], t, cond=int(c))[0] for i, c in enumerate(cond)])
    torch.testing.assert_close(mix.score(x, t, cond=cond), rows, rtol=1e-12, atol=1e-12)
    # cond=None is the full mixture
    torch.testing.assert_close(mix.score(x, t), ref_score(reference(dense, MEANS2, W3, a, s), x),
                               rtol=1e-9, atol=1e-9)
    # sampling a class draws only its components: sample mean = mean of that class's sub-mixture
    n = 50_000
    xs = mix.sample(n, generator=gen(12), cond=1)
    se = torch.sqrt(torch.diag(dense[1]) / n)
    assert ((xs.mean(0) - MEANS2[1]).abs() <= 5 * se).all()


@pytest.mark.parametrize("kind", ["full2", "diag3x8x8"])
def test_mixture_is_a_predictor(kind):
    proc = DDPM(1000)
    mix, dense, means, w, shape = case(kind, proc)
    x = points(kind, 4, 13)
    t = 300.0
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    sc = ref_score(reference(dense, means, w, a, s), x.reshape(4, -1)).reshape(x.shape)
    torch.testing.assert_close(mix.predict("eps", x, t), -s * sc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mix.predict("x0", x, t), (x + s * s * sc) / a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mix.predict("score", x, t), sc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mix(x, t), sc, rtol=1e-9, atol=1e-9)
    assert mix.prediction == "score"


def test_isotropic_matrix_product_path_equals_diagonal_path():
    """Isotropic components use |x - a mu|^2 expanded with matrix products; the diagonal code path
    (elementwise differences) is an independent evaluation of the same mixture. float64 cancellation in
    the expansion costs ~1e-13 relative at these scales."""
    g = torch.Generator().manual_seed(40)
    means = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    var = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.3], dtype=torch.float64)
    process = VE(80.0)
    iso = GaussianMixture(means, var, process=process)
    diag = GaussianMixture(means, var[:, None, None, None].expand(6, 3, 4, 4), process=process)
    assert (iso.cov_type, diag.cov_type) == ("isotropic", "diagonal")
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.7, 1.5, 4.0], dtype=torch.float64)
    torch.testing.assert_close(iso.log_prob(x, t), diag.log_prob(x, t), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(iso.score(x, t), diag.score(x, t), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(iso.posterior_mean(x, t), diag.posterior_mean(x, t), rtol=1e-9, atol=1e-11)
