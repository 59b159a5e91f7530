"""Checks of seed formulas that only unit tests guarded before (ids ``guards.*``), so that ``dstar-edu verify``
alone catches a broken one: loss weightings, flow matching with sigma_min, the TrigFlow diffusion target,
alpha_bar of every process, the normalisation of the exact densities, DMD's weighting, Heun's corrector, NPO's
guidance, the fake-score loss (Eq. 42) and the condition-dropout (CFG) pre-training path.

Each check runs the library's public function against the seed formula written out here, or against a
quantity computed another way (autograd of a path for a velocity, ``torch.distributions`` for a density).
"""
from __future__ import annotations

import math

import torch

from dstar_edu.predictors import FunctionPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow
from dstar_edu.verify.fixtures import exact_data
from dstar_edu.verify.registry import DIMS, POINTWISE, check_generator, identity, monte_carlo, mutate, register

F64 = torch.float64
Tensor = torch.Tensor


_gen = check_generator                 # every random draw of a check (see registry.py on seeds)


def _batch(dim: int, n: int, seed: int):
    """x0 from the exact data (2D mixture; real CIFAR images at 3072-d) and standard-normal eps."""
    dist, what = exact_data(dim, VE(80.0))
    x0 = dist.sample(n, generator=_gen(seed)).reshape(n, -1)
    eps = torch.randn(x0.shape, generator=_gen(seed + 1), dtype=F64)
    return x0, eps, what


def _net(x: Tensor, t: Tensor) -> Tensor:
    """A fixed nonlinear 'network' output: depends on x_t and t, so a wrong input path changes it."""
    return torch.tanh(x) * (1 + t.reshape(-1, 1)) + 0.3 * x.roll(1, dims=1)


# ---- loss weightings (handbook Sec. 3.1.1; Min-SNR, Hang et al. 2023; EDM, Karras et al. 2022) -----------------
@register("guards.loss_weight", "Loss weightings SNR, Min-SNR-5 and EDM in every target space",
          "handbook Sec. 3.1.1 (L_DM, L_DM-v), Sec. 2.2.2; Karras et al. 2022 lambda(sigma)")
def loss_weight_check():
    """``loss_weight(w, target, t, process)`` against SNR = alpha^2/sigma^2, min(SNR, 5) |dx0/dtarget|^2 and
    (s^2 + sd^2)/(s sd)^2 |dx0/dtarget|^2 (s = sigma/alpha), with the gains dx0/dtarget written out per target:
    eps -sigma/alpha, x0 1, v sigma/sqrt(alpha^2+sigma^2), velocity -sigma/(alpha sigma' - sigma alpha'),
    score sigma^2/alpha; on VP, DDPM, VE, rectified flow and TrigFlow."""
    from dstar_edu.objectives.pretrain import loss_weight
    gains = {"eps": lambda p, t: -p.sigma(t) / p.alpha(t), "x0": lambda p, t: torch.ones_like(t),
             "v": lambda p, t: p.sigma(t) / torch.sqrt(p.alpha(t) ** 2 + p.sigma(t) ** 2),
             "velocity": lambda p, t: -p.sigma(t) / (p.alpha(t) * p.d_sigma(t) - p.sigma(t) * p.d_alpha(t)),
             "score": lambda p, t: p.sigma(t) ** 2 / p.alpha(t)}
    cases = [(VP(), torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=F64)),
             (DDPM(1000), torch.tensor([3.0, 100.0, 500.0, 990.0], dtype=F64)),
             (VE(80.0), torch.tensor([0.01, 0.5, 3.0, 60.0], dtype=F64)),
             (RectifiedFlow(), torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=F64)),
             (TrigFlow(0.5), torch.tensor([0.05, 0.5, 1.0, 1.5], dtype=F64))]
    lhs, rhs = [], []
    for p, t in cases:
        a, s = p.alpha(t), p.sigma(t)
        snr = a * a / (s * s)
        sig = mutate(s / a, s)                              # counterfactual: sigma for the EDM sigma/alpha
        lam = (sig * sig + 0.25) / (sig * 0.5) ** 2
        for target, gain in gains.items():
            g2 = gain(p, t) ** 2
            lhs += [loss_weight("snr", target, t, p), loss_weight("min_snr", target, t, p),
                    loss_weight("edm", target, t, p, sigma_data=0.5), loss_weight("none", target, t, p)]
            rhs += [snr, torch.clamp(snr, max=5.0) * g2, lam * g2, torch.ones_like(t)]
    # compared as ratios: the weights span 1e-4 .. 1e8, so a shared absolute tolerance would hide the small ones
    return identity(torch.cat(lhs) / torch.cat(rhs), torch.ones(sum(len(r) for r in rhs), dtype=F64), rtol=1e-10,
                    atol=0.0, data=POINTWISE)


