"""Checks of reward fine-tuning and preference alignment (ids ``align.*``): handbook Sec. 3.3, the Luo talk's
Diff-Instruct++ (Thm 3.1, 3.3), the DI* paper (Thm 3.1, 3.2, Sec. 3.3) and the Wang talk's DPO / KL optimum.

Exact where the mathematics allows: generators are ``AffineGaussianGenerator`` (``x0 = mu + A z``, exact
diffused score and density), references are Gaussian mixtures with exact class-conditional and
unconditional scores and log-densities (``toy_data.mixtures``), all in float64. Expectations of
polynomials under Gaussians are computed with Gauss-Hermite quadrature that is exact for their degree;
statements about non-polynomial expectations are Monte-Carlo checks within ``n_sigma`` standard errors
(estimated from independent batches, reported), against references whose own error is negligible
(reported in the details).

Reference gradients always take an independent route from the library loss they check: closed-form KL
divergences and moments, autograd of exact log-densities (``logsumexp`` of the mixture) instead of the
closed-form scores the losses use, hand-written affine sampler chains instead of ``ddim_step``.
"""
from __future__ import annotations

import functools
import math

import torch

from dstar_edu.predictors import FunctionPredictor
from dstar_edu.process import DDPM
from dstar_edu.verify.measure import gauss_hermite_grid, gaussian_kl_full, trapezoid_rule_2d
from dstar_edu.verify.registry import DIMS, POINTWISE, check_generator, erratum, identity, monte_carlo, mutate, register

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
Tensor = torch.Tensor


