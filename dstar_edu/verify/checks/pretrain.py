"""Checks of the training objectives (handbook Sec. 2.2.2, 2.3.1, 2.5.1, 3.1, 3.2.6), in float64.

Exact where possible: for a Gaussian data distribution every loss of a linear model is the expectation
of a quadratic polynomial in ``(x0, eps)``, and the ``2n`` symmetric sigma points ``m +- sqrt(n) L e_i``
of an ``n``-dimensional Gaussian ``N(m, L L^T)`` (equal weights) integrate every polynomial of degree
<= 3 exactly. Running the library's loss functions on those points with ``reduction="mean"`` therefore
returns the exact expectation, so score-matching equivalences and consistency-training fixed points
become float64 identities. Statements about nonlinear models and mixtures are Monte-Carlo checks whose
tolerance is 5 standard errors of the estimate (reported).
"""
from __future__ import annotations

import functools
import math

import torch

from dstar_edu.objectives import (consistency_distillation_loss, consistency_training_loss, ddim_denoise,
                                  denoising_loss, explicit_score_matching_loss, implicit_score_matching_loss,
                                  sample_t, trigflow_ct_gradient_surrogate)
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow
from dstar_edu.training import cpu_threads
from dstar_edu.verify.measure import sigma_points, fit_log_slope, richardson2
from dstar_edu.verify.registry import DIMS, check_generator, check_seed, erratum, identity, monte_carlo, mutate, register

F64 = torch.float64
Tensor = torch.Tensor


_gen = check_generator                 # every random draw of a check (see registry.py on seeds)


def _gaussian2d():
    from toy_data.mixtures import GaussianMixture
    mu = torch.tensor([0.3, -0.2], dtype=F64)
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=F64)
    return mu, cov, lambda process=None: GaussianMixture(mu[None], cov[None], process=process)


def _linear_params(K: int, D: int, seed: int):
    g = _gen(seed)
    return [(torch.randn(D, D, generator=g, dtype=F64), torch.randn(D, generator=g, dtype=F64)) for _ in range(K)]