# ---- flow matching with sigma_min (handbook Sec. 3.1.3) ----------------------------------------------------------
@register("guards.flow_matching_sigma_min", "Flow matching with sigma_min: path and target of Sec. 3.1.3",
          "handbook Sec. 3.1.3 (y_t = t y1 + (1 - (1 - sigma_min) t) y0), Eq. 28", dims=DIMS)
def flow_matching_sigma_min(dim):
    """Handbook time tau (data y1 = x0 at tau = 1, noise y0 = eps): y_tau = tau x0 + (1 - (1 - sigma_min) tau) eps,
    target dy/dtau (autograd of that path). The library works in s = 1 - tau with the velocity dx/ds = -dy/dtau:
    its per-sample ``flow_matching_loss`` with a fixed nonlinear velocity network v(x, s) must equal
    ||v(y_tau, s) + dy/dtau||^2, for sigma_min in {0, 1e-3, 0.1}; at sigma_min = 0 it also equals
    ``denoising_loss(target="velocity")`` on RectifiedFlow (Eq. 28)."""
    from dstar_edu.objectives.pretrain import denoising_loss, flow_matching_loss
    rf = RectifiedFlow()
    x0, eps, what = _batch(dim, 6, seed=300)
    s = torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.98], dtype=F64)
    net = FunctionPredictor(lambda x, t, c=None: _net(x, torch.as_tensor(t, dtype=F64).expand(x.shape[0])), rf,
                            "velocity")
    lhs, rhs = [], []
    for sigma_min in (0.0, 1e-3, 0.1):
        sm = mutate(sigma_min, 0.0) if sigma_min else sigma_min       # counterfactual: sigma_min ignored

        def path(tau):
            return tau[:, None] * x0 + (1 - (1 - sm) * tau[:, None]) * eps
        tau = 1 - s
        y, dy = torch.autograd.functional.jvp(path, tau, torch.ones_like(tau))
        lhs.append(flow_matching_loss(net, x0, sigma_min, t=s, eps=eps, reduction="none"))
        rhs.append(((net(y, s) + dy) ** 2).sum(1))
    lhs.append(denoising_loss(net, x0, t=s, eps=eps, target="velocity", reduction="none"))
    rhs.append(lhs[0])
    return identity(torch.cat(lhs), torch.cat(rhs), rtol=1e-12, data=what)


# ---- TrigFlow diffusion loss (handbook Sec. 2.5.1, 3.1.4) --------------------------------------------------------
@register("guards.trigflow_diffusion_target", "TrigFlow diffusion loss: target v_t = dx_t/dt of x_t = cos t x0 + "
          "sin t z", "handbook Sec. 2.5.1, 3.1.4", dims=DIMS)
def trigflow_diffusion_target(dim):
    """Per-sample ``trigflow_diffusion_loss`` (a fixed nonlinear F network) against ||sigma_d F(x_t, t) - dx_t/dt||^2
    with dx_t/dt by autograd of the path (z = sigma_d eps); both ends of [0, pi/2]."""
    from dstar_edu.objectives.pretrain import trigflow_diffusion_loss
    tf = TrigFlow(0.5)
    x0, eps, what = _batch(dim, 6, seed=310)
    z = 0.5 * eps
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.3, math.pi / 2], dtype=F64)
    net = FunctionPredictor(lambda x, tt, c=None: _net(x, torch.as_tensor(tt, dtype=F64).expand(x.shape[0])), tf,
                            "trigflow_F")

    def path(tt):
        return torch.cos(tt)[:, None] * x0 + torch.sin(tt)[:, None] * z
    x_t, v = torch.autograd.functional.jvp(path, t, torch.ones_like(t))
    v = mutate(v, -v)                                              # counterfactual: the target's sign
    lhs = trigflow_diffusion_loss(net, x0, t=t, z=z, reduction="none")
    return identity(lhs, ((0.5 * net(x_t, t) - v) ** 2).sum(1), rtol=1e-12, data=what)