def _one_thread(fn):
    """Run a check single-threaded: its tensors are tiny, and intra-op threads on a busy 2-core machine made
    them 10-20x slower (``training.cpu_threads``)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        from dstar_edu.training import cpu_threads
        with cpu_threads(1):
            return fn(*args, **kwargs)
    return wrapped


_gen = check_generator                 # every random draw of a check (see registry.py on seeds)


def _flat_grads(grads) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# ---- small linear-Gaussian sampler chains (DDPO, DRaFT) ---------------------------------------------------
class _LinearEps:
    """``eps_theta(x_t, t_n) = a_n x_t + b_n`` on a fixed time grid: every DDIM transition is affine-Gaussian."""

    def __init__(self, process, ts: Tensor, dim: int, seed: int):
        g = _gen(seed)
        ab = process.alpha_bar(ts[:-1])
        # near the ideal eps-predictor of N(0.5, 0.3^2 I) data, perturbed
        a0 = (1 - ab).sqrt() / (ab * 0.09 + 1 - ab)
        self.a = (a0 * (1 + 0.2 * torch.rand(len(a0), generator=g, dtype=F64))).requires_grad_(True)
        self.b = (0.3 * torch.randn(len(a0), dim, generator=g, dtype=F64)).requires_grad_(True)
        self.ts, self.process = ts, process
        self.predictor = FunctionPredictor(self._eps, process, "eps")

    def _index(self, t) -> int:
        hit = torch.nonzero(self.ts[:-1] == torch.as_tensor(t, dtype=F64)).flatten()
        if hit.numel() != 1:
            raise ValueError(f"t={float(t)} is not a time of this chain")
        return int(hit[0])

    def _eps(self, x, t, cond=None):
        k = self._index(t)
        return self.a[k] * x + self.b[k].reshape(x.shape[1:])

    def step_coefs(self, k: int, eta: float):
        """``x_{n+1} = kk x_n + d + std z`` written from handbook Eq. 7, 49, 50 (independently of ddim_step)."""
        ab_t, ab_p = self.process.alpha_bar(self.ts[k]), self.process.alpha_bar(self.ts[k + 1])
        var = eta ** 2 * (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        c_p = (1 - ab_p - var).clamp(min=0).sqrt()
        at, st, ap = ab_t.sqrt(), (1 - ab_t).sqrt(), ab_p.sqrt()
        kk = ap * (1 - st * self.a[k]) / at + c_p * self.a[k]
        d = (c_p - ap * st / at) * self.b[k]
        return kk, d, var.sqrt()


def _chain_setup(dim: int, seed: int):
    p = DDPM(1000)
    ts = torch.tensor([800.0, 400.0, 150.0, 30.0], dtype=F64)
    return p, ts, _LinearEps(p, ts, dim, seed)


@register("align.ddpo_reinforce_unbiased",
          "DDPO_SF's REINFORCE estimator (Eq. 48, Alg. 10) is unbiased for the policy gradient",
          "handbook Eq. 48-51, Alg. 10")
@_one_thread
def ddpo_reinforce_unbiased():
    """A 3-step DDPM chain (eta = 1) whose eps-predictor is linear in x_t: the sample x_0 is Gaussian with
    mean and variance from the affine recursion, so ``E[R]`` of the quadratic reward
    ``R = -||x - c||^2 / 2`` and its exact gradient (autograd) are closed form. The library's
    ``sample_with_log_probs`` + ``ddpo_sf_loss`` gradient (``-grad`` = REINFORCE estimate, advantages
    ``R - b`` with the constant baseline ``b = E[R]``) is averaged over 40 independent batches of 500
    chains; tolerance 5 standard errors of that mean, per coordinate.
    """
    from dstar_edu.objectives.reward_finetune import ddpo_sf_loss, sample_with_log_probs
    from dstar_edu.rewards import QuadraticReward
    p, ts, chain = _chain_setup(2, seed=1)
    reward = QuadraticReward([1.0, -0.5], scale=1.0)
    m, v = torch.zeros(2, dtype=F64), torch.ones((), dtype=F64)
    for k in range(len(ts) - 1):
        kk, d, std = chain.step_coefs(k, 1.0)
        m, v = kk * m + d, kk * kk * v + std * std
    exact_ER = -(((m - reward.center) ** 2).sum() + 2 * v) / 2
    exact = _flat_grads(torch.autograd.grad(exact_ER, (chain.a, chain.b)))
    g = _gen(2)
    baseline = float(exact_ER.detach())  # a constant baseline keeps REINFORCE unbiased and lowers its variance
    ests = []
    for _ in range(40):
        x_init = torch.randn(500, 2, generator=g, dtype=F64)
        traj, _ = sample_with_log_probs(chain.predictor, ts, x_init, eta=1.0, generator=g)
        loss = ddpo_sf_loss(chain.predictor, traj, ts, reward(traj[-1]) - baseline, eta=1.0)
        ests.append(mutate(-1, 1) * _flat_grads(torch.autograd.grad(loss, (chain.a, chain.b))))   # cf: sign
    ests = torch.stack(ests)
    se = ests.std(0) / math.sqrt(ests.shape[0])
    return monte_carlo(ests.mean(0), exact, se, n_sigma=5.0, n_chains=ests.shape[0] * 500,
                       se_over_max_gradient=float(se.max() / exact.abs().max()))


@register("align.ddpo_logprob_gradient",
          "Gradient of the Gaussian transition log-probability (Eq. 51) is (x_{t-1} - mu)/sigma^2 grad mu",
          "handbook Eq. 51", dims=DIMS,
          printed="grad_theta log p_theta(x_{t-1}|x_t) = (mu_theta - x_{t-1}) / sigma_t^2 grad_theta mu_theta",
          corrected="grad_theta log p_theta(x_{t-1}|x_t) = (x_{t-1} - mu_theta) / sigma_t^2 grad_theta mu_theta "
                    "(the derivative of -(x - mu)^2 / (2 sigma^2) in mu); with the printed sign DDPO would "
                    "descend the reward")
@_one_thread
def ddpo_logprob_gradient(dim):
    """Autograd of the library's Eq. 51 log-density through the DDPM transition mean ``mu_theta`` of a
    linear eps-predictor, against the printed and the corrected vector-Jacobian products."""
    from dstar_edu.objectives.reward_finetune import gaussian_log_prob, transition_stats
    p, ts, chain = _chain_setup(dim, seed=3)
    g = _gen(4)
    x = torch.randn(6, dim, generator=g, dtype=F64)
    mean, std = transition_stats(chain.predictor, x, ts[1], ts[2], eta=1.0)
    x_prev = (mean + std * torch.randn(x.shape, generator=g, dtype=F64)).detach()
    params = (chain.a, chain.b)
    lhs = _flat_grads(torch.autograd.grad(gaussian_log_prob(x_prev, mean, std).sum(), params, retain_graph=True))
    printed = _flat_grads(torch.autograd.grad(mean, params, grad_outputs=(mean - x_prev).detach() / std ** 2,
                                              retain_graph=True))
    corrected = _flat_grads(torch.autograd.grad(mean, params, grad_outputs=(x_prev - mean).detach() / std ** 2))
    return erratum(identity(printed, lhs, rtol=1e-10), identity(corrected, lhs, rtol=1e-10), data=POINTWISE)


@register("align.ddpo_posterior_restated",
          "Sec. 3.3's restatement of Eq. 8 weights x_t by sqrt(alpha_t), as Eq. 8 does",
          "handbook Sec. 3.3.2 (Eq. 8 restated), Eq. 49-50", dims=DIMS,
          printed="q(x_{t-1}|x_t, x0) mean = (sqrt(ab_t)(1 - ab_{t-1}) x_t + sqrt(ab_{t-1})(1 - alpha_t) x0) / (1 - ab_t)",
          corrected="mean = (sqrt(alpha_t)(1 - ab_{t-1}) x_t + sqrt(ab_{t-1})(1 - alpha_t) x0) / (1 - ab_t) (Eq. 8, "
                    "per-step alpha_t); it equals DDPO's transition mean Eq. 49 with sigma_t of Eq. 50")
@_one_thread
def ddpo_posterior_restated(dim):
    """On the full DDPM grid (t -> t - 1) the library's DDPO transition (Eq. 49-50, ``transition_stats`` at
    eta = 1) is compared with Sec. 3.3's restated Eq. 8 mean (x0 = Tweedie's x0_hat, Eq. 7) and the Eq. 8
    variance, as printed and corrected."""
    from dstar_edu.objectives.reward_finetune import transition_stats
    p = DDPM(1000)
    g = _gen(5)
    shift = torch.randn(dim, generator=g, dtype=F64)
    pred = FunctionPredictor(lambda x, t, c: torch.tanh(x) + shift, p, "eps")
    lhs, pr, co = [], [], []
    for t in (2, 50, 400, 900):
        x = torch.randn(5, dim, generator=g, dtype=F64)
        mean, std = transition_stats(pred, x, float(t), float(t - 1), eta=1.0)
        ab_t, ab_p = p.alpha_bars[t], p.alpha_bars[t - 1]
        a_t = p.alphas[t - 1]
        x0 = (x - (1 - ab_t).sqrt() * pred(x, t)) / ab_t.sqrt()
        var = (1 - a_t) * (1 - ab_p) / (1 - ab_t)
        lhs += [mean.flatten(), (std ** 2).reshape(1)]
        pr += [((ab_t.sqrt() * (1 - ab_p) * x + ab_p.sqrt() * (1 - a_t) * x0) / (1 - ab_t)).flatten(), var.reshape(1)]
        co += [((a_t.sqrt() * (1 - ab_p) * x + ab_p.sqrt() * (1 - a_t) * x0) / (1 - ab_t)).flatten(), var.reshape(1)]
    lhs, pr, co = torch.cat(lhs), torch.cat(pr), torch.cat(co)
    return erratum(identity(pr, lhs, rtol=1e-10), identity(co, lhs, rtol=1e-10), data=POINTWISE)


@register("align.draft_k", "DRaFT-K equals full back-propagation when K covers the chain; K=1 is the last step",
          "handbook Sec. 3.3.1 (DRaFT, DRaFT-K)", dims=DIMS)
@_one_thread
def draft_k(dim):
    """Stochastic DDIM chain (eta = 0.5, 3 steps) of a linear eps-predictor: the gradient of the library's
    ``draft_loss`` with ``K = N`` (and ``K = None``) against the pathwise gradient of the same chain written
    as a composition of affine maps (same noises, drawn in step order), and ``K = 1`` against that
    composition with the state before the last step detached."""
    from dstar_edu.objectives.reward_finetune import draft_loss
    from dstar_edu.rewards import QuadraticReward
    p = DDPM(1000)
    ts = torch.tensor([700.0, 350.0, 120.0, 0.0], dtype=F64)
    chain = _LinearEps(p, ts, dim, seed=6)
    reward = QuadraticReward(torch.linspace(-1, 1, dim, dtype=F64), scale=1.0)
    params, eta, N = (chain.a, chain.b), 0.5, len(ts) - 1
    x_init = torch.randn(8, dim, generator=_gen(7), dtype=F64)

    def reference(K):
        g = _gen(8)
        x = x_init
        for k in range(N):
            if k == N - K:
                x = x.detach()
            kk, d, std = chain.step_coefs(k, eta)
            x = kk * x + d + std * torch.randn(x.shape, generator=g, dtype=F64)
        return _flat_grads(torch.autograd.grad(-reward(x).mean(), params))

    def library(K):
        loss = draft_loss(chain.predictor, ts, x_init, reward, K=K, eta=eta, generator=_gen(8))
        return _flat_grads(torch.autograd.grad(loss, params))

    lhs = torch.cat([library(N), library(None), library(1)])
    rhs = torch.cat([reference(N), reference(N), reference(mutate(1, 2))])    # counterfactual: K off by one
    gap = float((reference(1) - reference(N)).abs().max())
    return identity(lhs, rhs, rtol=1e-10, truncation_changes_gradient_by=gap,
                    data="linear eps-predictor chain from N(0, I) (an affine composition: pathwise algebra, "
                         + POINTWISE + ")")


@register("align.drwr_weight",
          "DRWR's weighted regression targets p_ref exp(beta R) / Z only with weights exp(beta R)",
          "handbook Sec. 3.3.2 (DRWR); Peters & Schaal 2007 (reward-weighted regression)",
          printed="L_DRWR = E[min(e^beta R(x), w_max) ||eps - eps_theta(x_t, t)||^2] (weight e^beta times R)",
          corrected="weight min(exp(beta R(x)), w_max) (reward-weighted regression, Peters & Schaal 2007); "
                    "unclipped, the regression's optimum is the denoiser of p_ref exp(beta R)/Z, the "
                    "KL-regularised optimum pi* with temperature 1/beta; e^beta R targets p_ref R instead")
@_one_thread
def drwr_weight():
    """Data: 5 points (an empirical distribution) with rewards in (0, 1). Model: the exact denoiser of the
    empirical distribution with learnable weights softmax(phi), set to pi* = softmax(beta R). The gradient of
    the library's ``drwr_loss`` in phi at pi* vanishes in expectation iff pi* is the regression's optimum.
    Monte Carlo over 50 batches of 400 (x0, t, eps) draws; 5 standard errors; same draws for both weights."""
    from dstar_edu.objectives.reward_finetune import drwr_loss, drwr_weights
    from toy_data.mixtures import GaussianMixture
    p = DDPM(1000)
    pts = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.3, -1.0], [-0.6, -0.8]], dtype=F64)
    R = torch.tensor([0.9, 0.2, 0.5, 0.05, 0.7], dtype=F64)
    beta = 3.0
    phi_star = torch.log_softmax(beta * R, 0)
    g = _gen(9)
    est = {"printed": [], "corrected": []}
    for _ in range(50):     # 50 batches, not 30: the printed weight then sits >= 10 s.e. away
        idx = torch.randint(0, 5, (400,), generator=g)
        t = torch.tensor([60.0, 150.0, 300.0], dtype=F64)[torch.randint(0, 3, (400,), generator=g)]
        eps = torch.randn(400, 2, generator=g, dtype=F64)
        for kind in est:
            phi = phi_star.clone().requires_grad_(True)
            model = GaussianMixture(pts, 0.0, torch.softmax(phi, 0), process=p, _allow_zero_cov=True)
            w = drwr_weights(R[idx], beta) if kind == "corrected" else math.exp(beta) * R[idx]
            loss = drwr_loss(model, pts[idx], w, t=t, eps=eps)
            est[kind].append(torch.autograd.grad(loss, phi)[0])
    res = {}
    for kind, vals in est.items():
        v = torch.stack(vals)
        res[kind] = monte_carlo(v.mean(0), torch.zeros(5, dtype=F64), v.std(0) / math.sqrt(v.shape[0]), n_sigma=5.0)
    return erratum(res["printed"], res["corrected"], n=50 * 400)


# ---- KL-regularised optimum and DPO (Wang talk) ------------------------------------------------------------
@register("align.kl_optimum", "The KL-regularised optimum is pi* = pi_ref exp(r / beta) / Z (Gibbs variational identity)",
          "Wang talk (DPO: max E[r] - beta KL, pi*)")
@_one_thread
def kl_optimum():
    """For any pi: ``E_pi[r] - beta KL(pi || pi_ref) = beta log Z - beta KL(pi || pi*)``, so pi* is the unique
    maximiser with value beta log Z. Checked on random distributions over 7 outcomes (library
    ``kl_regularized_objective``, ``kl_regularized_optimum``, ``kl_optimum_log_partition``) and on Gaussians
    with a concave quadratic reward (library ``gaussian_kl_optimum``; E[r], KL and log Z in closed form here)."""
    from dstar_edu.objectives.preference import (gaussian_kl_optimum, kl_optimum_log_partition,
                                                 kl_regularized_objective, kl_regularized_optimum)
    g = _gen(10)
    beta = 0.7
    log_ref = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), 0)
    r = torch.randn(7, generator=g, dtype=F64)
    log_star = kl_regularized_optimum(log_ref, r, mutate(beta, 1 / beta))    # counterfactual: temperature beta
    logZ = kl_optimum_log_partition(log_ref, r, beta)
    lhs, rhs = [], []
    for _ in range(5):
        log_pi = torch.log_softmax(2 * torch.randn(7, generator=g, dtype=F64), 0)
        kl_star = (log_pi.exp() * (log_pi - log_star)).sum()
        lhs.append(kl_regularized_objective(log_pi, log_ref, r, beta))
        rhs.append(beta * logZ - beta * kl_star)
    lhs.append(kl_regularized_objective(log_star, log_ref, r, beta))
    rhs.append(beta * logZ)
    # Gaussian: reference N(mu, S), reward r(x) = b^T x - x^T A x / 2
    mu, b = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([1.0, 0.3], dtype=F64)
    M = torch.tensor([[1.0, 0.4], [0.0, 0.7]], dtype=F64)
    S, A = M @ M.T + 0.1 * torch.eye(2, dtype=F64), torch.tensor([[0.8, 0.2], [0.2, 0.5]], dtype=F64)
    m_star, S_star = gaussian_kl_optimum(mu, S, b, A, beta)
    P = torch.linalg.inv(S) + A / beta
    h = torch.linalg.solve(S, mu) + b / beta
    logZ_g = 0.5 * (h @ torch.linalg.solve(P, h) - mu @ torch.linalg.solve(S, mu)) - 0.5 * torch.logdet(
        torch.eye(2, dtype=F64) + S @ A / beta)
    for _ in range(4):
        m = torch.randn(2, generator=g, dtype=F64)
        L = torch.randn(2, 2, generator=g, dtype=F64)
        C = L @ L.T + 0.2 * torch.eye(2, dtype=F64)
        Er = b @ m - 0.5 * (m @ A @ m + torch.trace(A @ C))
        lhs.append(Er - beta * gaussian_kl_full(m, C, mu, S))
        rhs.append(beta * logZ_g - beta * gaussian_kl_full(m, C, m_star, S_star))
    return identity(torch.stack(lhs), torch.stack(rhs), rtol=1e-12, atol=1e-13)


@register("align.dpo_implicit_reward",
          "DPO's implicit reward at pi* is r - beta log Z; its Bradley-Terry model is sigmoid(r1 - r2); "
          "the population DPO gradient vanishes at pi*", "Wang talk (DPO: r*, p*(y1 > y2))")
@_one_thread
def dpo_implicit_reward_check():
    """On 6 outcomes: (i) ``dpo_implicit_reward(log pi*, log pi_ref, beta) = r - beta log Z``; (ii) the
    Bradley-Terry probability of the implicit rewards equals ``sigmoid(r_i - r_j)`` (Z cancels); (iii) the
    expected ``dpo_loss`` over pairs ``(i, j) ~ pi_ref x pi_ref`` with labels ``i > j`` drawn with probability
    ``sigmoid(r_i - r_j)`` has zero gradient in the policy logits at pi* (a perturbed policy's gradient is
    reported). Tolerance: the rounding budget of (iii), 16 K^2 eps_64 beta (parts (i)-(ii) are O(1) numbers,
    their rounding is far below it)."""
    from dstar_edu.objectives.preference import (bradley_terry_prob, dpo_implicit_reward, dpo_loss,
                                                 kl_optimum_log_partition, kl_regularized_optimum)
    g = _gen(11)
    K, beta = 6, 0.5
    log_ref = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), 0)
    r = torch.randn(K, generator=g, dtype=F64)
    log_star = kl_regularized_optimum(log_ref, r, beta)
    logZ = kl_optimum_log_partition(log_ref, r, beta)
    h = dpo_implicit_reward(log_star, log_ref, mutate(beta, 1 / beta))    # counterfactual: 1/beta
    bt = bradley_terry_prob(h[:, None], h[None, :])
    truth = torch.sigmoid(r[:, None] - r[None, :])

    def pop_grad(logits):
        logits = logits.clone().requires_grad_(True)
        lp = torch.log_softmax(logits, 0)
        i, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
        i, j = i.flatten(), j.flatten()
        per = dpo_loss(lp[i], lp[j], log_ref[i], log_ref[j], beta, reduction="none")
        wts = (log_ref[i] + log_ref[j]).exp() * truth[i, j]
        return torch.autograd.grad((wts * per).sum(), logits)[0]

    g_star = pop_grad(log_star)
    g_off = pop_grad(log_star + 0.3 * torch.randn(K, generator=g, dtype=F64))
    return identity(torch.cat([h - (r - beta * logZ), (bt - truth).flatten(), g_star]),
                    torch.zeros(K + K * K + K, dtype=F64), rtol=0.0, atol=16 * K * K * EPS64 * beta,
                    perturbed_policy_grad_max=float(g_off.abs().max()))


# ---- CFG as an implicit reward (DI* Thm 3.2; Luo talk Thm 3.3) --------------------------------------------
def _class_mixture(dim: int, process):
    """A class-conditional reference with exact conditional and unconditional scores / log-densities."""
    from toy_data.mixtures import EmpiricalDistribution, GaussianMixture
    if dim == 2:
        means = torch.tensor([[-1.5, 0.0], [-1.0, 1.2], [1.2, 0.3], [1.0, -1.1]], dtype=F64)
        A = torch.tensor([[[0.3, 0.1], [0.0, 0.2]], [[0.2, 0.0], [0.1, 0.3]], [[0.25, -0.05], [0.0, 0.2]],
                          [[0.2, 0.1], [0.1, 0.25]]], dtype=F64)
        covs = A @ A.transpose(1, 2) + 0.01 * torch.eye(2, dtype=F64)
        return GaussianMixture(means, covs, torch.tensor([0.3, 0.2, 0.25, 0.25], dtype=F64),
                               labels=torch.tensor([0, 0, 1, 1]), process=process), "4-component 2D mixture, 2 classes"
    from toy_data.cifar import image_dataset_for_checks
    images, source = image_dataset_for_checks(16, generator=_gen(0), dtype=F64)
    labels = torch.arange(16) % 2
    return EmpiricalDistribution(images, process=process, labels=labels), \
        f"empirical distribution of 16 images in 2 classes ({source})"


def _affine_generator(dim: int, seed: int):
    from dstar_edu.generators import AffineGaussianGenerator
    g = _gen(seed)
    if dim == 2:
        return AffineGaussianGenerator(2, mean=torch.tensor([0.2, -0.1], dtype=F64),
                                       A=torch.tensor([[0.8, 0.2], [-0.1, 0.6]], dtype=F64))
    return AffineGaussianGenerator((3, 32, 32), mean=0.2 * torch.randn(3, 32, 32, generator=g, dtype=F64),
                                   A=0.3 + 0.1 * torch.rand(3 * 32 * 32, generator=g, dtype=F64))


def _batch(gen, process, dim: int, seed: int, B: int, t_lo: float = 100.0, t_hi: float = 900.0):
    g = _gen(seed)
    z = gen.noise(B, g)
    eps = torch.randn((B, *gen.event_shape), generator=g, dtype=F64)
    t = torch.randint(int(t_lo), int(t_hi), (B,), generator=g).to(F64)
    w = process.sigma(t) ** 2  # a w(t) that is not constant
    return z, eps, t, w


def _x_t(gen, process, z, eps, t):
    x0 = gen(z)
    a, s = process.coefficients(t, x0)
    return x0, a * x0 + s * eps


def _fp_budget(*terms) -> float:
    """Rounding budget of autograd-of-logsumexp vs closed-form scores: 64 eps_64 prod(max|term|)."""
    return 64 * EPS64 * math.prod(float(torch.as_tensor(t).detach().abs().max()) for t in terms)


@register("align.distar_cfg_sign",
          "CFG loss (DI* Eq. 3.6) has the gradient of the negative implicit reward (Eq. 3.7) only with a minus sign",
          "DI* Thm 3.2, Eq. 3.6-3.7 (and Alg. 1 Eq. 3.5, last term)", dims=DIMS,
          printed="L_cfg = int E w(t) {s_ref(sg[x_t]|t,c) - s_ref(sg[x_t]|t,0)}^T x_t dt has the gradient of "
                  "-r(x0, c) = -int E_{x_t ~ p_theta,t} w(t) log p_ref(x_t|t,c)/p_ref(x_t|t) dt",
          corrected="L_cfg = -int E w(t) {s_ref(sg[x_t]|t,c) - s_ref(sg[x_t]|t,0)}^T x_t dt (minus sign; as in Luo "
                    "talk Thm 3.3, where the implicit reward enters s~_ref with +(1/beta)(s_c - s_0)); the printed "
                    "loss ascends -r, i.e. guides away from the condition c")
@_one_thread
def distar_cfg_sign(dim):
    """Exact class-conditional reference and affine generator; on one batch of (z, eps, t) the theta-gradient of
    the library's ``cfg_implicit_reward_loss`` (which uses the closed-form scores at sg[x_t]) is compared with
    the theta-gradient of ``-mean w(t) [log p_t(x_t|c) - log p_t(x_t)]`` (autograd through the exact
    log-densities, x_t = alpha g_theta(z) + sigma eps): per-sample the pathwise derivative of Eq. 3.7, so
    equality on one batch implies equality of the expectations. Printed sign = the negated loss."""
    from dstar_edu.objectives.alignment import cfg_implicit_reward, cfg_implicit_reward_loss
    p = DDPM(1000)
    mix, what = _class_mixture(dim, p)
    gen = _affine_generator(dim, seed=12)
    z, eps, t, w = _batch(gen, p, dim, seed=13, B=32 if dim == 2 else 8, t_lo=300 if dim > 2 else 100)
    params = list(gen.parameters())
    x0 = gen(z)
    lib = _flat_grads(torch.autograd.grad(cfg_implicit_reward_loss(x0, mix, t, cond=1, eps=eps, weight=w), params))
    _, x_t = _x_t(gen, p, z, eps, t)
    r = cfg_implicit_reward(mix, x_t, t, 1)
    ref = _flat_grads(torch.autograd.grad(-(w * r).mean(), params))
    logp = mix.log_prob(x_t.detach(), t)
    atol = _fp_budget(logp, x_t, w) / x_t[0].numel() ** 0.5
    return erratum(identity(-lib, ref, rtol=1e-9, atol=atol), identity(lib, ref, rtol=1e-9, atol=atol), data=what)


@register("align.dipp_thm31", "DI++ gradient (KL-PPO, Thm 3.1 at every t) equals the exact gradient of "
          "-alpha_rew E r + int w KL(p_theta,t || p_ref,t)", "Luo talk Diff-Instruct++ Thm 3.1, Eq. 3.2-3.4")
@_one_thread
def dipp_thm31():
    """Affine generator, Gaussian reference N(mu_q, S_q), quadratic reward, four times with weights: the exact
    objective (E[r] and the Gaussian KLs in closed form) is differentiated by autograd. One of the four times is
    DDPM t = 1 (sigma^2 = 1e-4), where the integral KL is the talk's data-level KL(p_theta || p_ref). The library's
    ``diff_instruct_pp_loss`` (exact fake score = the generator's frozen diffused score) is integrated over
    (z, eps) with a 3-point-per-axis Gauss-Hermite rule, exact here (integrands of degree <= 2)."""
    from dstar_edu.generators import AffineGaussianGenerator
    from dstar_edu.objectives.alignment import diff_instruct_pp_loss
    from dstar_edu.rewards import QuadraticReward
    from toy_data.mixtures import GaussianMixture
    p = DDPM(1000)
    gen = AffineGaussianGenerator(2, mean=torch.tensor([0.3, -0.4], dtype=F64),
                                  A=torch.tensor([[0.9, 0.3], [-0.2, 0.5]], dtype=F64))
    mu_q, L_q = torch.tensor([-0.5, 0.8], dtype=F64), torch.tensor([[0.7, 0.0], [0.4, 0.6]], dtype=F64)
    S_q = L_q @ L_q.T
    ref = GaussianMixture(mu_q[None], S_q[None], process=p)
    reward, alpha_rew = QuadraticReward([1.0, 0.5], scale=0.8), 0.7
    times, wts = [1.0, 100.0, 400.0, 800.0], [1.0, 0.5, 1.0, 2.0]   # t = 1: sigma^2 = 1e-4, the data-level KL
    params = list(gen.parameters())
    # exact objective
    mu, C = gen.mu, gen.covariance()
    obj = alpha_rew * (((mu - reward.center) ** 2).sum() + torch.trace(C)) / (2 * reward.scale ** 2)
    I2 = torch.eye(2, dtype=F64)
    for t, w in zip(times, wts):
        a, s = p.alpha(t), p.sigma(t)
        obj = obj + w * gaussian_kl_full(a * mu, a * a * C + s * s * I2, a * mu_q, a * a * S_q + s * s * I2)
    exact = _flat_grads(torch.autograd.grad(obj, params))
    # library loss on the quadrature nodes
    nodes, nw = gauss_hermite_grid(3, 4)
    z, eps = nodes[:, :2], nodes[:, 2:]
    n = len(nw)
    Z = torch.cat([z] * len(times))
    E = torch.cat([eps] * len(times))
    T = torch.cat([torch.full((n,), t, dtype=F64) for t in times])
    W = torch.cat([nw * w for w in wts])
    B = len(W)
    c_r = (B * torch.cat([nw] * len(times)) / len(times))  # the reward term averages over z only

    def weighted_reward(x, cond=None):
        return c_r * reward(x)

    fake = gen.score_predictor(p, frozen=True)
    loss = diff_instruct_pp_loss(gen(Z), ref, fake, T, reward=weighted_reward,
                                 alpha_rew=mutate(alpha_rew, -alpha_rew), eps=E,     # cf: the reward's sign
                                 weight=B * W)
    lib = _flat_grads(torch.autograd.grad(loss, params))
    return identity(lib, exact, rtol=1e-10, atol=1e-13)


@register("align.dipp_thm33",
          "CFG as implicit reward under KL: -r_cfg + beta IKL has the gradient beta w (s_theta - s~^beta_ref) "
          "dx_t/dtheta (DI++ with cfg 'in' and 'out')", "Luo talk Diff-Instruct++ Thm 3.3, Eq. 3.8-3.9", dims=DIMS)
@_one_thread
def dipp_thm33(dim):
    """With beta = 0.5, ``beta * grad diff_instruct_pp_loss(alpha_rew=0, alpha_cfg=1/beta)`` in both CFG modes
    (modified reference ``s~^beta = s_0 + (1 + 1/beta)(s_c - s_0)``; or plain reference plus the implicit-
    reward loss) against autograd of ``mean w [-(log p_t(x_t|c) - log p_t(x_t)) + beta (log p_sg[theta],t(x_t)
    - log p_t(x_t|c))]`` through x_t: exact log-densities of the reference and of the frozen generator."""
    from dstar_edu.objectives.alignment import diff_instruct_pp_loss
    p = DDPM(1000)
    mix, what = _class_mixture(dim, p)
    gen = _affine_generator(dim, seed=14)
    z, eps, t, w = _batch(gen, p, dim, seed=15, B=32 if dim == 2 else 8, t_lo=300 if dim > 2 else 100)
    beta = 0.5
    params = list(gen.parameters())
    fake = gen.score_predictor(p, frozen=True)
    lib = []
    for mode in ("in", "out"):
        loss = diff_instruct_pp_loss(gen(z), mix, fake, t, alpha_rew=0.0, alpha_cfg=mutate(1 / beta, beta),  # cf: beta
                                     cfg=mode, cond=1,
                                     eps=eps, weight=w)
        lib.append(beta * _flat_grads(torch.autograd.grad(loss, params)))
    _, x_t = _x_t(gen, p, z, eps, t)
    lc, lu = mix.log_prob(x_t, t, 1), mix.log_prob(x_t, t)
    obj = (w * (-(lc - lu) + beta * (fake.log_prob(x_t, t) - lc))).mean()
    ref = _flat_grads(torch.autograd.grad(obj, params))
    atol = _fp_budget(lu, x_t, w) / x_t[0].numel() ** 0.5
    return identity(torch.cat(lib), torch.cat([ref, ref]), rtol=1e-9, atol=atol, data=what)


@register("align.distar_in_reference",
          "DI*-In's CFG-enhanced reference is s_c + alpha_cfg (s_c - s_0): under KL it equals DI*-Out",
          "DI* Sec. 3.3 (Choice 2); Luo talk Thm 3.3",
          printed="s~_ref(x_t|t,c) := s_ref(x_t|t,c) + alpha_cfg (s_ref(x_t|t,0))",
          corrected="s~_ref(x_t|t,c) := s_ref(x_t|t,c) + alpha_cfg (s_ref(x_t|t,c) - s_ref(x_t|t,0)) (the CFG score "
                    "s_0 + (1 + alpha_cfg)(s_c - s_0)); with the KL regulariser the 'In' reference then gives exactly "
                    "the gradient of KL plus alpha_cfg times the implicit CFG reward loss ('Out', Thm 3.2/3.3)")
@_one_thread
def distar_in_reference():
    """Diff-Instruct (KL) generator gradient with the enhanced reference as teacher, versus the plain
    conditional reference plus ``alpha_cfg * cfg_implicit_reward_loss``, on one batch (exact scores)."""
    from dstar_edu.objectives.alignment import GuidedPredictor, cfg_implicit_reward_loss
    from dstar_edu.objectives.distill import diff_instruct_loss
    p = DDPM(1000)
    mix, _ = _class_mixture(2, p)
    gen = _affine_generator(2, seed=16)
    z, eps, t, w = _batch(gen, p, 2, seed=17, B=32)
    fake = gen.score_predictor(p, frozen=True)
    params, alpha = list(gen.parameters()), 2.5
    printed_ref = FunctionPredictor(lambda x, tt, c: mix.score(x, tt, c) + alpha * mix.score(x, tt, None), p, "score")

    def grad_of(loss):
        return _flat_grads(torch.autograd.grad(loss, params))
    out = grad_of(diff_instruct_loss(gen(z), mix, fake, t, eps=eps, weight=w, cond=1)
                  + alpha * cfg_implicit_reward_loss(gen(z), mix, t, cond=1, eps=eps, weight=w))
    g_printed = grad_of(diff_instruct_loss(gen(z), printed_ref, fake, t, eps=eps, weight=w, cond=1))
    g_corr = grad_of(diff_instruct_loss(gen(z), GuidedPredictor(mix, alpha), fake, t, eps=eps, weight=w, cond=1))
    return erratum(identity(g_printed, out, rtol=1e-10, atol=1e-13), identity(g_corr, out, rtol=1e-10, atol=1e-13))


# ---- DI* Thm 3.1 --------------------------------------------------------------------------------------------
def _score_div_reference(gen, p, reference, times, wts, rule, distance, c, cond):
    """theta-gradient of sum_t w_t E_{x ~ p_sg[theta],t} d(s_theta,t(x) - s_ref,t(x)) by quadrature in x-space.

    ``rule = (u, weights)`` integrates against N(0, I_2); x = mean + L u with the frozen marginal of p_theta,t."""
    from dstar_edu.objectives.distill import score_divergence
    u, uw = rule
    live = gen.score_predictor(p)
    total = 0.0
    for t, w in zip(times, wts):
        with torch.no_grad():
            mean, cov = gen.marginal(t, p)
            L = torch.linalg.cholesky(cov[0])
            x = mean[0] + u @ L.T
        tt = torch.full((x.shape[0],), t, dtype=F64)
        kw = {"c": c} if distance == "pseudo_huber" else {}
        dval = score_divergence(x, tt, live, reference, distance=distance, cond=cond, **kw)
        total = total + w * (uw * dval).sum()
    return _flat_grads(torch.autograd.grad(total, list(gen.parameters())))


@register("align.distar_thm31_exact",
          "DI* tractable loss (3.4) has the gradient of reward + score divergence (3.3): exact (squared L2, "
          "Gaussian reference)", "DI* Thm 3.1, Eq. 3.3-3.4")
@_one_thread
def distar_thm31_exact():
    """Affine generator, Gaussian reference, d = ||.||^2, quadratic reward. Reference: autograd of
    ``-alpha E r(g_theta(z))`` (closed form) plus ``sum_t w_t E_{x ~ p_sg[theta],t} d(s_theta,t - s_ref,t)`` with
    pi_t frozen at the current theta (3-point Gauss-Hermite in x, exact for the quadratic integrand). Library:
    ``diff_instruct_star_loss`` (= ``sim_generator_loss`` + reward) on a 3-point-per-axis rule over (z, eps),
    exact for its degree <= 4 integrand."""
    from dstar_edu.generators import AffineGaussianGenerator
    from dstar_edu.objectives.alignment import diff_instruct_star_loss
    from dstar_edu.rewards import QuadraticReward
    from toy_data.mixtures import GaussianMixture
    p = DDPM(1000)
    gen = AffineGaussianGenerator(2, mean=torch.tensor([0.3, -0.4], dtype=F64),
                                  A=torch.tensor([[0.9, 0.3], [-0.2, 0.5]], dtype=F64))
    S_q = torch.tensor([[0.49, 0.28], [0.28, 0.52]], dtype=F64)
    ref = GaussianMixture(torch.tensor([[-0.5, 0.8]], dtype=F64), S_q[None], process=p)
    reward, alpha_rew = QuadraticReward([1.0, 0.5], scale=0.8), 0.7
    times, wts = [100.0, 400.0, 800.0], [0.5, 1.0, 2.0]
    params = list(gen.parameters())
    exact = _score_div_reference(gen, p, ref, times, wts, gauss_hermite_grid(3, 2), "l2", None, None)
    r_obj = alpha_rew * (((gen.mu - reward.center) ** 2).sum() + torch.trace(gen.covariance())) / (2 * reward.scale ** 2)
    exact = exact + _flat_grads(torch.autograd.grad(r_obj, params))
    nodes, nw = gauss_hermite_grid(3, 4)
    n = len(nw)
    Z, E = torch.cat([nodes[:, :2]] * 3), torch.cat([nodes[:, 2:]] * 3)
    T = torch.cat([torch.full((n,), t, dtype=F64) for t in times])
    W = torch.cat([nw * w for w in wts])
    B = len(W)
    c_r = B * torch.cat([nw] * 3) / len(times)
    fake = gen.score_predictor(p, frozen=True)
    loss = diff_instruct_star_loss(gen(Z), ref, fake, T, reward=lambda x, c=None: c_r * reward(x),
                                   alpha_rew=mutate(alpha_rew, -alpha_rew),           # counterfactual: reward sign
                                   distance="l2", eps=E, weight=B * W)
    lib = _flat_grads(torch.autograd.grad(loss, params))
    return identity(lib, exact, rtol=1e-10, atol=1e-13)


@register("align.distar_thm31_mc",
          "DI* tractable loss (3.4) has the gradient of the pseudo-Huber score divergence (3.3) to a CFG-enhanced "
          "mixture reference (Monte Carlo)", "DI* Thm 3.1, Eq. 3.4, 3.8; Sec. 3.3 (DI*-In)")
@_one_thread
def distar_thm31_mc():
    """Affine generator, class-conditional mixture reference guided with alpha_cfg = 1.5 (DI*-In), pseudo-Huber
    c = 0.5. Reference: sum over two times of the theta-gradient of ``E_{x ~ p_sg[theta],t} d(s_theta,t(x) -
    s~_ref,t(x))`` by the trapezoid rule on a whitened grid of spacing 0.1 (its change from spacing 0.14 is
    reported, ~4e-7, and spacing 0.07 moves it by ~2e-9: far below the Monte-Carlo standard error; Gauss-Hermite converges slowly here because
    the pseudo-Huber kink scale c is small). Library: ``diff_instruct_star_loss(cfg='in')``
    gradients averaged over 40 independent batches of 1000 (z, eps) draws; 5 standard errors."""
    from dstar_edu.objectives.alignment import GuidedPredictor, diff_instruct_star_loss
    p = DDPM(1000)
    mix, _ = _class_mixture(2, p)
    gen = _affine_generator(2, seed=18)
    alpha_cfg, c = 1.5, 0.5
    times, wts = [150.0, 450.0], [1.0, 0.5]
    guided = GuidedPredictor(mix, alpha_cfg)
    exact = _score_div_reference(gen, p, guided, times, wts, trapezoid_rule_2d(0.1), "pseudo_huber", c, 1)
    coarse = _score_div_reference(gen, p, guided, times, wts, trapezoid_rule_2d(0.14), "pseudo_huber", c, 1)
    params = list(gen.parameters())
    fake = gen.score_predictor(p, frozen=True)
    g = _gen(19)
    ests = []
    for _ in range(40):
        n = 1000
        z = gen.noise(n, g)
        eps = torch.randn(n, 2, generator=g, dtype=F64)
        pick = torch.randint(0, 2, (n,), generator=g)
        T = torch.tensor(times, dtype=F64)[pick]
        W = mutate(2, 1) * torch.tensor(wts, dtype=F64)[pick]  # each time drawn with probability 1/2 (cf: 1/2 lost)
        loss = diff_instruct_star_loss(gen(z), mix, fake, T, alpha_rew=0.0, alpha_cfg=alpha_cfg, cfg="in", cond=1,
                                       distance="pseudo_huber", c=c, eps=eps, weight=W)
        ests.append(_flat_grads(torch.autograd.grad(loss, params)))
    ests = torch.stack(ests)
    se = ests.std(0) / math.sqrt(ests.shape[0])
    return monte_carlo(ests.mean(0), exact, se, n_sigma=5.0, n=40 * 1000,
                       quadrature_change_h014_to_h010=float((exact - coarse).abs().max()))


# ---- DI* Thm 3.1 and DI++ Thm 3.1 on real CIFAR images (3x32x32) ---------------------------------------------
def _image_problem(n: int, seed: int):
    """The class-conditional empirical reference of 16 real CIFAR images (``_class_mixture``), a 2-component
    isotropic mixture generator whose means sit between reference images (``distill.image_mixture_generator``),
    per-sample (z, eps, t), a quadratic reward centred on another image, and parameter directions."""
    from dstar_edu.rewards import QuadraticReward
    from dstar_edu.verify.checks.distill import image_mixture_generator, random_directions
    p = DDPM(1000)
    mix, what = _class_mixture(3072, p)
    from toy_data.cifar import image_dataset_for_checks
    images, _ = image_dataset_for_checks(16, generator=_gen(0), dtype=F64)   # the reference's points
    gen = image_mixture_generator(images)
    g = _gen(seed)
    z = gen.noise(n, g)
    eps = torch.randn(n, *gen.event_shape, generator=g, dtype=F64)
    t = torch.randint(100, 900, (n,), generator=g).to(F64)
    dirs = random_directions(gen, 2, seed + 1, only="log_scales") + random_directions(gen, 4, seed + 2)
    reward = QuadraticReward(images[5].reshape(-1), scale=4.0)
    return p, mix, what, gen, z, eps, t, dirs, reward


@register("align.distar_thm31_images",
          "DI* tractable loss (3.4) has the gradient of reward + pseudo-Huber score divergence (3.3) to the CFG-"
          "enhanced reference of real CIFAR images (Monte Carlo)", "DI* Thm 3.1, Eq. 3.3-3.4; Sec. 3.3 (DI*-In)",
          dims=(3072,))
@_one_thread
def distar_thm31_images(dim):
    """Reference: the class-conditional empirical distribution of 16 real CIFAR-10 images (2 classes), guided
    with alpha_cfg = 1.5 (DI*-In); generator: 2-component isotropic mixture at 3x32x32 (exact diffused score);
    pseudo-Huber c = 0.5; quadratic reward. Per sample, along 6 parameter directions (forward-mode autograd):
    the intractable side d/dtheta [d(s_theta,t(x_t) - s~_ref(x_t)) - alpha r(g_theta(z))] at fixed x_t
    (autograd through the generator's exact score), against the derivative of the library's
    ``diff_instruct_star_loss``. Paired Monte Carlo (n = 300): the per-sample sides differ, their means
    agree within 5 s.e. Counterfactual: the tractable side with its sign flipped."""
    from dstar_edu.objectives.alignment import GuidedPredictor, diff_instruct_star_loss
    from dstar_edu.objectives.divergences import get_distance
    from dstar_edu.verify.checks.distill import _paired, per_sample_derivatives, per_sample_derivatives_x0
    n, alpha_cfg, alpha_rew, c = 300, 1.5, 0.3, 0.5
    p, mix, what, gen, z, eps, t, dirs, reward = _image_problem(n, seed=30)
    guided = GuidedPredictor(mix, alpha_cfg)
    d = get_distance("pseudo_huber", c=c)
    with torch.no_grad():
        x_t = p.q_sample(gen(z), t, eps=eps)[0]
        s_ref = guided.predict("score", x_t, t, 1)

    def intractable(m):
        return d.value(m.score_predictor(p).predict("score", x_t, t) - s_ref) - alpha_rew * reward(m(z))
    lhs = per_sample_derivatives(gen, intractable, dirs)
    fake = gen.score_predictor(p, frozen=True)
    rhs = per_sample_derivatives_x0(gen, z, lambda x0: n * diff_instruct_star_loss(
        x0, mix, fake, t, reward=reward, alpha_rew=alpha_rew, alpha_cfg=alpha_cfg, cfg="in", cond=1,
        distance="pseudo_huber", c=c, eps=eps), dirs)
    return _paired(mutate(rhs, -rhs), lhs, data=what, n_directions=len(dirs))


@register("align.dipp_thm31_images",
          "DI++ loss has the gradient of -alpha E r + KL(p_theta,t || p_ref,t) to a reference of real CIFAR images "
          "(Monte Carlo)", "Luo talk Diff-Instruct++ Thm 3.1, Eq. 3.2-3.4", dims=(3072,))
@_one_thread
def dipp_thm31_images(dim):
    """Reference: the class-conditional empirical distribution of 16 real CIFAR-10 images, class 1; generator:
    2-component isotropic mixture at 3x32x32 with exact log-density; quadratic reward. Per sample, along 6
    parameter directions: the pathwise derivative of ``log p_theta,t(x_t) - log p_ref,t(x_t|c) - alpha r(x0)``
    with x_t = alpha g_theta(z) + sigma eps, *everything* live (autograd of exact log-densities: its mean is
    the gradient of the KL, since the score-function term E[d log p_theta,t / d theta] = 0), against the
    derivative of the library's ``diff_instruct_pp_loss`` (frozen exact generator score). Paired Monte Carlo
    (n = 300), 5 s.e. Counterfactual: the reward's sign flipped in the library loss."""
    from functools import partial

    from dstar_edu.objectives.alignment import diff_instruct_pp_loss
    from dstar_edu.verify.checks.distill import _paired, per_sample_derivatives, per_sample_derivatives_x0
    n, alpha_rew = 300, 0.3
    p, mix, what, gen, z, eps, t, dirs, reward = _image_problem(n, seed=40)

    def exact(m):
        x0 = m(z)
        x_t = p.q_sample(x0, t, eps=eps)[0]
        return m.log_prob(x_t, t, p) - mix.log_prob(x_t, t, 1) - alpha_rew * reward(x0)
    lhs = per_sample_derivatives(gen, exact, dirs)
    fake = gen.score_predictor(p, frozen=True)
    loss = partial(diff_instruct_pp_loss, reference=mix, fake=fake, t=t, reward=reward, cond=1, eps=eps,
                   alpha_rew=mutate(alpha_rew, -alpha_rew))
    rhs = per_sample_derivatives_x0(gen, z, lambda x0: n * loss(x0), dirs)
    return _paired(rhs, lhs, data=what, n_directions=len(dirs))


# ---- ReFL, Q-score matching, DDPO-IS (handbook Sec. 3.3.1-3.3.2) -----------------------------------------------
def _linear_eps_state(dim: int, seed: int):
    """A linear eps-predictor chain and a batch x_t at its second time (DDPM t = 400)."""
    p, ts, chain = _chain_setup(dim, seed=seed)
    x = torch.randn(6, dim, generator=_gen(seed + 1), dtype=F64) * 1.2
    return p, ts, chain, x, ts[1]


@register("align.refl_gradient", "ReFL: grad L = -E[grad_x R(x_theta) grad_theta x_theta] through Tweedie's "
          "one-step x_theta", "handbook Sec. 3.3.1 (ReFL), Eq. 7", dims=DIMS)
@_one_thread
def refl_gradient(dim):
    """Linear eps-predictor, quadratic reward: the gradient of the library's ``refl_loss`` at x_t against the
    vector-Jacobian product -grad_x R(x_theta) d x_theta / d theta of x_theta = (x_t - sqrt(1-ab_t) eps_theta) /
    sqrt(ab_t) written out (Eq. 7), in the chain's parameters."""
    from dstar_edu.objectives.reward_finetune import refl_loss
    from dstar_edu.rewards import QuadraticReward
    p, ts, chain, x, t = _linear_eps_state(dim, seed=50)
    reward = QuadraticReward(torch.linspace(-1, 1, dim, dtype=F64), scale=1.0)
    params = (chain.a, chain.b)
    lib = _flat_grads(torch.autograd.grad(refl_loss(chain.predictor, x, t, reward), params))
    ab = mutate(p.alpha_bar(t), p.step_alpha(t))                   # counterfactual: Sec. 3.3's alpha_t
    x_theta = (x - (1 - ab).sqrt() * chain.predictor(x, t)) / ab.sqrt()
    gx = -(x_theta - reward.center) / reward.scale ** 2            # grad_x R of the quadratic reward
    ref = _flat_grads(torch.autograd.grad(x_theta, params, grad_outputs=-gx.detach() / x.shape[0]))
    return identity(lib, ref, rtol=1e-10, data=POINTWISE)


@register("align.refl_x0_hat", "ReFL's one-step prediction x_theta needs alpha_bar_t (Eq. 7)",
          "handbook Sec. 3.3.1 (ReFL)", dims=DIMS,
          printed="x_theta = x_t / sqrt(alpha_t) - sqrt(1 - alpha_t) / sqrt(alpha_t) eps_theta 'as Eq. (7)'",
          corrected="x_theta = x_t / sqrt(ab_t) - sqrt(1 - ab_t) / sqrt(ab_t) eps_theta (Eq. 7): with the per-step "
                    "alpha_t of the handbook's notation it is not Tweedie's estimate (the same slip as Alg. 1 line 4)")
@_one_thread
def refl_x0_hat(dim):
    """The exact eps of the data's diffused law (exact_data) at DDPM times: printed and corrected x_theta against
    the exact posterior mean E[x0 | x_t] (Gaussian conditioning)."""
    from dstar_edu.verify.fixtures import exact_data, noisy_batch
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    _, _, x_t, t = noisy_batch(dist, p, [3, 40, 250, 600, 990], seed=55)
    eps = dist.predict("eps", x_t, t)
    col = [1] * (x_t.ndim - 1)
    a, ab = p.step_alpha(t).reshape(-1, *col), p.alpha_bar(t).reshape(-1, *col)
    truth = dist.posterior_mean(x_t, t)
    printed = x_t / a.sqrt() - (1 - a).sqrt() / a.sqrt() * eps
    corrected = x_t / ab.sqrt() - (1 - ab).sqrt() / ab.sqrt() * eps
    return erratum(identity(printed, truth, rtol=1e-9), identity(corrected, truth, rtol=1e-9), data=what)


@register("align.qsm", "Q-score matching: E ||s_theta(x_t, t) - grad_x R(x_t)||^2 with the model's score",
          "handbook Sec. 3.3.1 (QSM); Psenka et al. 2024", dims=DIMS)
@_one_thread
def qsm(dim):
    """Per-sample ``qsm_loss`` (scale 1 and 0.5) of a linear eps-predictor against ||-eps_theta/sqrt(1-ab_t) -
    scale grad R(x_t)||^2 (Eq. 18 and the quadratic reward's gradient written out), and its parameter gradient
    against autograd of that expression."""
    from dstar_edu.objectives.reward_finetune import qsm_loss
    from dstar_edu.rewards import QuadraticReward
    p, ts, chain, x, t = _linear_eps_state(dim, seed=60)
    reward = QuadraticReward(torch.linspace(-1, 1, dim, dtype=F64), scale=0.8)
    params = (chain.a, chain.b)
    lhs, rhs = [], []
    for scale in (1.0, 0.5):
        lib = qsm_loss(chain.predictor, x, t, reward, scale=scale, reduction="none")
        s = -chain.predictor(x, t) / mutate((1 - p.alpha_bar(t)).sqrt(), 1 - p.alpha_bar(t))   # cf: sigma^2
        ref = ((s + scale * (x - reward.center) / reward.scale ** 2) ** 2).sum(1)
        lhs += [lib, _flat_grads(torch.autograd.grad(lib.sum(), params))]
        rhs += [ref, _flat_grads(torch.autograd.grad(ref.sum(), params))]
    return identity(torch.cat(lhs), torch.cat(rhs), rtol=1e-10, data=POINTWISE)


@register("align.ddpo_is", "DDPO-IS: at theta = theta_old the clipped importance-sampling gradient is DDPO-SF's "
          "over N; outside the clip range it vanishes", "handbook Sec. 3.3.2 (DDPO_IS); Black et al. 2023")
@_one_thread
def ddpo_is():
    """A 3-step chain of a linear eps-predictor (eta = 1), trajectories from ``sample_with_log_probs``: (i) with
    old log-probs = the current ones (ratio 1), grad ``ddpo_is_loss`` = grad ``ddpo_sf_loss`` / N; (ii) with old
    log-probs lowered by 1 (ratio e > 1 + clip) and positive advantages the clipped surrogate is constant: zero
    gradient; (iii) with negative advantages there the unclipped branch is active: -A ratio grad log p / N."""
    from dstar_edu.objectives.reward_finetune import (_traj_log_probs, ddpo_is_loss, ddpo_sf_loss,
                                                      sample_with_log_probs)
    p, ts, chain = _chain_setup(2, seed=70)
    x_init = torch.randn(64, 2, generator=_gen(71), dtype=F64)
    traj, logp = sample_with_log_probs(chain.predictor, ts, x_init, eta=1.0, generator=_gen(72))
    adv = torch.randn(64, generator=_gen(73), dtype=F64)
    params, N = (chain.a, chain.b), len(ts) - 1
    old = mutate(logp.detach(), logp.detach() - 0.5)             # counterfactual: stale old log-probs
    g_is = _flat_grads(torch.autograd.grad(ddpo_is_loss(chain.predictor, traj, ts, adv, old, eta=1.0), params))
    g_sf = _flat_grads(torch.autograd.grad(ddpo_sf_loss(chain.predictor, traj, ts, adv, eta=1.0), params))
    pos, neg = adv.abs(), -adv.abs()
    g_clip = _flat_grads(torch.autograd.grad(ddpo_is_loss(chain.predictor, traj, ts, pos, logp.detach() - 1.0,
                                                          eta=1.0), params, allow_unused=True))
    g_unclipped = _flat_grads(torch.autograd.grad(ddpo_is_loss(chain.predictor, traj, ts, neg, logp.detach() - 1.0,
                                                               eta=1.0), params))
    lp = _traj_log_probs(chain.predictor, traj, ts, 1.0, None)
    ref_unclipped = _flat_grads(torch.autograd.grad((-neg[:, None] * math.e * lp).mean(1).mean(), params))
    return identity(torch.cat([g_is, g_clip, g_unclipped]),
                    torch.cat([g_sf / N, torch.zeros_like(g_clip), ref_unclipped]), rtol=1e-10, atol=1e-14,
                    data="linear eps-predictor chain from N(0, I) (" + POINTWISE + ")")