def _tanh_params(K: int, D: int, hidden: int, seed: int):
    """Nonlinear score models psi(x) = -a x + W2 tanh(W1 x + c) + b (scaled so that psi = O(1)); the
    shrinkage ``-a x`` (a > 0 differs between models) has divergence -a D, which makes a wrong divergence
    or a wrong conditional score visible in any dimension."""
    g = _gen(seed)
    out = []
    for _ in range(K):
        a = 0.2 + 0.6 * torch.rand((), generator=g, dtype=F64)
        W1 = torch.randn(hidden, D, generator=g, dtype=F64) / math.sqrt(D)
        c = torch.randn(hidden, generator=g, dtype=F64)
        W2 = torch.randn(D, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
        b = 0.3 * torch.randn(D, generator=g, dtype=F64)
        out.append((a, W1, c, W2, b))
    return out


def _tanh_psi(params):
    a, W1, c, W2, b = params

    def psi(x):
        flat = x.reshape(x.shape[0], -1)
        return (-a * flat + torch.tanh(flat @ W1.T + c) @ W2.T + b).reshape(x.shape)
    return psi


# ---- Hyvarinen: ESM = ISM + C --------------------------------------------------------------------------
@register("training.esm_ism", "ESM = ISM + C (Hyvarinen): exact for a linear score model on Gaussian data",
          "handbook Sec. 2.2.2 (J_ESM = J_ISM + C)", dims=(2,))
def esm_ism(dim):
    """J_ESM(theta) - J_ISM(theta) = 1/2 E||grad log q||^2 = 1/2 tr(Sigma^-1) for every theta.

    q = N(mu, Sigma) in 2D, psi_theta(x) = A x + b for 6 random (A, b). Both integrands are quadratic in
    x, so the library losses evaluated on the 4 sigma points of q (equal weights) are the exact
    expectations; the ISM divergence is the autograd trace. The spread of J_ESM across theta (reported)
    shows that the constancy of the difference is not trivial.
    """
    mu, cov, make = _gaussian2d()
    q = make()
    x = sigma_points(mu, cov)
    diffs, esms = [], []
    for A, b in _linear_params(6, dim, seed=1):
        def psi(y, A=A, b=b):
            return y @ A.T + b
        j_esm = explicit_score_matching_loss(psi, x, q.score)
        j_ism = implicit_score_matching_loss(psi, x, divergence_method="exact")
        diffs.append((j_esm - j_ism).detach())
        esms.append(float(j_esm))
    C = mutate(0.5, 1.0) * torch.trace(torch.linalg.inv(cov))      # counterfactual: the 1/2 dropped
    lhs = torch.stack(diffs)
    return identity(lhs, C.expand_as(lhs), rtol=1e-12, atol=1e-13, J_ESM_range=[min(esms), max(esms)],
                    C=float(C), data="N(mu, Sigma) in 2D, exact sigma-point expectations")


def _exact_data(dim: int, process):
    from dstar_edu.verify.fixtures import exact_data
    return exact_data(dim, process)


@register("training.esm_ism_mc", "ESM - ISM is the same for every score model (mixture data, nonlinear psi)",
          "handbook Sec. 2.2.2 (J_ESM = J_ISM + C)", dims=DIMS)
def esm_ism_mc(dim):
    """Per sample, d_i(theta) = esm_i - ism_i; E[d(theta_k) - d(theta_0)] = 0 (Stein's identity).

    2D: the 3-component full-covariance mixture, exact autograd divergence. 3072D: the diffused
    empirical image distribution p_t (VE, t = 20), Hutchinson divergence (unbiased). psi_theta(x) =
    -a x + W2 tanh(W1 x + c) + b for 4 parameter sets; the same samples for every theta (paired differences),
    tolerance 5 standard errors of each mean difference. Reported: ``C_hat = 1/2 mean ||score||^2`` and
    the mean difference that dropping the divergence term would give (in standard errors), to show the
    check would notice a wrong divergence.
    """
    if dim == 2:
        process, t = None, None
        dist, what = _exact_data(2, VE(80.0))
        n, method, hidden = 40000, "exact", 16     # 40000: the dropped-divergence counterfactual at z > 10
        x = dist.sample(n, generator=_gen(2))
        score = dist.score(x, None)
    else:
        process, t = VE(80.0), 20.0
        dist, what = _exact_data(dim, process)
        n, method, hidden = 64, "hutchinson", 8
        x, _ = process.q_sample(dist.sample(n, generator=_gen(2)), t, generator=_gen(3))
        score = dist.score(x, t)
    per_theta, no_div = [], []
    for k, params in enumerate(_tanh_params(4, x[0].numel(), hidden, seed=4)):
        psi = _tanh_psi(params)
        esm = explicit_score_matching_loss(psi, x, score, reduction="none")
        ism = implicit_score_matching_loss(psi, x, divergence_method=method, generator=_gen(10 + k),
                                           reduction="none")
        per_theta.append((esm - ism).detach())
        no_div.append((esm - 0.5 * (psi(x) ** 2).reshape(n, -1).sum(1)).detach())
    per_theta = mutate(per_theta, no_div)              # counterfactual: the divergence term dropped
    pairs = torch.stack([d - per_theta[0] for d in per_theta[1:]])
    se = pairs.std(1) / math.sqrt(n)
    wrong = torch.stack([d - no_div[0] for d in no_div[1:]])
    wrong_z = (wrong.mean(1).abs() / (wrong.std(1) / math.sqrt(n))).tolist()
    C_hat = 0.5 * (score.reshape(n, -1) ** 2).sum(1).mean()
    return monte_carlo(pairs.mean(1), torch.zeros(3, dtype=F64), se, n=n, data=what, divergence=method,
                       C_hat=float(C_hat), mean_difference_minus_C=[float(d.mean() - C_hat) for d in per_theta],
                       z_if_divergence_dropped=wrong_z)


# ---- Vincent: DSM = ESM + C ------------------------------------------------------------------------------
_DSM_CASES = ((VP(), 0.3), (RectifiedFlow(), 0.6), (TrigFlow(0.5), 1.0))


@register("training.dsm_esm", "DSM = ESM + C (Vincent) at fixed t: exact for a linear score model on Gaussian data",
          "handbook Sec. 2.2.2 (L_SM with grad log q(x_t|x0), Eq. 17-18)", dims=(2,))
def dsm_esm(dim):
    """1/2 L_DSM(theta) - J_ESM(theta) = 1/2 (D / sigma^2 - tr Sigma_t^-1) for every theta.

    x0 ~ N(mu, Sigma), x_t = alpha x0 + sigma eps at a fixed t of VP, rectified flow and TrigFlow;
    L_DSM is ``denoising_loss(target="score")`` (target -eps/sigma = grad log q(x_t|x0)) and J_ESM uses
    the exact diffused score (p_t = N(alpha mu, Sigma_t), Sigma_t = alpha^2 Sigma + sigma^2 I). Both are
    quadratic in the 4-dimensional Gaussian (x0, eps): its 8 sigma points give exact expectations.
    """
    mu, cov, make = _gaussian2d()
    joint_cov = torch.block_diag(cov, torch.eye(dim, dtype=F64))
    pts = sigma_points(torch.cat([mu, torch.zeros(dim, dtype=F64)]), joint_cov)
    x0, eps = pts[:, :dim].contiguous(), pts[:, dim:].contiguous()
    lhs, rhs = [], []
    for process, t in _DSM_CASES:
        p_t = make(process)
        a, s = process.alpha(t).item(), process.sigma(t).item()
        x_t, _ = process.q_sample(x0, t, eps=eps)
        C = 0.5 * (dim / s ** 2 - torch.trace(torch.linalg.inv(a * a * cov + s * s * torch.eye(dim, dtype=F64))))
        for A, b in _linear_params(4, dim, seed=5):
            psi = FunctionPredictor(lambda y, tt, c, A=A, b=b: y @ A.T + b, process, "score")
            dsm = mutate(0.5, 1.0) * denoising_loss(psi, x0, t=t, eps=eps, target="score")   # cf: 1/2 dropped
            esm = explicit_score_matching_loss(lambda y: psi(y, t), x_t, p_t.score(x_t, t))
            lhs.append(dsm - esm)
            rhs.append(C)
    return identity(torch.stack(lhs), torch.stack(rhs), rtol=1e-12, atol=1e-13,
                    cases=[f"{p} t={t}" for p, t in _DSM_CASES], C=[float(c) for c in rhs[::4]])


@register("training.dsm_esm_mc", "DSM - ESM is the same for every score model (mixture data, nonlinear psi)",
          "handbook Sec. 2.2.2 (L_SM, Eq. 17-18)", dims=DIMS)
def dsm_esm_mc(dim):
    """Per sample, 1/2 dsm_i - esm_i differs between score models by (psi_k - psi_0)^T (s_t - s_cond),
    whose mean is zero because E[grad log q(x_t|x0) | x_t] = grad log p_t(x_t) (handbook Eq. 15).

    2D: the 3-component mixture under VP at t = 0.3; 3072D: the empirical images under VE at t = 20.
    Paired differences on the same (x0, eps), tolerance 5 standard errors. Reported: the z-score a
    target with the wrong sign of the conditional score (+eps/sigma) would give.
    """
    process, t, n = (VP(), 0.3, 20000) if dim == 2 else (VE(80.0), 20.0, 64)
    dist, what = _exact_data(dim, process)
    x0 = dist.sample(n, generator=_gen(6))
    eps = torch.randn(x0.shape, generator=_gen(7), dtype=F64)
    x_t, _ = process.q_sample(x0, t, eps=eps)
    s_t = dist.score(x_t, t)
    sig = process.sigma(t).item()
    per_theta, wrong = [], []
    for params in _tanh_params(4, x0[0].numel(), 16 if dim == 2 else 8, seed=8):
        f = _tanh_psi(params)
        psi = FunctionPredictor(lambda y, tt, c, f=f: f(y), process, "score")
        dsm = 0.5 * denoising_loss(psi, x0, t=t, eps=eps, target="score", reduction="none")
        esm = explicit_score_matching_loss(f, x_t, s_t, reduction="none")
        per_theta.append(dsm - esm)
        wrong.append(0.5 * ((f(x_t) - eps / sig) ** 2).reshape(n, -1).sum(1) - esm)
    per_theta = mutate(per_theta, wrong)                # counterfactual: target +eps/sigma
    pairs = torch.stack([d - per_theta[0] for d in per_theta[1:]])
    wp = torch.stack([d - wrong[0] for d in wrong[1:]])
    wrong_z = (wp.mean(1).abs() / (wp.std(1) / math.sqrt(n))).tolist()
    return monte_carlo(pairs.mean(1), torch.zeros(3, dtype=F64), pairs.std(1) / math.sqrt(n), n=n, data=what,
                       process=str(process), t=t, z_if_conditional_score_sign_flipped=wrong_z)


# ---- denoising losses: minimum = posterior variance ---------------------------------------------------------
def _denoising_cases():
    """(process, target, weighting, t_sampler, gain(t) = d x0 / d target, weight(t)) with closed forms."""
    def snr(p, t):
        return (p.alpha(t) / p.sigma(t)) ** 2

    def r(p, t):
        return torch.sqrt(p.alpha(t) ** 2 + p.sigma(t) ** 2)
    return [
        (DDPM(1000), "eps", "none", None,
         lambda p, t: -p.sigma(t) / p.alpha(t), lambda p, t: torch.ones_like(t)),
        (VP(), "v", "min_snr", None,
         lambda p, t: p.sigma(t) / r(p, t), lambda p, t: torch.clamp(snr(p, t), max=5.0) / (snr(p, t) + 1)),
        (RectifiedFlow(), "velocity", "none", "logit_normal",
         lambda p, t: -p.sigma(t) / (p.alpha(t) * p.d_sigma(t) - p.sigma(t) * p.d_alpha(t)),
         lambda p, t: torch.ones_like(t)),
        (TrigFlow(0.5), "velocity", "none", None,
         lambda p, t: -p.sigma(t) / (p.alpha(t) * p.d_sigma(t) - p.sigma(t) * p.d_alpha(t)),
         lambda p, t: torch.ones_like(t)),
        (VE(80.0), "x0", "edm", "edm_lognormal",
         lambda p, t: torch.ones_like(t), lambda p, t: (t ** 2 + 0.25) / (0.5 * t) ** 2),
        (DDPM(1000), "score", "min_snr", None,
         lambda p, t: p.sigma(t) ** 2 / p.alpha(t),
         lambda p, t: torch.clamp(snr(p, t), max=5.0) * (p.sigma(t) ** 2 / p.alpha(t)) ** 2),
    ]


@register("training.denoising_minimum", "Each denoising loss at the exact predictor equals its posterior variance",
          "handbook Sec. 3.1.1 (L_DM, L_DM-v), 3.1.3, 3.1.4, Sec. 2.2.2 (L_SM)", dims=DIMS)
def denoising_minimum(dim):
    """Data N(mu, diag(lam)) (the library's exact one-component mixture is the predictor).

    For target = c1 x_t + x0 / g(t) the minimum of E[w ||pred - target||^2 | t] is
    ``w(t) sum_d Var(x0_d | x_t) / g(t)^2`` with ``Var(x0_d | x_t) = lam_d sigma^2 / (alpha^2 lam_d + sigma^2)``,
    attained by the posterior mean (Tweedie). Gains g and weights w are written here in closed form per
    target (eps, v with Min-SNR-5, rectified-flow and TrigFlow velocity, x0 with the EDM weight, score
    with Min-SNR-5), independently of ``loss_weight``. Times come from the library's samplers; the
    residual L_i - m(t_i) has mean zero given t: tolerance 5 standard errors of it.
    """
    from toy_data.mixtures import GaussianMixture
    g = _gen(11)
    mu = torch.randn(dim, generator=g, dtype=F64) * 0.5
    lam = 0.05 + 0.45 * torch.rand(dim, generator=g, dtype=F64)
    n = 4000 if dim == 2 else 64
    est, ref, se, names = [], [], [], []
    for k, (process, target, weighting, sampler, gain, weight) in enumerate(_denoising_cases()):
        exact = GaussianMixture(mu[None], lam[None], process=process)
        x0 = exact.sample(n, generator=_gen(20 + k))
        gen = _gen(40 + k)
        t = sample_t(process, n, sampler, generator=gen)
        per = denoising_loss(exact, x0, t=t, target=target, weighting=weighting, generator=gen, reduction="none")
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        post_var = (lam * s * s / (a * a * lam + s * s)).sum(1)
        m = weight(process, t) * post_var / gain(process, t) ** mutate(2, 1)     # cf: gain not squared
        res = per - m
        est.append(per.mean())
        ref.append(m.mean())
        se.append(res.std() / math.sqrt(n))
        names.append(f"{process}:{target}:{weighting}")
    return monte_carlo(torch.stack(est), torch.stack(ref), torch.stack(se), n=n, cases=names,
                       data=f"Gaussian N(mu, diag lam) in {dim} dimensions, seeded (closed-form posterior variance)")


# ---- Theorem 2.2: L_CD = L_CT + o(dt) -------------------------------------------------------------------------
def _heun_step(teacher):
    """One Heun (2nd-order) step of the teacher's PF-ODE, dx/dt = teacher velocity (an 'exact-ish' Denoise)."""
    def step(x, t_from, t_to):
        h = (t_to - t_from)[:, None]
        k1 = teacher.predict("velocity", x, t_from)
        k2 = teacher.predict("velocity", x + h * k1, t_to)
        return x + 0.5 * h * (k1 + k2)
    return step


@register("training.cd_ct_gap", "Theorem 2.2: L_CD - L_CT = o(dt) (exact teacher, fixed consistency model)",
          "handbook Thm 2.2 (Sec. 2.3.1), Eq. 20, 25", dims=(2,))
def cd_ct_gap(dim):
    """A fixed non-optimal consistency model (a seeded MLP, ``cm_f`` parameterisation under VE) and a
    target network theta- != theta (perturbed copy); data: the 3-component 2D mixture, whose exact
    score is the teacher. CD's Denoise is one Heun step of the exact PF-ODE; CT uses the same (x0, eps),
    so the per-sample difference d_i(dt) = cd_i - ct_i uses common random numbers.

    Theorem 2.2 says the first-order coefficient c1 = lim (L_CD - L_CT)/dt vanishes (the O(dt) term
    2 dt E[(f - f-)^T J (v - u)] averages out because E[u | x_t] = v). It is estimated with Richardson,
    c1 = (4 d(dt/2) - d(dt)) / dt (remainder O(dt^2)), per sample, at dt = 0.04 and 0.02 from t_n = 0.5:
    monte_carlo against 0 with 5 standard errors. Reported: the gaps, their standard errors and the log-log slope
    (about 2: the o(dt) is O(dt^2)), the CT loss itself (which does not vanish since theta- != theta),
    and the per-path first-order size std(d_i)/dt that only cancels on average.
    """
    with cpu_threads(1):
        process = VE(80.0)
        teacher, what = _exact_data(2, process)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_seed(0))
            model = MLPPredictor(process, "x0", dim=2, hidden=32, depth=2).double()
            target = MLPPredictor(process, "x0", dim=2, hidden=32, depth=2).double()
            target.load_state_dict(model.state_dict())
            with torch.no_grad():
                for q in target.parameters():
                    q.add_(0.05 * torch.randn_like(q))
        n = 30000
        x0 = teacher.sample(n, generator=_gen(12))
        eps = torch.randn(n, dim, generator=_gen(13), dtype=F64)
        t0, dts = 0.5, [0.04, 0.02, 0.01]
        wrong = FunctionPredictor(lambda x, t, c=None: 0.5 * teacher.predict("velocity", x, t), process, "velocity")
        gaps, ct_means, heun = {}, [], _heun_step(mutate(teacher, wrong))   # cf: the teacher's velocity halved
        with torch.no_grad():
            for dt in dts:
                grid = torch.tensor([t0, t0 + dt], dtype=F64)
                ct = consistency_training_loss(model, target, x0, grid, n=0, eps=eps, reduction="none")
                cd = consistency_distillation_loss(model, target, teacher, x0, grid, n=0, eps=eps, denoise=heun,
                                                   reduction="none")
                gaps[dt] = cd - ct
                ct_means.append(float(ct.mean()))
        c1 = torch.stack([(4 * gaps[dt / 2] - gaps[dt]) / dt for dt in dts[:2]])
        means = [float(gaps[dt].mean()) for dt in dts]
        ses = [float(gaps[dt].std() / math.sqrt(n)) for dt in dts]
        slope, slope_se = fit_log_slope(dts, means, ses)
        return monte_carlo(c1.mean(1), torch.zeros(2, dtype=F64), c1.std(1) / math.sqrt(n), n=n, data=what,
                           dt=dts, gap_mean=means, gap_stderr=ses, loglog_slope=slope, loglog_slope_stderr=slope_se,
                           L_CT=ct_means, per_path_first_order=[float(gaps[dt].std() / dt) for dt in dts])


