"""Checks of the handbook's foundations (Sec. 2.2, 2.4.3-2.4.5, 2.5, 2.6, 2.7), run on exact models.

At ``dim=2`` the data distribution is a 3-component 2D Gaussian mixture with full covariances; at
``dim=3072`` it is the empirical distribution of 32 real CIFAR-10 test images of shape 3x32x32, drawn from
the sample packaged with ``toy_data`` (the result's details name the source).
Exact posterior means come from Gaussian conditioning inside each component, exact scores from
autograd of the exact log-density: two independent routes.
"""
from __future__ import annotations

import functools
import math

import torch

from dstar_edu import conversions as cv
from dstar_edu.process import DDPM, VE, VP, Process, RectifiedFlow, TrigFlow
from dstar_edu.samplers.diffusion import ddim_update, ddpm_posterior
from dstar_edu.verify.fixtures import exact_data, noisy_batch, autograd_score
from dstar_edu.verify.registry import DIMS, POINTWISE, check_generator, erratum, identity, monte_carlo, mutate, register

F64 = torch.float64
Tensor = torch.Tensor


_gen = check_generator                 # every random draw of a check (see registry.py on seeds)


DDPM_TIMES = [3, 40, 250, 600, 990]


# ---- Eq. 5 -> Eq. 6 -----------------------------------------------------------------------------------
@register("basics.forward_chaining", "Chaining the one-step kernels (Eq. 5) gives the marginal (Eq. 6)",
          "handbook Eq. 5-6")
def forward_chaining():
    """Compose q(x_t | x_{t-1}) Gaussians exactly: mean coefficient and variance vs sqrt(ab), 1 - ab."""
    p = DDPM(1000)
    mean_coef, var = torch.ones((), dtype=F64), torch.zeros((), dtype=F64)
    means, variances = [], []
    for alpha in p.alphas:
        mean_coef, var = alpha.sqrt() * mean_coef, alpha * var + (1 - alpha)
        means.append(mean_coef)
        variances.append(var)
    lhs = torch.stack([torch.stack(means), torch.stack(variances)])
    ab = p.alpha_bars[1:]
    return identity(lhs, torch.stack([mutate(ab.sqrt(), ab), 1 - ab]), rtol=1e-12)   # counterfactual: ab, not sqrt


@register("basics.forward_chaining_mc", "Simulated Eq. 5 chain has the Eq. 6 marginal (Monte Carlo)",
          "handbook Eq. 5-6", dims=DIMS)
def forward_chaining_mc(dim):
    """Run x_t = sqrt(alpha_t) x_{t-1} + sqrt(1-alpha_t) eps for 1000 steps; standardise with Eq. 6.

    The standardised residual r = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t) must be N(0, 1): its mean
    (s.e. 1/sqrt(n)) and mean square (s.e. sqrt(2/n)) are tested at t = 100 and t = 1000.
    """
    p = DDPM(1000)
    n_chains = 4000 if dim == 2 else 16
    g = _gen(1)
    x0 = torch.randn(n_chains, dim, generator=g, dtype=F64)
    x, est, ref, se = x0.clone(), [], [], []
    for t in range(1, 1001):
        a = p.alphas[t - 1]
        x = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
        if t in (100, 1000):
            ab = mutate(p.alpha_bars[t], p.alphas[t - 1])    # counterfactual: alpha_t for alpha_bar_t
            r = ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).flatten()
            n = r.numel()
            est += [r.mean(), (r * r).mean()]
            ref += [0.0, 1.0]
            se += [1 / math.sqrt(n), math.sqrt(2 / n)]
    return monte_carlo(torch.stack(est), torch.tensor(ref), torch.tensor(se), n=n_chains * dim,
                       data="x0 ~ N(0, I): Eq. 5-6 are conditional on x0, so any x0 tests them (" + POINTWISE + ")")


# ---- Eq. 7 (Tweedie) ----------------------------------------------------------------------------------
@register("basics.tweedie", "Tweedie: x0_hat from the ideal eps equals the exact posterior mean",
          "handbook Eq. 7, 18", dims=DIMS)
def tweedie(dim):
    """x0 via Eq. 7 from eps = -sigma * (autograd score) vs E[x0|x_t] by Gaussian conditioning.

    Floating-point budget: autograd of a logsumexp rescales all responsibilities by exp(rounding of
    log p_t), a relative error ~ eps_mach |log p_t|, and Eq. 7 divides x_t + sigma^2 s by alpha, so
    the tolerance is 8 eps_mach max|log p_t| max|x_t| / min(alpha) (reported), not a tuned constant.
    """
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    _, _, x_t, t = noisy_batch(dist, p, DDPM_TIMES, seed=10)
    a, s = p.coefficients(t, x_t)
    eps_ideal = cv.eps_from_score(autograd_score(dist, x_t, t), s)          # Eq. 18 inverted
    x0_tweedie = cv.x0_from_eps(x_t, eps_ideal, mutate(a, a * a), s)         # Eq. 7 (counterfactual: ab for sqrt(ab))
    budget = dist.log_prob(x_t, t).abs().max() * x_t.abs().max() / a.min()
    atol = 8 * torch.finfo(F64).eps * float(budget)
    return identity(x0_tweedie, dist.posterior_mean(x_t, t), rtol=1e-10, atol=atol, data=what)