# ---- alpha_bar of every process (handbook Sec. 2.2.1 notation map; Karras et al. 2022 Table 1) ------------------
@register("guards.alpha_bar_processes", "alpha_bar of every process is 1 / (1 + sigma_EDM(t)^2)",
          "handbook Sec. 2.2.1 (Demystify notations), Sec. 2.4-2.5; Karras et al. 2022 Table 1")
def alpha_bar_processes():
    """The DDPM-equivalent alpha_bar of a process is that of its variance-normalised version, 1/(1 + s^2) with the
    EDM noise level s written out per process: VE s = t, rectified flow s = t/(1-t), TrigFlow s = sigma_d tan t,
    VP s^2 = exp(int beta) - 1; and DDPM's table. Also ``edm_sigma`` itself."""
    t01 = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=F64)
    vp = VP()
    int_beta = vp.beta_min * t01 + 0.5 * (vp.beta_max - vp.beta_min) * t01 ** 2
    cases = [(VE(80.0), torch.tensor([0.002, 0.5, 1.0, 10.0, 80.0], dtype=F64), lambda t: t),
             (RectifiedFlow(), t01, lambda t: t / (1 - t)),
             (TrigFlow(0.5), torch.tensor([0.0, 0.3, 0.8, 1.2, 1.5], dtype=F64), lambda t: 0.5 * torch.tan(t)),
             (vp, t01, lambda t: torch.sqrt(torch.expm1(int_beta)))]
    lhs, rhs = [], []
    for p, t, s_edm in cases:
        ab = mutate(p.alpha_bar(t), p.alpha(t) ** 2)               # counterfactual: the VP formula alpha^2
        lhs += [ab, p.edm_sigma(t)]
        rhs += [1 / (1 + s_edm(t) ** 2), s_edm(t)]
    d = DDPM(1000)
    k = torch.tensor([1, 10, 500, 1000])
    lhs.append(d.alpha_bar(k.to(F64)))
    rhs.append(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)[k - 1])
    return identity(torch.cat(lhs), torch.cat(rhs), rtol=1e-10, atol=1e-14, data=POINTWISE)


# ---- normalisation of the exact densities ------------------------------------------------------------------------
@register("guards.mixture_log_density", "Exact log-densities and posterior means: isotropic / diagonal / full "
          "mixtures, affine generators", "handbook Eq. 6, 7 (diffused Gaussian mixtures); Luo talk (exact p_theta,t)")
