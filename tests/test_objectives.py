"""Objectives (dstar_edu.objectives): every loss against an independent reference.

References are closed forms for Gaussian data (posterior variances, exact flow maps), a different
formula for the same quantity (per-target gains written out here), or Monte-Carlo estimates compared
within 5 of their own standard errors.
"""
import math

import pytest
import torch

from dstar_edu.objectives import (consistency_distillation_loss, consistency_training_loss, ddim_denoise,
                                  denoising_loss, divergence, explicit_score_matching_loss, flow_matching_loss,
                                  get_pair_distance, implicit_score_matching_loss, l2, loss_weight, make_t_sampler,
                                  pseudo_huber, sample_t, t_from_edm_sigma, trigflow_ct_gradient_surrogate,
                                  trigflow_diffusion_loss)
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VE, VP, Process, RectifiedFlow, TrigFlow
from toy_data.mixtures import GaussianMixture, eight_gaussians_mixture

F64 = torch.float64
N_SIGMA = 5.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_mc(estimate, reference, per_sample_residual, what=""):
    """|estimate - reference| <= 5 standard errors of the per-sample residual's mean."""
    n = per_sample_residual.numel()
    se = float(per_sample_residual.detach().std() / math.sqrt(n))
    err = abs(float(torch.as_tensor(estimate).detach()) - float(torch.as_tensor(reference).detach()))
    assert err <= N_SIGMA * se, (f"{what}: |{float(estimate):.6g} - {float(reference):.6g}| = {err:.3g} "
                                 f"> 5 se = {5 * se:.3g}")


def gaussian(process, shape=(2,), seed=0):
    g = gen(seed)
    mu = 0.5 * torch.randn(shape, generator=g, dtype=F64)
    lam = 0.05 + 0.45 * torch.rand(shape, generator=g, dtype=F64)
    return mu, lam, GaussianMixture(mu[None], lam[None], process=process)


def post_var(process, t, lam):
    """sum_d Var(x0_d | x_t) for x0 ~ N(mu, diag(lam)): lam s^2 / (a^2 lam + s^2)."""
    a = process.alpha(t).reshape(-1, *[1] * lam.ndim)
    s = process.sigma(t).reshape(-1, *[1] * lam.ndim)
    return (lam * s * s / (a * a * lam + s * s)).reshape(t.shape[0], -1).sum(1)


def gain(process, target, t):
    """d x0_hat / d target at fixed x_t, written out per target (independent of the library's router)."""
    a, s, da, ds = process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t)
    r = torch.sqrt(a * a + s * s)
    return {"x0": torch.ones_like(t), "eps": -s / a, "score": s * s / a, "v": s / r, "v_bar": -s / r,
            "velocity": -s / (a * ds - s * da)}[target]


PROCESSES = {"ddpm": lambda: DDPM(1000), "vp": lambda: VP(), "rf": lambda: RectifiedFlow(),
             "trigflow": lambda: TrigFlow(0.5), "ve": lambda: VE(80.0)}


# ---- denoising losses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc,target,shape", [("ddpm", "v", (3, 4, 4)), ("vp", "eps", (2,)), ("rf", "x0", (3, 4, 4)),
                                               ("trigflow", "eps", (2,)), ("ve", "score", (2,))])
def test_exact_predictor_loss_is_posterior_variance(proc, target, shape):
    """Loss at the exact (Tweedie) predictor = E_t[sum_d Var(x0_d|x_t) / gain^2], 2D and image-shaped."""
    process = PROCESSES[proc]()
    _, lam, exact = gaussian(process, shape)
    n = 3000 if shape == (2,) else 400
    x0 = exact.sample(n, generator=gen(1))
    t = sample_t(process, n, "edm_lognormal" if proc == "ve" else None, generator=gen(2))
    per = denoising_loss(exact, x0, t=t, target=target, generator=gen(3), reduction="none")
    m = post_var(process, t, lam) / gain(process, target, t) ** 2
    assert_mc(per.mean(), m.mean(), per - m, f"{proc}/{target}")