# ---- Eq. 8 (posterior q(x_{t-1} | x_t, x0)) ---------------------------------------------------------------
def ddpm_posterior_at(p: DDPM, t: Tensor, x_t, x0):
    """Mean and variance of q(x_{t-1} | x_t, x0) from the library's one Eq. 8 (``ddpm_posterior``), integer t >= 1."""
    a_t = p.step_alpha(t)
    ab_t, ab_prev = p.alpha_bars[t.long()], p.alpha_bars[t.long() - 1]
    a_t, ab_t, ab_prev = (c.reshape(-1, *[1] * (x_t.ndim - 1)) for c in (a_t, ab_t, ab_prev))
    c_x0, c_xt, var = ddpm_posterior(ab_t, ab_prev, alpha=a_t)
    return c_x0 * x0 + c_xt * x_t, var


@register("basics.posterior_eq8", "Posterior q(x_{t-1}|x_t,x0) of Eq. 8 equals a numerical Bayes computation",
          "handbook Eq. 8", dims=DIMS)
def posterior_eq8(dim):
    """Per coordinate, multiply q(x_t|x_{t-1}) q(x_{t-1}|x0) on a grid and integrate (trapezoid rule).

    The grid spans +-12 prior standard deviations with 2001 points (spacing <= 0.1 posterior std at
    these t); for Gaussian integrands the trapezoid rule is exponentially accurate: tolerance 1e-9 relative.
    """
    p = DDPM(1000)
    ts, x0, x_t, lhs, what = _posterior_eq8_numerical(dim)
    mean, var = ddpm_posterior_at(p, ts, x_t, x0)
    var = mutate(var, 1 - p.step_alpha(ts)[:, None])      # counterfactual: beta_t for the posterior variance
    rhs = torch.cat([mean.flatten(), var.expand(len(ts), x0.shape[1]).flatten()])
    return identity(lhs, rhs, rtol=1e-9, data=what)


@functools.lru_cache(maxsize=None)
def _posterior_eq8_numerical(dim):
    """The numerical Bayes side of ``posterior_eq8`` (computed once per dim: the counterfactual run reuses it)."""
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    ts = torch.tensor([2, 30, 300, 800], dtype=F64)
    x0, _, x_t, _ = noisy_batch(dist, p, ts, seed=20)
    x0, x_t = x0.reshape(len(ts), -1), x_t.reshape(len(ts), -1)
    u = torch.linspace(-1, 1, 2001, dtype=F64)
    num_mean, num_var = [], []
    for i, t in enumerate(ts.long()):
        a_t, ab_prev = p.alphas[t - 1], p.alpha_bars[t - 1]
        c = ab_prev.sqrt() * x0[i]                                   # prior q(x_{t-1}|x0) centre
        grid = c[:, None] + 12 * (1 - ab_prev).sqrt() * u[None, :]    # (D, G)
        log_dens = (-(x_t[i][:, None] - a_t.sqrt() * grid) ** 2 / (2 * (1 - a_t))
                    - (grid - c[:, None]) ** 2 / (2 * (1 - ab_prev)))
        dens = torch.exp(log_dens - log_dens.max(1, keepdim=True).values)
        z = torch.trapezoid(dens, grid, dim=1)
        m = torch.trapezoid(dens * grid, grid, dim=1) / z
        num_mean.append(m)
        num_var.append(torch.trapezoid(dens * (grid - m[:, None]) ** 2, grid, dim=1) / z)
    lhs = torch.cat([torch.stack(num_mean).flatten(), torch.stack(num_var).flatten()])
    return ts, x0, x_t, lhs, what


# ---- Eq. 9-13: equivalent forms of the DDPM step ---------------------------------------------------------
def _step_inputs(dim):
    p = DDPM(1000)
    g = _gen(30)
    t = torch.tensor([2, 17, 150, 500, 999], dtype=F64)
    B = len(t)
    x_t = torch.randn(B, dim, generator=g, dtype=F64)
    eps_theta = torch.randn(B, dim, generator=g, dtype=F64)
    noise = torch.randn(B, dim, generator=g, dtype=F64)
    col = lambda v: v.reshape(-1, 1)  # noqa: E731
    a_t = col(p.step_alpha(t))
    ab_t, ab_prev = col(p.alpha_bars[t.long()]), col(p.alpha_bars[t.long() - 1])
    sig = ddpm_posterior(ab_t, ab_prev, alpha=a_t)[2].sqrt()                  # Eq. 8's posterior std
    x0_hat = (x_t - (1 - ab_t).sqrt() * eps_theta) / ab_t.sqrt()             # Eq. 7
    return dict(x_t=x_t, e=eps_theta, z=noise, a=a_t, ab=ab_t, abp=ab_prev, sig=sig, x0=x0_hat)


def eq9(x_t, e, z, a, ab, sig, **_):
    return x_t / a.sqrt() - (1 - a) / ((1 - ab).sqrt() * a.sqrt()) * e + sig * z