def mixture_log_density():
    """``GaussianMixture.log_prob`` at t = 0 and t > 0 (VP) with isotropic, diagonal and full covariances against
    ``torch.distributions`` (MixtureSameFamily of MultivariateNormal with the diffused covariances alpha^2 C +
    sigma^2 I); the isotropic mixture's posterior mean against the same mixture given as full covariances; the
    affine generator's ``log_prob`` against MultivariateNormal(alpha mu, alpha^2 A A^T + sigma^2 I)."""
    from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

    from dstar_edu.generators import AffineGaussianGenerator
    from toy_data.mixtures import GaussianMixture
    p = VP()
    g = _gen(320)
    D, K = 3, 3
    means = torch.randn(K, D, generator=g, dtype=F64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    iso = torch.tensor([0.3, 0.8, 1.5], dtype=F64)
    diag = 0.2 + torch.rand(K, D, generator=g, dtype=F64)
    L = torch.randn(K, D, D, generator=g, dtype=F64) * 0.4
    full = L @ L.transpose(1, 2) + 0.1 * torch.eye(D, dtype=F64)
    x = torch.randn(5, D, generator=g, dtype=F64) * 1.5
    eye = torch.eye(D, dtype=F64)
    lhs, rhs = [], []
    for covs, full_covs in ((iso, iso[:, None, None] * eye), (diag, torch.diag_embed(diag)), (full, full)):
        mix = GaussianMixture(means, covs, w, process=p)
        for t in (0.0, 0.4):
            tt = torch.full((5,), t, dtype=F64)
            a, s = p.alpha(torch.tensor(t, dtype=F64)), p.sigma(torch.tensor(t, dtype=F64))
            ref = MixtureSameFamily(Categorical(probs=w),
                                    MultivariateNormal(a * means, a * a * full_covs + s * s * eye))
            lhs.append(mix.log_prob(x, tt) if t > 0 else mix.log_prob(x, None))
            rhs.append(ref.log_prob(x) + mutate(0.0, 0.5 * math.log(2 * math.pi)))   # cf: a missing 1/sqrt(2 pi)
    tt = torch.full((5,), 0.4, dtype=F64)
    lhs.append(GaussianMixture(means, iso, w, process=p).posterior_mean(x, tt).flatten())
    rhs.append(GaussianMixture(means, iso[:, None, None] * eye, w, process=p).posterior_mean(x, tt).flatten())
    A = torch.tensor([[0.8, 0.3, 0.0], [-0.2, 0.6, 0.1], [0.0, 0.2, 0.9]], dtype=F64)
    gen = AffineGaussianGenerator(D, mean=torch.tensor([0.2, -0.1, 0.4], dtype=F64), A=A)
    a, s = p.alpha(tt[0]), p.sigma(tt[0])
    lhs.append(gen.log_prob(x, tt, p).detach())
    rhs.append(MultivariateNormal(a * gen.mu.detach(), a * a * A @ A.T + s * s * eye).log_prob(x))
    return identity(torch.cat(lhs), torch.cat(rhs), rtol=1e-11, data=POINTWISE)


# ---- DMD's weighting (handbook Sec. 3.2.4) ----------------------------------------------------------------------
@register("guards.dmd_weighting", "DMD loss values under its weightings (handbook w(t), none, a number, a callable)",
          "handbook Sec. 3.2.4 (w(t) = 2 sigma^2/alpha C / ||x0 - D_q||_1), Eq. 45", dims=DIMS)
def dmd_weighting(dim):
    """Per-sample ``dmd_loss`` against (w/2) (alpha/sigma^2) ||D_psi(x_t) - D_q(x_t)||^2 with w written out:
    the handbook's 2 (sigma^2/alpha) C / ||x0 - D_q||_1 (so the loss is C/||x0 - D_q||_1 ||D_psi - D_q||^2),
    w = 1 ('none'), w = 0.7 and w(t) = 1 + t; x0 from the data, an exact teacher and a different exact fake."""
    from dstar_edu.generators import MixtureGenerator
    from dstar_edu.objectives.distill import dmd_loss
    p = VP()
    teacher, what = exact_data(dim, p)
    n = 5
    x0 = teacher.sample(n, generator=_gen(330))
    x0 = x0 + 0.1 * torch.randn(x0.shape, generator=_gen(332), dtype=F64)    # off the support: x0 != D_q
    shape = tuple(x0.shape[1:])
    fake = MixtureGenerator(2, shape if dim != 2 else 2, means=x0[:2].reshape(2, *shape) * 0.8,
                            log_scales=torch.zeros(2, dtype=F64)).score_predictor(p, frozen=True)
    eps = torch.randn(x0.shape, generator=_gen(331), dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=F64)
    a, s = p.alpha(t), p.sigma(t)
    x_t = a.reshape(-1, *[1] * len(shape)) * x0 + s.reshape(-1, *[1] * len(shape)) * eps
    D_q, D_f = teacher.predict("x0", x_t, t), fake.predict("x0", x_t, t)
    sq = ((D_f - D_q) ** 2).reshape(n, -1).sum(1)
    C = x0[0].numel()
    w_dmd = 2 * s * s / a * C / (x0 - D_q).abs().reshape(n, -1).sum(1)
    lhs, rhs = [], []
    for weighting, w in (("dmd", w_dmd), ("none", torch.ones_like(t)), (0.7, 0.7 * torch.ones_like(t)),
                         (lambda tt: 1 + tt, 1 + t)):
        lhs.append(dmd_loss(x0, teacher, fake, t, eps=eps, weighting=weighting, reduction="none"))
        rhs.append(mutate(0.5, 1.0) * w * a / (s * s) * sq)     # counterfactual: the 1/2 of (w/2) dropped
    return identity(torch.cat(lhs), torch.cat(rhs), rtol=1e-10, data=what)


# ---- Heun's corrector (Karras et al. 2022 Alg. 1; handbook Eq. 4) ------------------------------------------------
@register("guards.heun_step", "PF-ODE Heun step = Euler predictor + trapezoidal corrector with the exact velocity",
          "handbook Eq. 4, Sec. 2.7; Karras et al. 2022 Alg. 1", dims=DIMS)
def heun_step(dim):
    """``pf_ode_step(method='heun')`` on VE and VP against x + h (v(x, t) + v(x_e, t')) / 2, x_e = x + h v(x, t),
    with v from the exact *score* through the unified formula (Sec. 2.7), not the sampler's posterior-mean route."""
    from dstar_edu import conversions as cv
    from dstar_edu.samplers.diffusion import pf_ode_step

    lhs, rhs, what = [], [], None
    for p, (t0, t1) in ((VE(80.0), (2.0, 1.2)), (VP(), (0.7, 0.55))):
        dist, what = exact_data(dim, p)
        x = p.q_sample(dist.sample(3, generator=_gen(340)), torch.tensor(t0, dtype=F64), generator=_gen(341))[0]

        def v(y, t):
            tt = torch.tensor(t, dtype=F64)
            a, s = p.coefficients(tt, y)
            return cv.velocity_from_score(y, dist.score(y, t), a, s, p.d_alpha(tt), p.d_sigma(tt))
        h = t1 - t0
        xe = x + h * v(x, t0)
        lhs.append(pf_ode_step(dist, x, t0, t1, method=mutate("heun", "euler")))   # cf: no corrector
        rhs.append(x + 0.5 * h * (v(x, t0) + v(xe, t1)))
    return identity(torch.stack(lhs), torch.stack(rhs), rtol=1e-9, data=what)


# ---- NPO guidance (Wang talk) -------------------------------------------------------------------------------------
@register("guards.npo_guidance", "NPO guidance eps = (omega + 1) eps_pos - omega eps_neg; GuidedPredictor with a "
          "negative model is the same", "Wang talk (Diffusion-NPO guidance); handbook Eq. 23")
def npo_guidance():
    """``npo_guided_eps`` and ``GuidedPredictor(pos, omega, negative=neg)`` (eps predictions of two exact models)
    against the printed combination; omega in {0, 1.5, 7.5}."""
    from dstar_edu.objectives.alignment import GuidedPredictor
    from dstar_edu.objectives.preference import npo_guided_eps
    from toy_data.mixtures import GaussianMixture
    p = DDPM(1000)
    pos = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64), 0.2, process=p,
                          labels=torch.tensor([0, 1]))
    neg = GaussianMixture(torch.tensor([[0.0, 1.0], [0.5, -1.0]], dtype=F64), 0.3, process=p,
                          labels=torch.tensor([0, 1]))
    x = torch.randn(4, 2, generator=_gen(350), dtype=F64)
    t = torch.tensor([50.0, 200.0, 500.0, 900.0], dtype=F64)
    e_pos, e_neg = pos.predict("eps", x, t, 1), neg.predict("eps", x, t, 1)
    lhs, rhs = [], []
    for omega in (0.0, 1.5, 7.5):
        ref = (mutate(omega, -omega) + 1) * e_pos - omega * e_neg       # counterfactual: omega's sign in the first term
        guided = GuidedPredictor(pos, omega, negative=neg, uncond=1)
        lhs += [npo_guided_eps(e_pos, e_neg, omega), guided.predict("eps", x, t, 1)]
        rhs += [ref, ref]
    return identity(torch.stack(lhs), torch.stack(rhs), rtol=1e-10, data=POINTWISE)