@pytest.mark.parametrize("proc,target,weighting", [("ddpm", "eps", "none"), ("vp", "v", "min_snr"),
                                                   ("rf", "velocity", "none"), ("ve", "x0", "edm")])
def test_perturbing_the_optimum_adds_exactly_w_delta_squared(proc, target, weighting):
    """L(exact + delta) - L(exact) = E[w(t)] ||delta||^2: the cross term 2 w delta^T(pred* - target) has mean 0."""
    process = PROCESSES[proc]()
    _, _, exact = gaussian(process)
    delta = torch.tensor([0.3, -0.2], dtype=F64)
    bumped = FunctionPredictor(lambda x, t, c: exact.predict(target, x, t) + delta, process, target)
    n = 4000
    x0 = exact.sample(n, generator=gen(4))
    t = sample_t(process, n, "edm_lognormal" if proc == "ve" else None, generator=gen(5))
    eps = torch.randn(n, 2, generator=gen(6), dtype=F64)
    kw = dict(t=t, eps=eps, target=target, weighting=weighting, reduction="none")
    diff = denoising_loss(bumped, x0, **kw) - denoising_loss(exact, x0, **kw)
    w = loss_weight(weighting, target, t, process)
    expected = w * (delta ** 2).sum()
    assert_mc(diff.mean(), expected.mean(), diff - expected, f"{proc}/{target}")
    assert float(diff.mean()) > 0


@pytest.mark.parametrize("proc", ["ddpm", "vp", "rf", "trigflow"])
def test_every_target_has_the_same_minimiser(proc):
    """For any predictor, per sample: L_target * gain_target(t)^2 = L_x0 (errors are proportional given
    x_t), so all targets are minimised by the same denoiser (handbook Sec. 2.6)."""
    process = PROCESSES[proc]()
    torch.manual_seed(0)
    net = MLPPredictor(process, "eps", dim=2, hidden=16, depth=1).double()
    x0 = eight_gaussians_mixture().sample(64, generator=gen(7))
    t = sample_t(process, 64, generator=gen(8))
    eps = torch.randn(64, 2, generator=gen(9), dtype=F64)
    with torch.no_grad():
        ref = denoising_loss(net, x0, t=t, eps=eps, target="x0", reduction="none")
        for target in ("eps", "v", "v_bar", "velocity", "score"):
            got = denoising_loss(net, x0, t=t, eps=eps, target=target, reduction="none") * gain(process, target, t) ** 2
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12, msg=f"{proc}/{target}")