def eq10(x_t, x0, z, a, ab, abp, sig, **_):
    c_x0, c_xt, _ = ddpm_posterior(ab, abp, alpha=a)     # Eq. 10 is Eq. 8's mean with Tweedie's x0_hat
    return c_x0 * x0 + c_xt * x_t + sig * z


def eq11(x0, e, z, abp, sig, **_):
    return ddim_update(x0, e, abp.sqrt(), 1 - abp, sig, z)      # Eq. 11 is the DDIM recombination (Eq. 14)


def eq12(x_t, e, z, ab, abp, sig, a, printed=False, **_):
    denom = a.sqrt() if printed else ab.sqrt()       # as printed: sqrt(alpha_t); correct: sqrt(alpha_bar_t)
    return abp.sqrt() * (x_t - (1 - ab).sqrt() * e) / denom + (1 - abp - sig ** 2).sqrt() * e + sig * z


def eq13(x_t, x0, z, ab, abp, sig, printed=False, **_):
    k = (1 - abp - sig ** 2).sqrt()
    coef_x = (1 - abp).sqrt() / (1 - ab).sqrt() if printed else k / (1 - ab).sqrt()
    return (abp.sqrt() - k * ab.sqrt() / (1 - ab).sqrt()) * x0 + coef_x * x_t + sig * z


@register("basics.posterior_forms", "Eq. 9, 10, 11 and the boxed posterior mean are one DDPM step",
          "handbook Eq. 8-11", dims=DIMS)
def posterior_forms(dim):
    d = _step_inputs(dim)
    ab_boxed = mutate(d["ab"], d["abp"])                 # counterfactual: ab_{t-1} for ab_t in the boxed mean
    boxed_mu = d["x_t"] / d["a"].sqrt() - (1 - d["a"]) / ((1 - ab_boxed).sqrt() * d["a"].sqrt()) * d["e"]
    c_x0, c_xt, _ = ddpm_posterior(d["ab"], d["abp"], alpha=d["a"])
    eq8_mu = c_x0 * d["x0"] + c_xt * d["x_t"]
    ref = eq9(**d)
    sigma_identity = (1 - d["abp"] - d["sig"] ** 2).sqrt() - (1 - d["abp"]) * (d["a"] / (1 - d["ab"])).sqrt()
    lhs = torch.stack([eq10(**d), eq11(**d), boxed_mu + d["sig"] * d["z"], eq8_mu + d["sig"] * d["z"],
                       ref + sigma_identity])
    return identity(lhs, ref.expand_as(lhs), rtol=1e-12, data=POINTWISE)


@register("basics.eq12_denominator", "Eq. 12 divides by sqrt(alpha_bar_t), not sqrt(alpha_t)",
          "handbook Eq. 12", dims=DIMS,
          printed="x_{t-1} = sqrt(ab_{t-1}) (x_t - sqrt(1-ab_t) eps)/sqrt(alpha_t) + ... "
                  "(and the x0_hat below it, also over sqrt(alpha_t))",
          corrected="x_{t-1} = sqrt(ab_{t-1}) (x_t - sqrt(1-ab_t) eps)/sqrt(ab_t) + sqrt(1-ab_{t-1}-sigma_t^2) eps "
                    "+ sigma_t z: the bracket is Tweedie's x0_hat (Eq. 7), which needs alpha_bar_t")
def eq12_denominator(dim):
    d = _step_inputs(dim)
    ref = eq9(**d)
    return erratum(identity(eq12(**d, printed=True), ref, rtol=1e-12), identity(eq12(**d), ref, rtol=1e-12),
                   data=POINTWISE)


@register("basics.eq13_coefficient", "Eq. 13's x_t coefficient needs sigma_t",
          "handbook Eq. 13", dims=DIMS,
          printed="x_{t-1} = (sqrt(ab_{t-1}) - sqrt(1-ab_{t-1}-sigma_t^2) sqrt(ab_t)/sqrt(1-ab_t)) x0_hat "
                  "+ sqrt(1-ab_{t-1})/sqrt(1-ab_t) x_t + sigma_t z",
          corrected="the x_t coefficient is sqrt(1-ab_{t-1}-sigma_t^2)/sqrt(1-ab_t) (it multiplies eps_theta "
                    "= (x_t - sqrt(ab_t) x0_hat)/sqrt(1-ab_t) in Eq. 11); the printed one holds only for eta = 0")
def eq13_coefficient(dim):
    d = _step_inputs(dim)
    ref = eq9(**d)
    return erratum(identity(eq13(**d, printed=True), ref, rtol=1e-12), identity(eq13(**d), ref, rtol=1e-12),
                   data=POINTWISE)


# ---- Eq. 15-18: scores ------------------------------------------------------------------------------------
@register("basics.conditional_score", "Conditional score Eq. 17 and the eps-score relation Eq. 16/18",
          "handbook Eq. 16-18", dims=DIMS)