# ---- Sec. 3.2.6: CT with a constant step keeps an O(step) error ---------------------------------------------------
_THETA_PROBES = (0.0, 1.0, 2.0)


def _ct_chain(process, grid, mu, s0, denoise=None):
    """Fixed point of CT (``denoise=None``) or CD (``denoise(x, t_from, t_to)``, teacher ``denoise.teacher``)
    along ``grid`` for the affine consistency family f(x, t_n) = alpha_1 mu + theta_n (x - alpha_n mu),
    theta_1 = 1 (boundary), with theta- = theta (the target is the previous step's solution).

    Each step minimises the library loss over theta_{n+1} with theta_n fixed. The loss is quadratic in
    theta_{n+1} and exact on the sigma points of (x0, eps), so its values at theta = 0, 1, 2 (one batched
    call: the sigma points repeated three times) give the minimiser, the vertex of that parabola.
    """
    D = mu.numel()
    pts = sigma_points(torch.cat([mu, torch.zeros(D, dtype=F64)]),
                       torch.block_diag(s0 ** 2 * torch.eye(D, dtype=F64), torch.eye(D, dtype=F64)))
    P = pts.shape[0]
    x0 = pts[:, :D].repeat(len(_THETA_PROBES), 1)
    eps = pts[:, D:].repeat(len(_THETA_PROBES), 1)
    probes = torch.tensor(_THETA_PROBES, dtype=F64).repeat_interleave(P)[:, None]
    a1 = process.alpha(grid[0]).item()

    def affine(theta):
        def f(x, t, c):
            return a1 * mu + theta * (x - process.alpha(t, x)[:, None] * mu)
        return FunctionPredictor(f, process, "x0")
    online = affine(probes)
    theta = 1.0
    for n in range(grid.numel() - 1):
        target = affine(theta)
        if denoise is None:
            per = consistency_training_loss(online, target, x0, grid, n=n, eps=eps, parameterization="x0",
                                            reduction="none")
        else:
            per = consistency_distillation_loss(online, target, denoise.teacher, x0, grid, n=n, eps=eps,
                                                parameterization="x0", denoise=denoise, reduction="none")
        l0, l1, l2 = per.reshape(len(_THETA_PROBES), P).mean(1).tolist()
        theta = (3 * l0 - 4 * l1 + l2) / (2 * (l0 - 2 * l1 + l2))   # vertex of the parabola through 0, 1, 2
    return theta