def test_weightings_match_their_closed_forms():
    """Min-SNR-5 is min(SNR,5)/SNR on eps, min(SNR,5)/(SNR+1) on v, min(SNR,5) on x0; EDM on eps is
    (sigma^2 + sd^2)/sd^2 (its x0 weight times sigma^2); 'snr' is alpha^2/sigma^2."""
    p = VP()
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    snr = (p.alpha(t) / p.sigma(t)) ** 2
    torch.testing.assert_close(loss_weight("min_snr", "eps", t, p), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(loss_weight("min_snr", "v", t, p), torch.clamp(snr, max=5) / (snr + 1))
    torch.testing.assert_close(loss_weight("min_snr", "x0", t, p), torch.clamp(snr, max=5))
    sig = p.edm_sigma(t)
    torch.testing.assert_close(loss_weight("edm", "eps", t, p), (sig ** 2 + 0.25) / 0.25)
    torch.testing.assert_close(loss_weight("snr", "velocity", t, p), snr)
    torch.testing.assert_close(loss_weight(lambda tt: 2 * tt, "eps", t, p), 2 * t)


# ---- flow matching / TrigFlow --------------------------------------------------------------------------------
def test_flow_matching_at_sigma_min_zero_is_the_velocity_denoising_loss():
    p = RectifiedFlow()
    torch.manual_seed(1)
    net = MLPPredictor(p, "velocity", dim=2, hidden=16, depth=1).double()
    x0 = eight_gaussians_mixture().sample(128, generator=gen(10))
    t = sample_t(p, 128, generator=gen(11))
    eps = torch.randn(128, 2, generator=gen(12), dtype=F64)
    fm = flow_matching_loss(net, x0, 0.0, t=t, eps=eps, reduction="none")
    dn = denoising_loss(net, x0, t=t, eps=eps, target="velocity", reduction="none")
    torch.testing.assert_close(fm, dn, rtol=1e-12, atol=1e-14)
    # same with an x0-predicting network (conversion through the RectifiedFlow process)
    net_x0 = MLPPredictor(p, "x0", dim=2, hidden=16, depth=1).double()
    torch.testing.assert_close(flow_matching_loss(net_x0, x0, t=t, eps=eps, reduction="none"),
                               denoising_loss(net_x0, x0, t=t, eps=eps, target="velocity", reduction="none"))


def _fm_optimum(mu, lam, sigma_min):
    """E[u | x_s] for x0 ~ N(mu, diag lam) on the sigma_min path (Gaussian conditioning), and Var(u | x_s)."""
    c = 1 - sigma_min

    def coefs(t):
        A = (1 - t)[:, None]
        B = (sigma_min + c * t)[:, None]
        var_x = A * A * lam + B * B
        cov = -A * lam + c * B
        return A, var_x, cov

    def fn(x, t, cond):
        A, var_x, cov = coefs(t)
        return -mu + cov / var_x * (x - A * mu)

    def cond_var(t):
        A, var_x, cov = coefs(t)
        return (lam + c * c - cov * cov / var_x).sum(1)
    return FunctionPredictor(fn, RectifiedFlow(), "velocity"), cond_var


@pytest.mark.parametrize("sigma_min", [0.0, 0.2])
def test_flow_matching_optimum_is_the_conditional_velocity(sigma_min):
    """At E[u | x_s] the loss equals E[sum_d Var(u_d | x_s)] (closed form); the sigma_min = 0 optimum is
    worse on the sigma_min = 0.2 path by exactly its squared distance to the right optimum."""
    mu, lam, exact = gaussian(None)
    opt, cond_var = _fm_optimum(mu, lam, sigma_min)
    n = 4000
    x0 = exact.sample(n, generator=gen(13))
    t = sample_t(RectifiedFlow(), n, generator=gen(14))
    eps = torch.randn(n, 2, generator=gen(15), dtype=F64)
    per = flow_matching_loss(opt, x0, sigma_min, t=t, eps=eps, reduction="none")
    m = cond_var(t)
    assert_mc(per.mean(), m.mean(), per - m, f"sigma_min={sigma_min}")
    if sigma_min > 0:
        other, _ = _fm_optimum(mu, lam, 0.0)
        x_s = (1 - t)[:, None] * x0 + (sigma_min + (1 - sigma_min) * t)[:, None] * eps
        gap = ((other(x_s, t) - opt(x_s, t)) ** 2).sum(1)
        diff = flow_matching_loss(other, x0, sigma_min, t=t, eps=eps, reduction="none") - per
        assert_mc(diff.mean(), gap.mean(), diff - gap, "sigma_min=0 optimum on the sigma_min path")
        assert float(gap.mean()) > 5 * float((diff - gap).std() / math.sqrt(n))  # the paths really differ


def test_trigflow_diffusion_loss_is_the_velocity_loss():
    """Handbook Sec. 2.5.1: ||sigma_d F - (cos t z - sin t x0)||^2 equals the library's velocity target with
    z = sigma_d eps, for a trigflow_F network and for the exact mixture."""
    p = TrigFlow(0.5)
    torch.manual_seed(2)
    net = MLPPredictor(p, "trigflow_F", dim=2, hidden=16, depth=1).double()
    exact = eight_gaussians_mixture(p)
    x0 = exact.sample(200, generator=gen(16))
    t = sample_t(p, 200, generator=gen(17))
    eps = torch.randn(200, 2, generator=gen(18), dtype=F64)
    for pred in (net, exact):
        tf = trigflow_diffusion_loss(pred, x0, t=t, z=0.5 * eps, reduction="none")
        dn = denoising_loss(pred, x0, t=t, eps=eps, target="velocity", reduction="none")
        torch.testing.assert_close(tf, dn, rtol=1e-12, atol=1e-14)


# ---- time samplers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc", ["rf", "vp", "trigflow", "ddpm", "ve"])
def test_edm_lognormal_moments(proc):
    """ln(sigma(t)/alpha(t)) ~ N(P_mean, P_std^2) after the map to the process's own time."""
    process = PROCESSES[proc]()
    n = 20000
    t = make_t_sampler(process, "edm_lognormal", P_mean=-0.5, P_std=0.8)(n, gen(19))
    process.check_t(t)
    y = torch.log(process.edm_sigma(t))
    assert_mc(y.mean(), -0.5, y - (-0.5), "mean")
    z2 = (y + 0.5) ** 2
    assert_mc(z2.mean(), 0.64, z2 - 0.64, "variance")


def test_other_time_samplers():
    p = RectifiedFlow()
    n = 20000
    u = sample_t(p, n, "uniform", generator=gen(20), lo=0.2, hi=0.6)
    assert float(u.min()) > 0.2 and float(u.max()) < 0.6
    assert_mc(u.mean(), 0.4, u - 0.4, "uniform mean")
    assert_mc(((u - 0.4) ** 2).mean(), 0.4 ** 2 / 12, (u - 0.4) ** 2 - 0.4 ** 2 / 12, "uniform variance")
    lg = sample_t(p, n, "logit_normal", generator=gen(21), m=0.5, s=1.5)
    y = torch.log(lg / (1 - lg))
    assert_mc(y.mean(), 0.5, y - 0.5, "logit mean")
    assert_mc(((y - 0.5) ** 2).mean(), 2.25, (y - 0.5) ** 2 - 2.25, "logit variance")
    d = sample_t(DDPM(10), n, generator=gen(22))
    assert set(d.unique().tolist()) == set(range(1, 11))
    assert_mc(d.mean(), 5.5, d - 5.5, "discrete mean")
    # same generator seed, same times
    torch.testing.assert_close(sample_t(p, 50, "edm_lognormal", generator=gen(3)),
                               sample_t(p, 50, "edm_lognormal", generator=gen(3)))


class _Quadratic(Process):
    """alpha = 1, sigma = t^2 on [0, 3]: a process the closed forms don't know (bisection path)."""
    name = "quadratic"
    t_max = 3.0

    def _alpha(self, t):
        return torch.ones_like(t)

    def _sigma(self, t):
        return t * t

    def _d_alpha(self, t):
        return torch.zeros_like(t)

    def _d_sigma(self, t):
        return 2 * t


@pytest.mark.parametrize("process", [DDPM(1000), DDPM(50, "cosine"), VP(), VP("cosine"), VE(80.0), RectifiedFlow(),
                                     TrigFlow(0.7), _Quadratic()], ids=repr)
def test_t_from_edm_sigma_inverts_edm_sigma(process):
    t = torch.linspace(process.t_min, process.t_max, 101, dtype=F64)[1:-1]
    s = process.edm_sigma(t)
    torch.testing.assert_close(t_from_edm_sigma(process, s), t, rtol=1e-9, atol=1e-10)


# ---- score matching ------------------------------------------------------------------------------------------------
def test_exact_divergence_and_hutchinson():
    """Exact divergence of a linear map is its trace; Hutchinson's estimate is unbiased for a nonlinear map."""
    A = torch.randn(3, 3, generator=gen(23), dtype=F64)
    x = torch.randn(5, 3, generator=gen(24), dtype=F64)
    _, div = divergence(lambda y: y @ A.T, x)
    torch.testing.assert_close(div, torch.trace(A).expand(5))
    W = torch.randn(3, 3, generator=gen(25), dtype=F64)

    def psi(y):
        return torch.tanh(y @ W.T) * y
    _, exact = divergence(psi, x[:1])
    xs = x[:1].expand(20000, 3)
    _, est = divergence(psi, xs, method="hutchinson", generator=gen(26), create_graph=False)
    assert_mc(est.mean(), exact[0], est - exact[0], "Hutchinson")


def test_esm_and_ism_on_images_shape():
    """J_ESM and J_ISM accept (batch, C, H, W) and agree with the flattened computation."""
    x = torch.randn(4, 2, 3, 3, generator=gen(27), dtype=F64)
    score = -x / 0.7

    def psi(y):
        return -0.5 * y + 0.1 * torch.sin(y)

    def psi_flat(y):
        return psi(y.reshape(-1, 2, 3, 3)).reshape(y.shape[0], -1)
    torch.testing.assert_close(explicit_score_matching_loss(psi, x, score, reduction="none"),
                               explicit_score_matching_loss(psi_flat, x.reshape(4, -1), score.reshape(4, -1),
                                                            reduction="none"))
    ism = implicit_score_matching_loss(psi, x, reduction="none")
    manual = 0.5 * (psi(x) ** 2).reshape(4, -1).sum(1) + (-0.5 + 0.1 * torch.cos(x)).reshape(4, -1).sum(1)
    torch.testing.assert_close(ism, manual)


# ---- distances --------------------------------------------------------------------------------------------------
def test_distances():
    x = torch.randn(6, 3, 4, generator=gen(28), dtype=F64)
    y = torch.randn(6, 3, 4, generator=gen(29), dtype=F64)
    r = ((x - y) ** 2).sum((1, 2))
    torch.testing.assert_close(l2(x, y), r)
    torch.testing.assert_close(pseudo_huber(x, y, 0.3), torch.sqrt(r + 0.09) - 0.3)
    tiny = y + 1e-9
    torch.testing.assert_close(pseudo_huber(tiny, y, 0.5), l2(tiny, y) / 1.0, rtol=1e-6, atol=0)  # r / (2c)
    z = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(pseudo_huber(z, y, 0.1).sum(), z)
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0
    with pytest.raises(ValueError, match="c=-1"):
        pseudo_huber(x, y, -1)
    with pytest.raises(ValueError, match="needs the constant c"):
        get_pair_distance("pseudo_huber")
    with pytest.raises(ValueError, match="distance='l1'"):
        get_pair_distance("l1")
    with pytest.raises(ValueError, match="shape"):
        l2(x, y[:, :2])


# ---- consistency losses ------------------------------------------------------------------------------------------
S0 = 0.5


def _f_star(mu, eps_t=0.002):
    """Exact consistency function of N(mu, S0^2 I) under VE: mu + k(t) (x - mu), k = sqrt((S0^2+e^2)/(S0^2+t^2))."""
    def fn(x, t, c):
        k = torch.sqrt((S0 ** 2 + eps_t ** 2) / (S0 ** 2 + t ** 2))[:, None]
        return mu + k * (x - mu)
    return FunctionPredictor(fn, VE(80.0), "x0")


def _exact_ode(mu):
    def step(x, t_from, t_to):
        return mu + torch.sqrt((S0 ** 2 + t_to ** 2) / (S0 ** 2 + t_from ** 2))[:, None] * (x - mu)
    return step


def test_ct_loss_at_the_exact_consistency_function():
    """CT at f* (theta = theta- = f*) is not zero: per pair E||f*(x_n+1) - f*(x_n)||^2 =
    D (k_n+1^2 B + k_n^2 A - 2 k_n k_n+1 C), A, B = S0^2 + t^2, C = S0^2 + t_n t_n+1 (Gaussian moments)."""
    mu = torch.tensor([0.2, -0.1], dtype=F64)
    data = GaussianMixture(mu[None], S0 ** 2)
    grid = torch.tensor([0.002, 0.1, 0.3, 0.6, 1.0, 2.0], dtype=F64)
    n = 20000
    x0 = data.sample(n, generator=gen(30))
    idx = torch.randint(0, 5, (n,), generator=gen(31))
    per = consistency_training_loss(_f_star(mu), None, x0, grid, n=idx, generator=gen(32), parameterization="x0",
                                    reduction="none")
    tl, th = grid[idx], grid[idx + 1]
    k = lambda t: torch.sqrt((S0 ** 2 + 0.002 ** 2) / (S0 ** 2 + t ** 2))  # noqa: E731
    A, B, C = S0 ** 2 + tl ** 2, S0 ** 2 + th ** 2, S0 ** 2 + tl * th
    expected = 2 * (k(th) ** 2 * B + k(tl) ** 2 * A - 2 * k(tl) * k(th) * C)
    assert_mc(per.mean(), expected.mean(), per - expected, "CT at f*")
    assert float(expected.mean()) > 1e-3


@pytest.mark.parametrize("m", [1, 2, 3])
def test_cd_with_exact_ode_is_zero_at_the_exact_consistency_function(m):
    mu = torch.tensor([0.2, -0.1], dtype=F64)
    teacher = GaussianMixture(mu[None], S0 ** 2, process=VE(80.0))
    grid = torch.tensor([0.002, 0.1, 0.3, 0.6, 1.0, 2.0], dtype=F64)
    x0 = teacher.sample(500, generator=gen(33))
    per = consistency_distillation_loss(_f_star(mu), None, teacher, x0, grid, m=m, generator=gen(34),
                                        parameterization="x0", denoise=_exact_ode(mu), reduction="none")
    assert float(per.abs().max()) < 1e-24


def test_cd_multistep_ddim_matches_the_sampler_ddim_step():
    """Denoise^m (Eq. 22) equals m calls of samplers.diffusion.ddim_step (an independent DDIM implementation)."""
    from dstar_edu.samplers.diffusion import ddim_step
    p = DDPM(1000)
    teacher = eight_gaussians_mixture(p)
    grid = torch.tensor([1.0, 100.0, 250.0, 500.0, 800.0], dtype=F64)
    x0 = teacher.sample(32, generator=gen(35))
    eps = torch.randn(32, 2, generator=gen(36), dtype=F64)
    captured = {}

    def capture(a, b):
        captured["target"] = b
        return l2(a, b)
    ident = FunctionPredictor(lambda x, t, c: x, p, "x0")
    consistency_distillation_loss(ident, ident, teacher, x0, grid, m=3, n=1, eps=eps, parameterization="x0",
                                  distance=capture)
    x, _ = p.q_sample(x0, grid[4], eps=eps)
    for j in (4, 3, 2):
        x = ddim_step(teacher, x, grid[j], grid[j - 1])
    torch.testing.assert_close(captured["target"], x, rtol=1e-10, atol=1e-12)


def test_ddim_denoise_with_cfg_is_eq23():
    """Eq. 23: eps_w = eps(c) + w (eps(c) - eps(uncond)); then x = alpha x0_w + sigma eps_w (Eq. 21)."""
    p = VP()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    base = eight_gaussians_mixture()
    teacher = GaussianMixture(base.means, 0.01, labels=labels, process=p)
    x = torch.randn(16, 2, generator=gen(37), dtype=F64)
    t_from, t_to = torch.full((16,), 0.6, dtype=F64), torch.full((16,), 0.4, dtype=F64)
    cond = torch.tensor([0, 1, 2, 3] * 4)
    w = 2.5
    got = ddim_denoise(teacher, x, t_from, t_to, cond=cond, cfg_scale=w)
    e_c, e_u = teacher.predict("eps", x, t_from, cond), teacher.predict("eps", x, t_from)
    eps_w = (1 + w) * e_c - w * e_u
    a_f, s_f = p.alpha(0.6), p.sigma(0.6)
    x0_w = (x - s_f * eps_w) / a_f
    torch.testing.assert_close(got, p.alpha(0.4) * x0_w + p.sigma(0.4) * eps_w, rtol=1e-10, atol=1e-12)


def test_trigflow_surrogate_gradient_equals_the_handbook_second_form():
    """grad E[f_theta^T df-/dt] = grad E[-sin t sigma_d F_theta^T df-/dt] (cos t x_t has no parameters), with
    df-/dt here by a central finite difference along x_s = cos s x0 + sin s z (truncation O(h^2))."""
    p = TrigFlow(0.5)
    torch.manual_seed(3)
    model = MLPPredictor(p, "trigflow_F", dim=2, hidden=16, depth=1).double()
    x0 = 0.25 * eight_gaussians_mixture().sample(64, generator=gen(38))
    eps = torch.randn(64, 2, generator=gen(39), dtype=F64)
    t = 0.3 + torch.rand(64, generator=gen(40), dtype=F64)
    params = list(model.parameters())
    g1 = torch.autograd.grad(trigflow_ct_gradient_surrogate(model, x0, t=t, eps=eps), params)

    def f(s):
        x_s = torch.cos(s)[:, None] * x0 + 0.5 * torch.sin(s)[:, None] * eps
        return model.predict("x0", x_s, s)
    # truncation ~ h^2 w^2 / 6 with w = 1000 / (pi/2) the fastest time feature of the MLP: 7e-8 at h = 1e-6
    h = 1e-6
    with torch.no_grad():
        dfdt = (f(t + h) - f(t - h)) / (2 * h)
    x_t = torch.cos(t)[:, None] * x0 + 0.5 * torch.sin(t)[:, None] * eps
    second = (-torch.sin(t)[:, None] * 0.5 * model(x_t, t) * dfdt).sum(1).mean()
    g2 = torch.autograd.grad(second, params)
    a, b = torch.cat([q.reshape(-1) for q in g1]), torch.cat([q.reshape(-1) for q in g2])
    assert float((a - b).norm() / a.norm()) < 1e-6


# ---- errors -----------------------------------------------------------------------------------------------------
def test_nan_in_a_loss_raises():
    p = RectifiedFlow()
    nan_net = FunctionPredictor(lambda x, t, c: x * float("nan"), p, "velocity")
    x0 = torch.randn(8, 2, dtype=F64)
    with pytest.raises(FloatingPointError, match="denoising_loss"):
        denoising_loss(nan_net, x0, generator=gen(0))
    with pytest.raises(FloatingPointError, match="flow_matching_loss"):
        flow_matching_loss(nan_net, x0, generator=gen(0))
    with pytest.raises(FloatingPointError, match="consistency_training_loss"):
        consistency_training_loss(nan_net, None, x0, [0.1, 0.5, 0.9], generator=gen(0), parameterization="velocity")


def test_bad_inputs_name_the_argument():
    p = RectifiedFlow()
    net = MLPPredictor(p, "velocity", dim=2, hidden=8, depth=1).double()
    x0 = torch.randn(8, 2, dtype=F64)
    with pytest.raises(ValueError, match="t=1.5 is outside"):
        denoising_loss(net, x0, t=1.5)
    with pytest.raises(ValueError, match="prediction='eps_hat'"):
        denoising_loss(net, x0, target="eps_hat")
    with pytest.raises(ValueError, match="weighting='p2'"):
        denoising_loss(net, x0, weighting="p2")
    with pytest.raises(ValueError, match="kind='cosine'"):
        denoising_loss(net, x0, t_sampler="cosine")
    with pytest.raises(ValueError, match="'discrete' needs a discrete process"):
        sample_t(p, 4, "discrete")
    with pytest.raises(ValueError, match="eps has shape"):
        denoising_loss(net, x0, eps=torch.randn(8, 3, dtype=F64))
    with pytest.raises(ValueError, match="reduction='avg'"):
        denoising_loss(net, x0, reduction="avg")
    with pytest.raises(ValueError, match="x0 must be a floating-point tensor"):
        denoising_loss(net, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="sigma_min=1.0"):
        flow_matching_loss(net, x0, 1.0)
    with pytest.raises(ValueError, match="needs a predictor whose prediction is 'velocity'"):
        flow_matching_loss(MLPPredictor(p, "eps", dim=2, hidden=8, depth=1).double(), x0, 0.1)
    with pytest.raises(ValueError, match="RectifiedFlow process"):
        flow_matching_loss(MLPPredictor(VP(), "eps", dim=2, hidden=8, depth=1).double(), x0)
    with pytest.raises(ValueError, match="TrigFlow process"):
        trigflow_diffusion_loss(net, x0)
    with pytest.raises(ValueError, match="exactly one of t_grid"):
        consistency_training_loss(net, None, x0, [0.1, 0.5], t_pair=(0.1, 0.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        consistency_training_loss(net, None, x0, [0.5, 0.1])
    with pytest.raises(ValueError, match="n has values"):
        consistency_training_loss(net, None, x0, [0.1, 0.5], n=1)
    teacher = eight_gaussians_mixture(VP())
    with pytest.raises(ValueError, match="differs from model.process"):
        consistency_distillation_loss(net, None, teacher, x0, [0.1, 0.5])
    with pytest.raises(ValueError, match="m=0"):
        consistency_distillation_loss(net, None, eight_gaussians_mixture(p), x0, [0.1, 0.5], m=0)
    with pytest.raises(ValueError, match="m=3 steps need a t_grid"):
        consistency_distillation_loss(net, None, eight_gaussians_mixture(p), x0, [0.1, 0.5], m=3)
    with pytest.raises(ValueError, match="P_std"):
        sample_t(p, 4, "lognormal", P_mean=0.0)
    with pytest.raises(ValueError, match="n=0"):
        sample_t(p, 0)


def test_losses_are_reproducible_and_dimension_agnostic():
    """Same seed, same loss; an image-shaped batch gives the loss of its flattened copy (exact predictor)."""
    p = DDPM(1000)
    mu, lam, exact_img = gaussian(p, (3, 4, 4), seed=5)
    flat = GaussianMixture(mu.reshape(1, -1), lam.reshape(1, -1), process=p)
    x0 = exact_img.sample(16, generator=gen(41))
    a = denoising_loss(exact_img, x0, generator=gen(42), target="v", weighting="min_snr", reduction="none")
    b = denoising_loss(flat, x0.reshape(16, -1), generator=gen(42), target="v", weighting="min_snr", reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    same = [float(denoising_loss(exact_img, x0, generator=gen(s))) for s in (1, 1, 2)]
    assert same[0] == same[1] != same[2]


def test_condition_dropout_for_classifier_free_guidance():
    """p_uncond = 1 is the unconditional loss, 0 the conditional one; in between each sample's loss is one of
    the two, and the dropped fraction matches p_uncond (binomial standard error)."""
    p = DDPM(100)
    torch.manual_seed(4)
    net = MLPPredictor(p, "eps", dim=2, hidden=16, depth=1, num_classes=3).double()
    n = 4000
    x0 = torch.randn(n, 2, generator=gen(43), dtype=F64)
    cond = torch.randint(0, 3, (n,), generator=gen(44))
    t = sample_t(p, n, generator=gen(45))
    eps = torch.randn(n, 2, generator=gen(46), dtype=F64)
    kw = dict(t=t, eps=eps, reduction="none")
    with torch.no_grad():
        c = denoising_loss(net, x0, cond=cond, **kw)
        u = denoising_loss(net, x0, cond=torch.full((n,), 3), **kw)
        for p_uncond, expected in ((1.0, u), (0.0, c)):
            got = denoising_loss(net, x0, cond=cond, p_uncond=p_uncond, uncond=3, generator=gen(0), **kw)
            torch.testing.assert_close(got, expected)
        mixed = denoising_loss(net, x0, cond=cond, p_uncond=0.3, uncond=3, generator=gen(0), **kw)
    dropped = (mixed - u).abs() < 1e-12
    assert bool((dropped | ((mixed - c).abs() < 1e-12)).all())
    frac = dropped.double()
    assert_mc(frac.mean(), 0.3, frac - 0.3, "dropped fraction")
    with pytest.raises(ValueError, match="needs both cond"):
        denoising_loss(net, x0, p_uncond=0.1, **kw)