def conditional_score(dim):
    """Eq. 17 vs autograd of log N(x_t; sqrt(ab) x0, (1-ab) I); Eq. 16 = -eps/sqrt(1-ab) on the same pair;
    Eq. 18 with the ideal eps_theta = E[eps|x_t] reproduces the exact marginal score."""
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    x0, eps, x_t, t = noisy_batch(dist, p, DDPM_TIMES, seed=40)
    a, s = p.coefficients(t, x_t)
    x = x_t.clone().requires_grad_(True)
    log_q = (-(x - a * x0) ** 2 / (2 * s ** 2)).sum()
    (auto_cond,) = torch.autograd.grad(log_q, x)
    eq17 = -(x_t - a * x0) / mutate(s ** 2, s)        # counterfactual: sigma for sigma^2
    eq16 = -eps / s
    eps_ideal = cv.eps_from_x0(x_t, dist.posterior_mean(x_t, t), a, s)
    eq18 = cv.score_from_eps(eps_ideal, s)
    lhs = torch.stack([eq17, eq16, eq18])
    rhs = torch.stack([auto_cond, auto_cond, autograd_score(dist, x_t, t)])
    return identity(lhs, rhs, rtol=1e-10, data=what)


@register("basics.eq15_marginal_score", "The marginal score averages the conditional score over the posterior",
          "handbook Eq. 15", dims=DIMS,
          printed="s(x_t, t) = grad log q(x_t) = E_{q(x0)}[grad log q(x_t|x0)] (expectation over the data prior)",
          corrected="s(x_t, t) = E_{q(x0|x_t)}[grad log q(x_t|x0)] = -(x_t - sqrt(ab_t) E[x0|x_t])/(1-ab_t): "
                    "the expectation is over the posterior q(x0|x_t) (Vincent 2011)")
def eq15_marginal_score(dim):
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    _, _, x_t, t = noisy_batch(dist, p, DDPM_TIMES, seed=50)
    a, s = p.coefficients(t, x_t)
    truth = autograd_score(dist, x_t, t)
    prior_mean = dist.mean().to(F64).expand_as(x_t)
    as_printed = -(x_t - a * prior_mean) / s ** 2
    corrected = cv.convert(dist.posterior_mean(x_t, t), "x0", "score", x_t, t, p)   # the library's Eq. 7 / 18 route
    return erratum(identity(as_printed, truth, rtol=1e-10), identity(corrected, truth, rtol=1e-10), data=what)


# ---- Fig. 3: triangular formulas in diffusion --------------------------------------------------------------
def _exact_pair(dim, process, ts, seed):
    dist, what = exact_data(dim, process)
    _, _, x_t, t = noisy_batch(dist, process, ts, seed)
    x0 = dist.posterior_mean(x_t, t)
    a, s = process.coefficients(t, x_t)
    return x_t, t, x0, cv.eps_from_x0(x_t, x0, a, s), what


@register("basics.triangular_diffusion", "Triangular formulas eps/x0/v and v-bar (Fig. 3, Sec. 2.6.1-2.6.2)",
          "handbook Fig. 3, Sec. 2.6.2", dims=DIMS)
def triangular_diffusion(dim):
    """Every printed edge of the triangle and the v-bar variants, against references that do not go through
    ``conversions``: x0 = E[x0|x_t] by Gaussian conditioning, eps = -sqrt(1-ab) * (autograd score) (Eq. 18),
    v = sqrt(1-ab) x0 - sqrt(ab) eps written out (Sec. 2.6.2). The generic router is checked the same way:
    ``from_x0_eps`` must produce each prediction's definition (the table in ``conversions``, written out here
    with the process's alpha, sigma and their derivatives) and ``to_x0_eps`` must invert it, so a consistently
    wrong convention (e.g. v and v-bar swapped in both directions) fails."""
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    _, _, x_t, t = noisy_batch(dist, p, DDPM_TIMES, seed=60)
    x0 = dist.posterior_mean(x_t, t)
    ab = p.alpha_bar(t, x_t).reshape(-1, *[1] * (x_t.ndim - 1))
    eps = -(1 - ab).sqrt() * autograd_score(dist, x_t, t)
    v_ref = (1 - ab).sqrt() * x0 - ab.sqrt() * eps
    v = cv.v_from_x0_eps(x0, eps, ab)
    v_bar = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    a, s = p.coefficients(t, x_t)
    lhs = [cv.eps_from_x0(x_t, x0, a, s), cv.x0_from_v(x_t, v_ref, ab), cv.eps_from_v(x_t, v_ref, ab),
           cv.eps_from_x0_via_v(x_t, x0, ab), ab.sqrt() * x_t - (1 - ab).sqrt() * v_bar,
           (1 - ab).sqrt() * x_t + ab.sqrt() * v_bar, v]
    rhs = [eps, x0, eps, eps, x0, eps, v_ref]
    da, ds = (c.reshape(-1, *[1] * (x_t.ndim - 1)) for c in (p.d_alpha(t), p.d_sigma(t)))
    c_skip, c_out = cv.cm_c_skip_c_out(s / a)
    v_def = mutate(v_ref, -v_ref)              # counterfactual: the v / v-bar convention swapped everywhere
    definitions = {"eps": eps, "x0": x0, "score": -eps / s, "velocity": da * x0 + ds * eps, "v": v_def,
                   "v_bar": -v_def, "instaflow_v": x0 - eps, "cm_f": c_skip * x_t + c_out * x0}
    for src, val in definitions.items():
        lhs.append(cv.from_x0_eps(src, x0, eps, x_t, t, p))
        rhs.append(val)
        x0_back, eps_back = cv.to_x0_eps(src, val, x_t, t, p)
        lhs += [x0_back, eps_back]
        rhs += [x0, eps]
    return identity(torch.stack(lhs), torch.stack(rhs), rtol=1e-9, data=what)