class _ExactGaussianODE:
    """Exact PF-ODE step for data N(mu, s0^2 I): x_to - alpha_to mu = sqrt(V_to / V_from) (x_from - alpha_from mu)."""

    def __init__(self, process, mu, s0, teacher):
        self.process, self.mu, self.s0, self.teacher = process, mu, s0, teacher

    def var(self, t):
        return self.process.alpha(t) ** 2 * self.s0 ** 2 + self.process.sigma(t) ** 2

    def __call__(self, x, t_from, t_to):
        k = torch.sqrt(self.var(t_to) / self.var(t_from))[:, None]
        a_f, a_t = self.process.alpha(t_from)[:, None], self.process.alpha(t_to)[:, None]
        return a_t * self.mu + k * (x - a_f * self.mu)


class _DDIMStep:
    """The library's DDIM Denoise (Eq. 21) of the exact teacher."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, x, t_from, t_to):
        return ddim_denoise(self.teacher, x, t_from, t_to)


@register("training.ct_constant_step", "CT with a constant step keeps an O(step) error; CD with an exact ODE does not",
          "handbook Sec. 3.2.6 (CT for distillation), Thm 2.2", dims=(2,))
def ct_constant_step(dim):
    """Data N(mu, s0^2 I) under VE (s0 = 0.5), uniform grid epsilon = 0.002 .. T = 2 with constant step dt.

    The exact consistency function is affine, f*(x, t) = mu + k(t) (x - mu), k = sqrt((s0^2 + eps^2) /
    (s0^2 + t^2)). In the affine family (which contains f*), the fixed point of the library's CT loss
    satisfies theta_{n+1} = theta_n Cov(x_n, x_{n+1}) / Var(x_{n+1}), so theta_N / k(T) is the product of
    the correlations of consecutive noisy samples, prod_n sqrt(1 - s0^2 dt^2 / (A_n A_{n+1})) with
    A = s0^2 + t^2: a relative error 1 - O(dt) whose ratio to dt tends to 1/2 int s0^2 / A^2 dt. CD with
    the exact ODE step recovers k(T) exactly, whatever dt. CD with the DDIM step (Eq. 21) of the exact
    teacher lands on the same point as CT: for an affine target, E[f-(x_n) | x_{n+1}] = f-(E[x_n | x_{n+1}])
    and the DDIM step of an exact teacher *is* E[x_n | x_{n+1}] for Gaussian data, so CT's O(dt) error
    here is exactly DDIM's discretisation error.

    Identity (exact sigma-point expectations through the library losses): for N = 11, 21, 41, 81 the CT
    chain equals the closed-form product, CD-exact equals k(T), and (N <= 41) CD-DDIM equals the same
    product. Reported: relative errors, their log-log slope (about 1) and error/dt against its limit.
    """
    from toy_data.mixtures import GaussianMixture
    process, s0, eps_t, T = VE(80.0), 0.5, 0.002, 2.0
    mu = torch.tensor([0.4, -0.3], dtype=F64)
    teacher = GaussianMixture(mu[None], s0 ** 2, process=process)
    exact, ddim = _ExactGaussianODE(process, mu, s0, teacher), _DDIMStep(teacher)
    k_T = math.sqrt((s0 ** 2 + eps_t ** 2) / (s0 ** 2 + T ** 2))
    lhs, rhs, errs, cd_errs, dts = [], [], [], [], []
    for N in (11, 21, 41, 81):
        grid = torch.linspace(eps_t, T, N, dtype=F64)
        dt = float(grid[1] - grid[0])
        A = s0 ** 2 + grid ** 2
        closed = float(k_T * torch.prod(torch.sqrt(1 - s0 ** 2 * dt ** 2 / (A[:-1] * A[1:]))))
        theta_ct = _ct_chain(process, grid, mu, s0)
        theta_cd = _ct_chain(process, grid, mu, s0, denoise=mutate(exact, ddim))   # cf: DDIM step as 'exact'
        lhs += [theta_ct, theta_cd]
        rhs += [closed, k_T]
        if N <= 41:
            lhs.append(_ct_chain(process, grid, mu, s0, denoise=ddim))
            rhs.append(closed)
        errs.append(1 - theta_ct / k_T)
        cd_errs.append(1 - theta_cd / k_T)
        dts.append(dt)
    F = lambda t: t / (2 * (s0 ** 2 + t ** 2)) + math.atan(t / s0) / (2 * s0)  # noqa: E731 - int s0^2/A^2 dt
    limit = 0.5 * (F(T) - F(eps_t))
    slope = math.log(errs[0] / errs[-1]) / math.log(dts[0] / dts[-1])
    return identity(torch.tensor(lhs, dtype=F64), torch.tensor(rhs, dtype=F64), rtol=1e-10, atol=1e-12,
                    dt=dts, ct_relative_error=errs, ct_error_over_dt=[e / d for e, d in zip(errs, dts)],
                    ct_error_over_dt_limit=limit, ct_loglog_slope=slope, cd_exact_ode_relative_error=cd_errs,
                    cd_ddim_equals_ct="checked for N = 11, 21, 41")


# ---- TrigFlow: continuous-time CT gradient ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _trigflow_ct_grads():
    """Raw parameter gradients of the discrete CT loss at dt = 1e-3 / 2^k (k = 0..4) and the surrogate's jvp
    gradient, for the seeded TrigFlow MLP of ``trigflow_ct_gradient`` (computed once, shared with the erratum)."""
    from toy_data.mixtures import eight_gaussians_mixture
    with cpu_threads(1):
        process = TrigFlow(0.5)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_seed(1))
            model = MLPPredictor(process, "trigflow_F", dim=2, hidden=32, depth=2).double()
        n = 128
        g = _gen(14)
        x0 = 0.25 * eight_gaussians_mixture().sample(n, generator=g)
        eps = torch.randn(n, 2, generator=g, dtype=F64)
        t = 0.2 + 1.2 * torch.rand(n, generator=g, dtype=F64)
        params = list(model.parameters())

        def flat(grads):
            return torch.cat([q.reshape(-1) for q in grads])
        g_jvp = flat(torch.autograd.grad(trigflow_ct_gradient_surrogate(model, x0, t=t, eps=eps), params))
        dts = [1e-3 / 2 ** k for k in range(5)]
        raw = []
        for dt in dts:
            loss = consistency_training_loss(model, None, x0, t_pair=(t - dt, t), eps=eps, parameterization="x0")
            raw.append(flat(torch.autograd.grad(loss, params)))
        return dts, tuple(raw), g_jvp


@register("training.trigflow_ct_gradient",
          "Discrete CT gradient / (2 dt) converges to the continuous-time TrigFlow gradient",
          "handbook Sec. 2.5.1 (grad L_TF-CT), Eq. 25, 38", dims=(2,))
def trigflow_ct_gradient(dim):
    """A seeded TrigFlow MLP (``trigflow_F``, sigma_d = 0.5, f = Eq. 38), theta- = theta, 128 samples of
    the scaled 8-Gaussians with fixed (x0, z, t). g(dt) = grad L_CT(t - dt, t) / (2 dt) with d = ||.||^2
    (finite difference along the noising path) against the surrogate's gradient (exact jvp tangent):
    first-order convergence, so the Richardson value R(h) = 2 g(h) - g(2h) agrees with the jvp gradient to
    O(h^2), and its second level R2(h) = (4 R(h) - R(2h)) / 3 to O(h^3): R2 at the smallest h is compared.
    Tolerance: the a-posteriori estimate |R2(h) - R2(2h)| of that remainder (reported), plus float64
    rounding 1e-9 * max|grad|. Reported: relative errors of g(dt) and observed orders (about 1).
    """
    dts, raw, g_jvp = _trigflow_ct_grads()
    gs = [r / (mutate(2, 1) * dt) for r, dt in zip(raw, dts)]       # counterfactual: without the 2 of d = ||.||^2
    rel = [float((gd - g_jvp).norm() / g_jvp.norm()) for gd in gs]
    orders = [math.log2(rel[i] / rel[i + 1]) for i in range(len(rel) - 1)]
    R, R2, tol_rich = richardson2(gs)
    return identity(R2[-1], g_jvp, rtol=1e-9, atol=tol_rich, dt=dts, relative_error=rel, observed_order=orders,
                    richardson_relative_error=[float((r - g_jvp).norm() / g_jvp.norm()) for r in R],
                    factor="grad L_CT / (2 dt): the 2 comes from d = ||.||^2")


@register("training.ct_gradient_normalisation",
          "The discrete CT gradient converges to the continuous-time TrigFlow gradient only after dividing by 2 dt",
          "handbook Sec. 2.5.1 (continuous-time CT gradient)",
          printed="'as dt -> 0, its [the discrete CT objective's, Eq. 25] gradient is proven to converge to "
                  "grad E[lambda(t) f_theta^T df_theta-(x_t, t)/dt]'",
          corrected="grad L_CT(dt) = 2 dt grad E[lambda f_theta^T df_theta-/dt] + O(dt^2) with d = ||.||^2: the raw "
                    "gradient tends to 0; (1 / (2 dt)) grad L_CT converges to the printed limit (sCM, Lu & Song 2024)")
def ct_gradient_normalisation():
    """The same gradients as ``training.trigflow_ct_gradient``: the Richardson limit (two levels) of the raw
    discrete gradients against the jvp gradient fails (it extrapolates to 0), that of the gradients divided by
    2 dt passes; tolerance the a-posteriori Richardson error plus 1e-9 max|grad|."""
    dts, raw, g_jvp = _trigflow_ct_grads()
    _, R2_raw, tol_raw = richardson2(list(raw))
    _, R2, tol = richardson2([r / (2 * dt) for r, dt in zip(raw, dts)])
    return erratum(identity(R2_raw[-1], g_jvp, rtol=1e-9, atol=tol_raw), identity(R2[-1], g_jvp, rtol=1e-9, atol=tol),
                   data="seeded TrigFlow MLP, 128 samples of the scaled 8-Gaussians")