# ---- the fake-score loss (handbook Eq. 42; SIM Alg. 1 phase 1) ----------------------------------------------------
@register("guards.fake_score_loss", "Fake-score loss (Eq. 42): DSM on detached generator samples",
          "handbook Eq. 42; SIM Alg. 1 (phase 1); Diff-Instruct Alg. 1", dims=DIMS)
def fake_score_loss_check(dim):
    """An exact mixture as the fake score s_psi (learnable means) and an affine generator: the per-sample
    ``fake_score_loss(target='score')`` equals ||s_psi(x_t) + eps/sigma||^2 (Eq. 42 with grad log q_t(x_t|x0) =
    -eps/sigma, Eq. 17), its gradient in the generator's parameters is exactly 0 (x0 = sg(g_theta(z))), and its
    gradient in psi equals that of the written-out loss."""
    from dstar_edu.generators import AffineGaussianGenerator, MixtureGenerator
    from dstar_edu.objectives.distill import fake_score_loss
    p = VE(80.0)
    g = _gen(360)
    shape = 2 if dim == 2 else (3, 32, 32)
    gen = AffineGaussianGenerator(shape, structure="diagonal" if dim != 2 else "full")
    psi_gen = MixtureGenerator(2, shape, means=torch.randn(2, dim, generator=g, dtype=F64).reshape(2, *(
        (dim,) if dim == 2 else shape)), log_scales=torch.zeros(2, dtype=F64))
    fake = psi_gen.score_predictor(p)
    n = 6
    z = gen.noise(n, g)
    eps = torch.randn(n, *gen.event_shape, generator=g, dtype=F64)
    t = torch.tensor([0.05, 0.3, 1.0, 3.0, 10.0, 60.0], dtype=F64)
    x0 = mutate(gen(z), None)
    if x0 is None:                                           # counterfactual: x0 not detached inside the loss
        from dstar_edu.objectives.pretrain import denoising_loss
        x0 = gen(z)
        loss_fn = lambda: denoising_loss(fake, x0, t=t, eps=eps, target="score", reduction="none")  # noqa: E731
    else:
        loss_fn = lambda: fake_score_loss(fake, x0, t=t, eps=eps, target="score", reduction="none")  # noqa: E731
    per = loss_fn()
    x_t = x0.detach() + t.reshape(-1, *[1] * (x0.ndim - 1)) * eps
    written = ((fake(x_t, t) + eps / t.reshape(-1, *[1] * (x0.ndim - 1))) ** 2).reshape(n, -1).sum(1)
    gen_params, psi_params = list(gen.parameters()), list(psi_gen.parameters())

    def grad(loss, params):
        gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        return torch.cat([(torch.zeros_like(q) if gg is None else gg).reshape(-1) for gg, q in zip(gs, params)])
    g_gen, g_psi = grad(per.sum(), gen_params), grad(per.sum(), psi_params)
    g_psi_ref = grad(written.sum(), psi_params)
    x_live = gen(z) + t.reshape(-1, *[1] * (x0.ndim - 1)) * eps        # the generator gradient without the sg
    live = ((fake(x_live, t) + eps / t.reshape(-1, *[1] * (x0.ndim - 1))) ** 2).sum()
    gen_scale = float(grad(live, gen_params).abs().max())
    # each block relative to its own scale (values, psi-gradient, generator gradient of the un-detached loss)
    return identity(torch.cat([per.detach() / written.abs().max(), g_gen / gen_scale, g_psi / g_psi_ref.abs().max()]),
                    torch.cat([written.detach() / written.abs().max(), torch.zeros_like(g_gen),
                               g_psi_ref / g_psi_ref.abs().max()]), rtol=1e-10, atol=1e-12,
                    gen_gradient_scale_without_detach=gen_scale,
                    data="affine generator, exact mixture fake score (" + POINTWISE + ")")