@register("basics.v_is_dx_dphi", "The v of Sec. 2.6.2 is dx/dphi, not dx/dt",
          "handbook Sec. 2.6.2", dims=DIMS,
          printed="angular velocity v_t = dx_t/dt = cos(phi_t) x0 - sin(phi_t) eps",
          corrected="v_t = dx_t/dphi_t = cos(phi_t) x0 - sin(phi_t) eps with sin(phi_t) = sqrt(ab_t); "
                    "dx_t/dt = (dphi_t/dt) v_t points the other way (phi decreases as t grows)")
def v_is_dx_dphi(dim):
    p = VP()  # smooth alpha_bar(t), so autograd gives dx/dt
    g = _gen(70)
    x0, eps = torch.randn(4, dim, generator=g, dtype=F64), torch.randn(4, dim, generator=g, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.8], dtype=F64)

    def path(tt):
        return p.alpha(tt)[:, None] * x0 + p.sigma(tt)[:, None] * eps

    dx_dt = torch.autograd.functional.jvp(path, t, torch.ones_like(t))[1]
    phi = lambda tt: cv.angle_phi(p.alpha_bar(tt))  # noqa: E731
    dphi_dt = torch.autograd.functional.jvp(phi, t, torch.ones_like(t))[1][:, None]
    v = cv.v_from_x0_eps(x0, eps, p.alpha_bar(t)[:, None])
    return erratum(identity(dx_dt, v, rtol=1e-10), identity(dx_dt / dphi_dt, v, rtol=1e-10), data=POINTWISE)


# ---- Fig. 4, Eq. 30-33: rectified-flow space ----------------------------------------------------------------
@register("basics.triangular_instaflow", "InstaFlow space y_t and its triangle (Eq. 31-33, Fig. 4)",
          "handbook Eq. 30-33, Fig. 4", dims=DIMS)
def triangular_instaflow(dim):
    """For exact (x0, eps) pairs: y_t = gamma x0 + (1-gamma) eps (Eq. 31); with v^y = x0 - eps (Eq. 30),
    Eq. 32 (both lines) and Eq. 33 recover x0 and eps."""
    p = DDPM(1000)
    x_t, t, x0, eps, what = _exact_pair(dim, p, DDPM_TIMES, seed=80)
    ab = p.alpha_bar(t, x_t).reshape(-1, *[1] * (x_t.ndim - 1))
    y = cv.instaflow_y(x_t, ab)
    gam = mutate(cv.instaflow_gamma(ab), ab.sqrt())         # counterfactual: gamma = alpha, not alpha/(alpha+sigma)
    v_y = x0 - eps
    lhs = torch.stack([y, cv.x0_from_instaflow_v(y, v_y, ab), cv.x0_from_instaflow_eps(y, eps, ab),
                       cv.eps_from_instaflow_v(y, v_y, ab)])
    rhs = torch.stack([gam * x0 + (1 - gam) * eps, x0, x0, eps])
    return identity(lhs, rhs, rtol=1e-10, data=what)


@register("basics.velocity_mapping", "Velocity mapping between diffusion and rectified-flow trajectories",
          "handbook Eq. 39", dims=DIMS)
def velocity_mapping(dim):
    """Eq. 39's two forms and autograd agree: dy/dphi = (v^x b - x_t (sqrt(1-ab) - sqrt(ab))) / b^2
    = (x0 - eps) / (1 + 2 sqrt(ab) sqrt(1-ab)) = (x0 - eps) |y|^2/|x|^2; and the InstaFlow target of
    Eq. 30 is dy/dgamma = x0 - eps. Data x0: 4 draws of the exact data (at 3x32x32 real CIFAR images, see
    ``exact_data``; the statement is pointwise algebra in (x0, eps), so the data only sets realistic scales)."""
    g = _gen(90)
    dist, what = exact_data(dim, DDPM(1000))
    x0 = dist.sample(4, generator=g).reshape(4, -1)
    eps = torch.randn(4, dim, generator=g, dtype=F64)
    phi = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=F64)
    ab = (torch.sin(phi) ** 2)[:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    y_of_phi = lambda ph: (torch.sin(ph)[:, None] * x0 + torch.cos(ph)[:, None] * eps) / (  # noqa: E731
        torch.sin(ph) + torch.cos(ph))[:, None]
    dy_dphi = torch.autograd.functional.jvp(y_of_phi, phi, torch.ones_like(phi))[1]
    v_x = cv.v_from_x0_eps(x0, eps, ab)
    y = cv.instaflow_y(x_t, ab)
    norm_ratio = (y.norm(dim=1) ** 2 / x_t.norm(dim=1) ** 2)[:, None]
    gam = cv.instaflow_gamma(ab)
    dy_dgamma = dy_dphi / torch.autograd.functional.jvp(
        lambda ph: torch.sin(ph) / (torch.sin(ph) + torch.cos(ph)), phi, torch.ones_like(phi))[1][:, None]
    lhs = torch.stack([cv.instaflow_v_from_diffusion_v(x_t, mutate(v_x, -v_x), ab),   # counterfactual: v^x sign
                       cv.instaflow_v_closed_form(x0, eps, ab), (x0 - eps) * norm_ratio, dy_dgamma, y])
    rhs = torch.stack([dy_dphi, dy_dphi, dy_dphi, x0 - eps, gam * x0 + (1 - gam) * eps])
    return identity(lhs, rhs, rtol=1e-10, data=what)


@register("basics.weighted_regression", "Velocity-mapped RF loss is a weighted x0 regression (Sec. 2.4.5)",
          "handbook Sec. 2.4.5", dims=DIMS,
          printed="(1 + 2 sqrt(ab) sqrt(1-ab)) v^y_theta - (x0 - eps) = [sqrt(ab)(1-ab) + (1-ab)](x_theta - x0) "
                  "= [(1-ab)(sqrt(ab) + sqrt(1-ab))](eps - eps_theta)",
          corrected="with v^x_theta = sqrt(1-ab) x_theta - sqrt(ab) eps as printed: the residual equals "
                    "sqrt(1-ab)(sqrt(ab) + sqrt(1-ab)) (x_theta - x0) = (1-ab)(sqrt(ab) + sqrt(1-ab))/sqrt(ab) "
                    "(eps - eps_theta); still a weighted regression, with these weights")
def weighted_regression(dim):
    """x0 from the exact data (real CIFAR images at 3x32x32), x_t on DDPM; the model is the exact denoiser
    x_theta = E[x0 | x_t] of that data (Gaussian conditioning), so the residuals are a real regression's."""
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    t = torch.tensor([700.0, 500.0, 300.0, 150.0, 20.0], dtype=F64)        # alpha_bar from 0.05 to 0.98
    x0, eps, x_t, _ = noisy_batch(dist, p, t, seed=100)
    x_theta = dist.posterior_mean(x_t, t).reshape(5, -1)
    x0, eps, x_t = x0.reshape(5, -1), eps.reshape(5, -1), x_t.reshape(5, -1)
    ab = p.alpha_bar(t)[:, None]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    eps_theta = (x_t - a * x_theta) / s
    v_x_theta = s * x_theta - a * eps
    residual = (1 + 2 * a * s) * cv.instaflow_v_from_diffusion_v(x_t, v_x_theta, ab) - (x0 - eps)
    printed = torch.stack([(a * s ** 2 + s ** 2) * (x_theta - x0), s ** 2 * (a + s) * (eps - eps_theta)])
    corrected = torch.stack([s * (a + s) * (x_theta - x0), s ** 2 * (a + s) / a * (eps - eps_theta)])
    both = torch.stack([residual, residual])
    return erratum(identity(printed, both, rtol=1e-10), identity(corrected, both, rtol=1e-10), data=what)


# ---- Sec. 2.7: unified velocity-score formula ---------------------------------------------------------------
def _unified_velocity_check(process: Process, ts, dim: int):
    """PF-ODE drift from the exact score (Sec. 2.7, and Eq. 4 with f, g of the process) equals
    E[d x_t / dt | x_t] = alpha' E[x0|x_t] + sigma' E[eps|x_t] from the mixture's posterior."""
    dist, what = exact_data(dim, process)
    _, _, x_t, t = noisy_batch(dist, process, ts, seed=110)
    a, s = process.coefficients(t, x_t)
    da, ds = (c.reshape(-1, *[1] * (x_t.ndim - 1)) for c in (process.d_alpha(t), process.d_sigma(t)))
    score = autograd_score(dist, x_t, t)
    x0 = dist.posterior_mean(x_t, t)
    truth = da * x0 + ds * cv.eps_from_x0(x_t, x0, a, s)
    unified = cv.velocity_from_score(x_t, mutate(score, -score), a, s, da, ds)   # counterfactual: score sign
    f, g2 = da / a * x_t, 2 * s * ds - 2 * da / a * s ** 2           # SDE drift and g^2 of the process
    eq4 = f - 0.5 * g2 * score
    return identity(torch.stack([unified, eq4]), torch.stack([truth, truth]), rtol=1e-9, data=what)


UNIFIED_CASES = {
    "vp": (VP(), [0.02, 0.2, 0.5, 0.8, 0.98]),
    "ddpm": (DDPM(1000), [3.5, 40.2, 250.7, 600.1, 990.9]),
    "ve": (VE(80.0), [0.05, 0.5, 2.0, 10.0, 60.0]),
    "rectified_flow": (RectifiedFlow(), [0.02, 0.2, 0.5, 0.8, 0.97]),
    "trigflow": (TrigFlow(0.5), [0.05, 0.4, 0.8, 1.2, 1.5]),
}

for _name, (_proc, _ts) in UNIFIED_CASES.items():
    register(f"basics.unified_velocity_{_name}", f"Unified velocity-score formula, {_name} process",
             "handbook Sec. 2.7, Eq. 4", dims=DIMS)(
        lambda dim, _p=_proc, _t=_ts: _unified_velocity_check(_p, _t, dim))


@register("basics.process_derivatives", "alpha'(t), sigma'(t) of every process match autograd",
          "handbook Def. 2.1, Sec. 2.7")
def process_derivatives():
    errs, refs = [], []
    for proc, ts in UNIFIED_CASES.values():
        t = torch.tensor(ts, dtype=F64)
        for fn, dfn in ((proc.alpha, proc.d_alpha), (proc.sigma, proc.d_sigma)):
            auto = torch.autograd.functional.jvp(fn, t, torch.ones_like(t))[1]
            errs.append(mutate(dfn(t), -dfn(t)))
            refs.append(auto)
    return identity(torch.cat(errs), torch.cat(refs), rtol=1e-10)


# ---- DDPM VLB term L_t --------------------------------------------------------------------------------------
@register("basics.vlb_term", "DDPM VLB term L_t as a weighted eps regression",
          "handbook Sec. 2.2.2 (L_t)", dims=DIMS,
          printed="L_t = E[ ||mu_t - mu_theta||^2 / (2 ||Sigma_theta||_2^2) ] = "
                  "E[ (1-alpha_t)^2 / (2 alpha_t (1-ab_t) ||Sigma_theta||_2^2) ||eps - eps_theta||^2 ], "
                  "with Sigma_theta = sigma_t^2 I the covariance of p_theta(x_{t-1}|x_t)",
          corrected="KL(q(x_{t-1}|x_t,x0) || p_theta(x_{t-1}|x_t)) = ||mu_t - mu_theta||^2 / (2 sigma_t^2) "
                    "= (1-alpha_t)^2 / (2 sigma_t^2 alpha_t (1-ab_t)) ||eps - eps_theta||^2: the weight is "
                    "1/(2 sigma_t^2), i.e. ||Sigma_theta||_2^2 must be read as the squared standard deviation")
def vlb_term(dim):
    """Closed-form KL of two Gaussians (torch.distributions) vs the printed and the corrected weights."""
    from torch.distributions import Independent, Normal, kl_divergence
    p = DDPM(1000)
    g = _gen(120)
    t = torch.tensor([2, 20, 200, 700], dtype=F64)
    B = len(t)
    x0, eps = torch.randn(B, dim, generator=g, dtype=F64), torch.randn(B, dim, generator=g, dtype=F64)
    eps_theta = eps + 0.5 * torch.randn(B, dim, generator=g, dtype=F64)
    x_t, _ = p.q_sample(x0, t, eps=eps)
    mu_q, var = ddpm_posterior_at(p, t, x_t, x0)
    a_t, ab_t = p.step_alpha(t)[:, None], p.alpha_bars[t.long()][:, None]
    mu_theta = x_t / a_t.sqrt() - (1 - a_t) / ((1 - ab_t).sqrt() * a_t.sqrt()) * eps_theta
    std = var.sqrt().expand(B, dim)
    kl = kl_divergence(Independent(Normal(mu_q, std), 1), Independent(Normal(mu_theta, std), 1))
    sq = ((eps - eps_theta) ** 2).sum(1)
    w = (1 - a_t[:, 0]) ** 2 / (2 * a_t[:, 0] * (1 - ab_t[:, 0]))
    spectral = var[:, 0]                                            # ||sigma_t^2 I||_2 = sigma_t^2
    printed = torch.stack([((mu_q - mu_theta) ** 2).sum(1) / (2 * spectral ** 2), w / spectral ** 2 * sq])
    corrected = torch.stack([((mu_q - mu_theta) ** 2).sum(1) / (2 * spectral), w / spectral * sq])
    both = torch.stack([kl, kl])
    return erratum(identity(printed, both, rtol=1e-9), identity(corrected, both, rtol=1e-9), data=POINTWISE)


# ---- notation map and consistency parameterisations ---------------------------------------------------------
@register("basics.notation_diffusers", "DDPM alpha_bar table = diffusers alphas_cumprod (t = timestep + 1)",
          "handbook Sec. 2.2.1 (Demystify notations)")
def notation_diffusers():
    """Our float64 DDPM schedules against diffusers' float32 DDPMScheduler tables, in log space.

    diffusers builds betas and their cumulative product in float32: each of the t factors adds at most
    one float32 rounding, so |log ab_ours - log ab_diffusers| <= 2 t 2^-24; the check uses that bound.
    The notation map (DDPM ab = DDIM alpha = LCM alpha^2, EDM sigma^2 = (1-ab)/ab) is checked in float64.
    """
    from diffusers import DDPMScheduler
    t = torch.arange(1, 1001, dtype=F64)
    lhs, rhs, tols = [], [], []
    for sched, kw in (("linear", {}), ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
                      ("squaredcos_cap_v2", {})):
        s = DDPMScheduler(num_train_timesteps=1000, beta_schedule=sched, **kw)
        p = DDPM.from_diffusers_config(s.config)
        lhs.append(torch.log(mutate(p.alpha_bar(t), p.step_alpha(t))))   # counterfactual: alpha for alpha_bar
        rhs.append(torch.log(s.alphas_cumprod.to(F64)))
        tols.append(2 * t * 2.0 ** -24)
        ab = p.alpha_bar(t)
        notation = torch.stack([p.alpha(t) ** 2, p.edm_sigma(t) ** 2 * ab + ab]) - torch.stack([ab, torch.ones_like(ab)])
        if notation.abs().max() > 1e-12:
            return identity(notation, torch.zeros_like(notation))
    z = (torch.cat(lhs) - torch.cat(rhs)).abs() / torch.cat(tols)
    res = identity(torch.cat(lhs), torch.cat(rhs), rtol=0.0, atol=float(torch.cat(tols).max()))
    res.passed = bool(z.max() <= 1.0)
    res.details["max_err_over_float32_bound"] = float(z.max())
    return res


@register("basics.consistency_boundary", "Consistency parameterisations satisfy f(x, t_min) = x; TrigFlow f = E[x0|x_t]",
          "handbook Eq. 19, 38", dims=DIMS)
def consistency_boundary(dim):
    """Eq. 19 at t = eps gives f = x for any network output, Eq. 38 at t = 0 likewise; and Eq. 38 with the
    exact TrigFlow velocity returns the exact posterior mean. That velocity comes from the autograd score
    through the unified formula (Sec. 2.7), and the posterior mean from Gaussian conditioning, so the last
    part is two independent routes, not a round trip through ``conversions``."""
    proc = TrigFlow(0.5)
    dist, what = exact_data(dim, proc)
    _, _, x_t, t = noisy_batch(dist, proc, [0.1, 0.5, 0.9, 1.3, 1.55], seed=130)
    a, s = proc.coefficients(t, x_t)
    da, ds = (c.reshape(-1, *[1] * (x_t.ndim - 1)) for c in (proc.d_alpha(t), proc.d_sigma(t)))
    velocity = cv.velocity_from_score(x_t, autograd_score(dist, x_t, t), a, s, da, ds)
    F = mutate(velocity, -velocity) / proc.sigma_data           # counterfactual: the velocity's sign
    f_exact = cv.trigflow_f(x_t, t, F, proc.sigma_data)
    x = torch.randn(x_t.shape, generator=_gen(131), dtype=F64)
    f_cm = cv.consistency_f(x, torch.randn_like(x), torch.full((len(x),), 0.002, dtype=F64))
    f_trig0 = cv.trigflow_f(x, torch.zeros(len(x), dtype=F64), torch.randn_like(x), 0.5)
    return identity(torch.stack([f_exact, f_cm, f_trig0]), torch.stack([dist.posterior_mean(x_t, t), x, x]),
                    rtol=1e-10, data=what)


# ---- Sec. 2.2.2: the score-matching loss as a weighted eps regression --------------------------------------------
@register("basics.sm_loss_weight", "L_SM as an eps regression has the weight w(t)/(1 - ab_t)",
          "handbook Sec. 2.2.2 (L_SM, last line)", dims=DIMS,
          printed="L_SM = E[ w(t)/sqrt(1 - ab_t) ||eps_theta(x_t, t) - eps||^2 ]  (by Eq. 6)",
          corrected="L_SM = E[ w(t)/(1 - ab_t) ||eps_theta(x_t, t) - eps||^2 ]: the line above is "
                    "||-(x_t - sqrt(ab_t) x0)/(1 - ab_t) + eps_theta/sqrt(1 - ab_t)||^2 "
                    "= ||eps_theta - eps||^2/(1 - ab_t)")
def sm_loss_weight(dim):
    """Per sample, the handbook's previous line (its integrand with Eq. 17-18 substituted) against the printed and
    the corrected last line; w(t) = sigma_t^2 (the handbook's example), eps_theta the exact E[eps | x_t] of the data."""
    p = DDPM(1000)
    dist, what = exact_data(dim, p)
    x0, eps, x_t, t = noisy_batch(dist, p, DDPM_TIMES, seed=140)
    eps_theta = dist.predict("eps", x_t, t)
    ab = p.alpha_bar(t, x_t).reshape(-1, *[1] * (x_t.ndim - 1))
    w = (1 - ab).reshape(-1)                                        # w(t) = sigma_t^2
    flat = lambda v: v.reshape(v.shape[0], -1)  # noqa: E731
    previous = w * (flat(-(x_t - ab.sqrt() * x0) / (1 - ab) + eps_theta / (1 - ab).sqrt()) ** 2).sum(1)
    sq = (flat(eps_theta - eps) ** 2).sum(1)
    ab1 = ab.reshape(-1)
    return erratum(identity(w / (1 - ab1).sqrt() * sq, previous, rtol=1e-10),
                   identity(w / (1 - ab1) * sq, previous, rtol=1e-10), data=what)