# ---- condition dropout for classifier-free guidance (handbook Eq. 23) ---------------------------------------------
@register("guards.cfg_dropout", "Condition dropout in pre-training: each sample is trained conditional or, with "
          "probability p_uncond, unconditional", "handbook Eq. 23 (CFG needs the unconditional branch)")
def cfg_dropout():
    """A class-conditional exact mixture as the predictor, per-sample ``denoising_loss(p_uncond=p, uncond=None)``:
    every sample's loss equals either its conditional or its unconditional loss (identities), and the fraction
    of unconditional ones is p within 5 binomial standard errors (n = 20000, p = 0.3; returned). p = 0 and p = 1
    reproduce the conditional and the unconditional losses exactly (checked, reported)."""
    from dstar_edu.objectives.pretrain import denoising_loss
    from toy_data.mixtures import GaussianMixture
    p = DDPM(1000)
    mix = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.3, -1.2]], dtype=F64), 0.1, process=p,
                          labels=torch.tensor([0, 1, 1]))
    n, pu = 20000, 0.3
    g = _gen(370)
    x0 = 1.5 * torch.randn(n, 2, generator=g, dtype=F64)
    eps = torch.randn(n, 2, generator=g, dtype=F64)
    t = torch.randint(1, 1000, (n,), generator=g).to(F64)
    cond = torch.randint(0, 2, (n,), generator=g)

    def eps_fn(x, tt, c=None):              # label -1 is the null condition: the unconditional mixture
        uncond = mix.predict("eps", x, tt)
        if c is None:
            return uncond
        c = torch.as_tensor(c).expand(x.shape[0])
        return torch.where((c < 0)[:, None], uncond, mix.predict("eps", x, tt, c.clamp(min=0)))
    model = FunctionPredictor(eps_fn, p, "eps")

    def per(c, p_uncond=0.0, gen=None):
        return denoising_loss(model, x0, t=t, eps=eps, target="eps", cond=c, reduction="none",
                              p_uncond=p_uncond, uncond=-1 if p_uncond else None, generator=gen)
    cond_loss = per(cond)
    uncond_loss = per(None)
    dropped = per(cond, mutate(pu, 1 - pu), _gen(371))                 # counterfactual: keep probability as p
    is_c = (dropped - cond_loss).abs() <= 1e-12 * cond_loss.abs().max()
    is_u = (dropped - uncond_loss).abs() <= 1e-12 * uncond_loss.abs().max()
    distinct = (cond_loss - uncond_loss).abs() > 1e-9
    frac = float((is_u & distinct).double().sum() / distinct.double().sum())
    m = int(distinct.sum())
    every = bool((is_c | is_u).all())
    ends = (float((per(cond, 1.0, _gen(372)) - uncond_loss).abs().max()),
            float((per(cond, 1e-300, _gen(373)) - cond_loss).abs().max()))
    res = monte_carlo(torch.tensor(frac), torch.tensor(pu), torch.tensor(math.sqrt(pu * (1 - pu) / m)), n=m,
                      every_sample_conditional_or_unconditional=every, p1_and_p0_max_abs_diff=ends,
                      data="3-component 2D mixture with labels, x0 ~ N(0, 1.5^2 I)")
    res.passed = res.passed and every and max(ends) <= 1e-12 * float(cond_loss.abs().max())
    return res


def _labelled_mixtures(p):
    from toy_data.mixtures import GaussianMixture
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.3, -1.2]], dtype=F64)
    labels = torch.tensor([0, 1, 1])
    return (GaussianMixture(means, 0.1, process=p, labels=labels),
            GaussianMixture(means * 0.7 + 0.2, 0.2, process=p, labels=labels))


# ---- CD with a CFG teacher (handbook Eq. 21, 23; LCM's guided distillation) ---------------------------------------
@register("guards.cd_cfg_teacher", "CD's Denoise with a CFG teacher: one DDIM step (Eq. 21) of the guided "
          "prediction eps(c) + w (eps(c) - eps(0)) (Eq. 23)", "handbook Eq. 21, 23, Sec. 2.3.1 (CD)")
def cd_cfg_teacher():
    """``ddim_denoise(teacher, x, t_from, t_to, cond, cfg_scale=w)`` on DDPM and VE against alpha(t_to) x0_w +
    sigma(t_to) eps_w written out, with eps_w = eps_c + w (eps_c - eps_u) from the class-conditional and the
    unconditional exact mixture and x0_w from Eq. 7; w in {0, 1.5, 7.5}, per-sample times."""
    from dstar_edu.objectives.pretrain import ddim_denoise
    lhs, rhs = [], []
    for p, tf, tt in ((DDPM(1000), [900.0, 500.0, 120.0, 30.0], [850.0, 400.0, 60.0, 0.0]),
                      (VE(80.0), [40.0, 5.0, 1.0, 0.3], [20.0, 2.0, 0.5, 0.0])):
        teacher, _ = _labelled_mixtures(p)
        x = torch.randn(4, 2, generator=_gen(380), dtype=F64) * 2
        t_from, t_to = torch.tensor(tf, dtype=F64), torch.tensor(tt, dtype=F64)
        e_c, e_u = teacher.predict("eps", x, t_from, 1), teacher.predict("eps", x, t_from)
        a, s = p.coefficients(t_from, x)
        a1, s1 = p.coefficients(t_to, x)
        for w in (0.0, 1.5, 7.5):
            e_w = e_c + mutate(w, w - 1) * (e_c - e_u)           # counterfactual: guidance scale off by one
            lhs.append(ddim_denoise(teacher, x, t_from, t_to, cond=1, cfg_scale=w))
            rhs.append(a1 * (x - s * e_w) / a + s1 * e_w)
    return identity(torch.stack(lhs), torch.stack(rhs), rtol=1e-10, data=POINTWISE)


# ---- Diffusion-DPO (Wang talk; Wallace et al. 2024 Eq. 14) ---------------------------------------------------------
@register("guards.diffusion_dpo", "Diffusion-DPO loss -log sigmoid(beta (h_w - h_l)) with the ELBO implicit reward",
          "Wang talk (Diffusion-DPO); Wallace et al. 2024 Eq. 14")
def diffusion_dpo():
    """Per-pair ``diffusion_dpo_loss`` (and NPO with winner and loser swapped) against
    -log sigmoid(-beta [(e_w - e_w^ref) - (e_l - e_l^ref)]) with e = ||eps - eps_model(x_t, t)||^2 written out,
    for beta in {0.1, 2.5}; two different exact mixtures as model and reference."""
    import torch.nn.functional as F

    from dstar_edu.objectives.preference import diffusion_dpo_loss, diffusion_npo_loss
    p = DDPM(1000)
    model, ref = _labelled_mixtures(p)
    g = _gen(390)
    x_w, x_l = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    eps = torch.randn(5, 2, generator=g, dtype=F64)
    t = torch.tensor([10.0, 100.0, 300.0, 600.0, 900.0], dtype=F64)

    def err(m, x0):
        x_t = p.q_sample(x0, t, eps=eps)[0]
        return ((eps - m.predict("eps", x_t, t)) ** 2).sum(1)
    d_w, d_l = err(model, x_w) - err(ref, x_w), err(model, x_l) - err(ref, x_l)
    lhs, rhs = [], []
    for beta in (0.1, 2.5):
        b = mutate(beta, 1.0)                                      # counterfactual: beta ignored
        lhs += [diffusion_dpo_loss(model, ref, x_w, x_l, beta=beta, t=t, eps_w=eps, reduction="none"),
                diffusion_npo_loss(model, ref, x_w, x_l, beta=beta, t=t, eps_w=eps, reduction="none")]
        rhs += [-F.logsigmoid(-b * (d_w - d_l)), -F.logsigmoid(-b * (d_l - d_w))]
    return identity(torch.cat(lhs), torch.cat(rhs), rtol=1e-10, data=POINTWISE)


# ---- log-normal time distributions (SIM App. B.2, Eq. B.5-B.6 and B.9-B.10) -------------------------------------
def _clamped_normal_cdf(q: Tensor, mean: float, std: float, lo: float, hi: float) -> Tensor:
    """P(clamp(Y, lo, hi) <= q) for Y ~ N(mean, std^2): Phi((q - mean)/std) inside [lo, hi), 1 from hi on."""
    cdf = 0.5 * torch.erfc(-(q - mean) / (std * math.sqrt(2)))
    return torch.where(q >= hi, torch.ones_like(cdf), cdf)


@register("guards.lognormal_time_distributions",
          "p_EDM and p_SIM draw ln sigma ~ N(P_mean, P_std^2) (clamped to the range) in the process's own time",
          "SIM App. B.2, Eq. B.5-B.6 (p_EDM) and B.9-B.10 (p_SIM)")
def lognormal_time_distributions():
    """For VE(80) and VP, 20 000 times from ``p_edm`` (ln sigma ~ N(-1.2, 1.2^2)) and ``p_sim`` (N(-3.5, 2.5^2)) are
    mapped back to the EDM noise level ``sigma(t)/alpha(t)`` (``process.at(t).edm_sigma``); the empirical CDF of
    ln sigma at 7 points (P_mean + k P_std, k = -3..3, those inside the clamp range) must equal the clamped normal's
    within 5 binomial s.e. ``sqrt(p (1 - p) / n)``. Counterfactual: P_std used as a variance (P_std^2), the slip
    between N(m, s) and N(m, s^2): >= 16 s.e. away at n = 20 000."""
    from dstar_edu.process import VP as _VP
    from dstar_edu.times import p_edm, p_sim
    n, est, ref, se, rows = 20000, [], [], [], []
    for process in (VE(80.0), _VP()):
        lo, hi = (float(process.at(t).edm_sigma) for t in (process.t_min, process.t_max))
        lo = max(lo, 1e-300)
        for name, make, (m, s) in (("p_edm", p_edm, (-1.2, 1.2)), ("p_sim", p_sim, (-3.5, 2.5))):
            t = make(process, m, mutate(s, s * s))(n, _gen(900 + len(rows)))      # counterfactual: P_std as variance
            log_sigma = process.at(t).edm_sigma.log()
            q = torch.tensor([m + k * s for k in range(-3, 4)], dtype=F64)
            q = q[(q > math.log(lo)) & (q < math.log(hi))]
            p = _clamped_normal_cdf(q, m, s, math.log(lo), math.log(hi))
            emp = (log_sigma[:, None] <= q[None, :]).to(F64).mean(0)
            est.append(emp)
            ref.append(p)
            se.append((p * (1 - p) / n).sqrt())
            rows.append({"process": type(process).__name__, "distribution": name, "points": q.tolist(),
                         "empirical": emp.tolist(), "clamped_normal": p.tolist()})
    return monte_carlo(torch.cat(est), torch.cat(ref), torch.cat(se), n=n, per_distribution=rows)
