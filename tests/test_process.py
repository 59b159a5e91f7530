"""Forward processes: alpha/sigma against closed forms written here, derivatives against finite
differences, the diffusers DDPM tables, EDM noise levels, and Monte-Carlo statistics of q_sample."""
import math

import numpy as np
import pytest
import torch

from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow

F64 = torch.float64
EPS64 = float(np.finfo(np.float64).eps)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- independent closed forms (numpy / math only, no library code) ---------------------------------
def np_ddpm_betas(T, schedule, beta_start=1e-4, beta_end=0.02, s=0.008):
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, T)
    if schedule == "scaled_linear":
        return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T) ** 2
    # Nichol & Dhariwal: beta_i = min(1 - f(i/T) / f((i-1)/T), 0.999), f(u) = cos^2((u+s)/(1+s) pi/2)
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(1, T + 1)
    return np.minimum(1 - f(i / T) / f((i - 1) / T), 0.999)


def np_ddpm_alpha_bar_table(betas):
    """alpha_bar_t for t = 0..T as a plain cumulative product of (1 - beta)."""
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


def np_ddpm_alpha_bar(betas, t):
    """Handbook DDPM alpha_bar at real t: log alpha_bar linear between integers (class docstring)."""
    tab = np.log(np_ddpm_alpha_bar_table(betas))
    t = np.asarray(t, dtype=np.float64)
    lo = np.clip(np.ceil(t) - 1, 0, len(betas) - 1).astype(int)
    frac = t - lo
    return np.exp(tab[lo] + frac * (tab[lo + 1] - tab[lo]))


def np_vp_alpha_bar(schedule, t, b0=0.1, b1=20.0, s=0.008):
    t = np.asarray(t, dtype=np.float64)
    if schedule == "linear":
        return np.exp(-(b0 * t + (b1 - b0) * t ** 2 / 2))
    return np.cos((t + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2


def closed_alpha_sigma(name, t):
    """(alpha, sigma) in float64 numpy for the processes built by ``make(name)``."""
    t = np.asarray(t, dtype=np.float64)
    if name.startswith("ddpm_"):
        ab = np_ddpm_alpha_bar(np_ddpm_betas(1000, name[5:], **DDPM_KW[name[5:]]), t)
        return np.sqrt(ab), np.sqrt(1 - ab)
    if name.startswith("vp_"):
        ab = np_vp_alpha_bar(name[3:], t)
        return np.sqrt(ab), np.sqrt(1 - ab)
    if name == "ve":
        return np.ones_like(t), t.copy()
    if name == "rf":
        return 1 - t, t.copy()
    if name == "trigflow":
        return np.cos(t), 0.5 * np.sin(t)
    raise KeyError(name)


DDPM_KW = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}}


def make(name):
    if name.startswith("ddpm_"):
        return DDPM(1000, name[5:], **DDPM_KW[name[5:]])
    if name.startswith("vp_"):
        return VP(name[3:])
    return {"ve": VE(80.0), "rf": RectifiedFlow(), "trigflow": TrigFlow(0.5)}[name]


# interior times of each process, chosen inside one DDPM step (frac in [0.3, 0.7]) so that the
# finite-difference stencils below never straddle an integer (where the DDPM slope jumps)
TIMES = {
    "ddpm_linear": [1.5, 10.4, 250.6, 600.3, 999.5],
    "ddpm_scaled_linear": [1.5, 10.4, 250.6, 600.3, 999.5],
    "ddpm_cosine": [1.5, 10.4, 250.6, 600.3, 998.5],
    "vp_linear": [0.05, 0.3, 0.6, 0.95],
    "vp_cosine": [0.05, 0.3, 0.6, 0.95],
    "ve": [0.5, 3.0, 40.0, 79.0],
    "rf": [0.1, 0.5, 0.9],
    "trigflow": [0.1, 0.8, 1.5],
}
NAMES = list(TIMES)
VP_NAMES = [n for n in NAMES if n.startswith(("ddpm_", "vp_"))]


@pytest.mark.parametrize("name", NAMES)
def test_alpha_sigma_closed_forms(name):
    p = make(name)
    t = torch.tensor(TIMES[name], dtype=F64)
    a_ref, s_ref = closed_alpha_sigma(name, t.numpy())
    # float64 on both sides; the DDPM table is a cumsum of log1p vs a cumprod: 1000 roundings of
    # relative size eps64 each, so relative agreement to 1e-11 (= 45000 eps64) is a generous bound
    np.testing.assert_allclose(p.alpha(t).numpy(), a_ref, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(p.sigma(t).numpy(), s_ref, rtol=1e-11, atol=1e-14)
    # general alpha_bar = alpha^2 / (alpha^2 + sigma^2)
    np.testing.assert_allclose(p.alpha_bar(t).numpy(), a_ref ** 2 / (a_ref ** 2 + s_ref ** 2), rtol=1e-11)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_ddpm_integer_table_and_step_alpha(schedule):
    p = DDPM(1000, schedule, **DDPM_KW[schedule])
    betas = np_ddpm_betas(1000, schedule, **DDPM_KW[schedule])
    table = np_ddpm_alpha_bar_table(betas)
    t = torch.arange(0, 1001, dtype=F64)
    # cumulative products: relative error <= 1000 roundings of eps64 on either side -> 1e-11
    np.testing.assert_allclose(p.alpha_bar(t).numpy(), table, rtol=1e-11)
    np.testing.assert_allclose(p.alpha_bars.numpy(), table, rtol=1e-11)
    # cosine betas are 1 - f_i/f_{i-1} with f_i/f_{i-1} ~ 1: cancellation leaves an absolute error of a
    # few eps64 (not a relative one), hence atol = 4 eps64
    np.testing.assert_allclose(p.betas.numpy(), betas, rtol=1e-12, atol=4 * EPS64)
    ti = torch.tensor([1.0, 2.0, 500.0, 1000.0], dtype=F64)
    np.testing.assert_allclose(p.step_alpha(ti).numpy(), 1 - betas[[0, 1, 499, 999]], rtol=1e-13)


@pytest.mark.parametrize("name", VP_NAMES)
def test_variance_preserving(name):
    p = make(name)
    t = torch.tensor([0.0] + TIMES[name], dtype=F64)
    a, s = p.alpha(t), p.sigma(t)
    # exp(l) + (-expm1(l)) = 1 up to a few float64 roundings
    np.testing.assert_allclose((a * a + s * s).numpy(), 1.0, rtol=0, atol=8 * EPS64)
    assert float(a[0]) == 1.0 and float(s[0]) == 0.0


def _fd_check(f, df, t, h):
    """Central difference of f vs df at float64 points t, with an explicit error bound.

    |(f(t+h) - f(t-h)) / 2h - f'(t)| <= h^2/6 max|f'''| + (rounding of f: 2 eps |f| / 2h)
    + (rounding of t +- h: eps |t| |f'| / h). max|f'''| is estimated by a coarse 4-point third-difference
    stencil (k = 1e-3) and given a factor 2 for its own error and the variation over [t-h, t+h].
    """
    fd = (f(t + h) - f(t - h)) / (2 * h)
    k = 1e-3
    f3 = (f(t + 2 * k) - 2 * f(t + k) + 2 * f(t - k) - f(t - 2 * k)) / (2 * k ** 3)
    d = df(t)
    bound = 2 * (h ** 2 / 6) * f3.abs() + 4 * EPS64 * (f(t).abs() + t.abs() * d.abs()) / h + 1e-15
    err = (fd - d).abs()
    assert (err <= bound).all(), f"FD mismatch: err {err.tolist()} > bound {bound.tolist()}"
    return err, bound


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_vs_central_differences(name):
    p = make(name)
    t = torch.tensor(TIMES[name], dtype=F64)
    h = 1e-5
    _fd_check(p.alpha, p.d_alpha, t, h)
    _fd_check(p.sigma, p.d_sigma, t, h)
    # the bound is informative: it is below 1e-7 relative to the derivative at these times
    _, bound = _fd_check(p.sigma, p.d_sigma, t, h)
    assert (bound <= 1e-7 * (p.d_sigma(t).abs() + 1)).all()


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine"])
def test_vp_beta_closed_form(name):
    p = make(name)
    t = torch.tensor(TIMES[name], dtype=F64)
    tn = t.numpy()
    if name == "vp_linear":
        ref = 0.1 + tn * (20.0 - 0.1)
    else:  # beta = -d log ab / dt = pi/(1+s) tan((t+s)/(1+s) pi/2)
        ref = np.pi / 1.008 * np.tan((tn + 0.008) / 1.008 * np.pi / 2)
    np.testing.assert_allclose(p.beta(t).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_derivative_at_integer_is_slope_of_step_ending_there(schedule):
    """At integer t, d log alpha_bar / dt = log(1 - beta_t), so d alpha = 0.5 log(1 - beta_t) alpha."""
    p = DDPM(1000, schedule)
    betas = np_ddpm_betas(1000, schedule)
    ti = np.array([1, 7, 300, 1000])
    t = torch.tensor(ti, dtype=F64)
    a_ref, s_ref = closed_alpha_sigma(f"ddpm_{schedule}", ti)
    dlog = np.log1p(-betas[ti - 1])
    np.testing.assert_allclose(p.d_alpha(t).numpy(), 0.5 * dlog * a_ref, rtol=1e-11)
    np.testing.assert_allclose(p.d_sigma(t).numpy(), -0.5 * a_ref ** 2 * dlog / s_ref, rtol=1e-11)


@pytest.mark.parametrize("schedule, kw", [("linear", {}), ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
                                          ("squaredcos_cap_v2", {})])
def test_ddpm_from_diffusers_config(schedule, kw):
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, **kw)
    p = DDPM.from_diffusers_config(sched.config)
    assert p.T == 1000
    timesteps = np.arange(1000)
    ours = p.alpha_bar(torch.tensor(timesteps + 1, dtype=F64)).numpy()   # handbook t = timestep + 1
    theirs = sched.alphas_cumprod.double().numpy()
    # diffusers works in float32: per step, beta is rounded (relative 2^-24 of beta; <= 4 ulps through
    # linspace/square, i.e. relative 4 * 2^-24 beta/(1-beta) in alpha), 1 - beta is rounded (2^-24) and
    # the running product is rounded (2^-24): |log ab_ours - log ab_diffusers| <= 2^-24 sum_i (2 + 4 b_i/(1-b_i)).
    b = p.betas.numpy()
    bound = 2.0 ** -24 * np.cumsum(2 + 4 * b / (1 - b))
    err = np.abs(np.log(ours) - np.log(theirs))
    assert (err <= bound).all(), float((err / bound).max())
    # the test can fail: with the off-by-one map (handbook t = timestep) the error exceeds the bound
    # at every timestep up to 500, since |log(1 - beta_t)| >= 1e-4 > bound there
    shifted = p.alpha_bar(torch.tensor(timesteps, dtype=F64)).numpy()
    assert (np.abs(np.log(shifted) - np.log(theirs))[:500] > bound[:500]).all()


def test_edm_sigma_stable_diffusion():
    """Stable Diffusion (scaled_linear 0.00085..0.012): EDM sigma = sqrt((1 - ab)/ab) at t = 626 and 400."""
    p = DDPM(1000, "scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ab = np.cumprod(1 - betas)                   # ab[k] = alpha_bar at handbook t = k + 1
    expected = np.sqrt((1 - ab[[625, 399]]) / ab[[625, 399]])
    got = p.edm_sigma(torch.tensor([626.0, 400.0], dtype=F64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-11)   # float64 cumulative product, see above
    assert abs(got[0] - 2.5) < 0.05 and abs(got[1] - 1.16) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_edm_sigma_is_sigma_over_alpha(name):
    p = make(name)
    t = torch.tensor(TIMES[name], dtype=F64)
    tn = t.numpy()
    ref = {"ve": tn, "rf": tn / (1 - tn), "trigflow": 0.5 * np.tan(tn)}.get(name)
    if ref is None:
        a, s = closed_alpha_sigma(name, tn)
        ref = np.sqrt((1 - a ** 2) / a ** 2)
    np.testing.assert_allclose(p.edm_sigma(t).numpy(), ref, rtol=1e-10)


QS_TIMES = {"ddpm_linear": 300.0, "ddpm_cosine": 700.0, "vp_linear": 0.5, "vp_cosine": 0.3, "ve": 3.0, "rf": 0.4,
            "trigflow": 1.0}


@pytest.mark.parametrize("name", list(QS_TIMES))
def test_q_sample_statistics_2d(name):
    p = make(name)
    t = QS_TIMES[name]
    a, s = (float(v) for v in closed_alpha_sigma(name, t))
    n = 100_000
    x0 = torch.tensor([1.0, -2.0], dtype=F64).expand(n, 2)
    x_t, eps = p.q_sample(x0, t, generator=gen(1))
    # deterministic part: x_t = a x0 + s eps with the returned eps (float64, a few roundings)
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=1e-12, atol=1e-12)
    mean, var = x_t.mean(0), x_t.var(0)
    # x_t ~ N(a x0, s^2): mean s.e. s/sqrt(n), variance s.e. s^2 sqrt(2/(n-1)); 5-sigma bounds
    assert ((mean - a * x0[0]).abs() <= 5 * s / math.sqrt(n)).all(), (mean, a * x0[0])
    assert ((var - s * s).abs() <= 5 * s * s * math.sqrt(2 / (n - 1))).all(), (var, s * s)


def test_q_sample_statistics_images_with_batch_times():
    """3x32x32 images, one time per batch element; pooled standardised residuals are N(0, 1)."""
    p = DDPM(1000)
    B = 16
    x0 = torch.randn(3, 32, 32, generator=gen(2), dtype=F64).expand(B, 3, 32, 32)
    ts = np.linspace(5, 995, B)
    a, s = closed_alpha_sigma("ddpm_linear", ts)
    x_t, _ = p.q_sample(x0, torch.tensor(ts, dtype=F64), generator=gen(3))
    a_t, s_t = (torch.tensor(v).reshape(B, 1, 1, 1) for v in (a, s))
    r = ((x_t - a_t * x0) / s_t).flatten()
    N = r.numel()
    assert abs(r.mean().item()) <= 5 / math.sqrt(N)
    assert abs((r * r).mean().item() - 1) <= 5 * math.sqrt(2 / N)
    # a wrong per-element coefficient would show up per row: each row's mean square is 1 within 5 s.e.
    ms = ((x_t - a_t * x0) / s_t).pow(2).flatten(1).mean(1)
    assert ((ms - 1).abs() <= 5 * math.sqrt(2 / 3072)).all()


def test_q_sample_seed_reproducible_and_explicit_eps():
    p = VP()
    x0 = torch.randn(4, 3, 32, 32, generator=gen(4))
    a1, e1 = p.q_sample(x0, 0.3, generator=gen(7))
    a2, e2 = p.q_sample(x0, 0.3, generator=gen(7))
    a3, _ = p.q_sample(x0, 0.3, generator=gen(8))
    assert torch.equal(a1, a2) and torch.equal(e1, e2)
    assert (a1 - a3).abs().max() > 0.1
    # the same eps passed explicitly gives the same sample
    a4, e4 = p.q_sample(x0, 0.3, eps=e1)
    assert torch.equal(a4, a1) and e4 is e1


@pytest.mark.parametrize("name, std", [("ddpm_linear", 1.0), ("vp_linear", 1.0), ("ve", 80.0), ("rf", 1.0),
                                       ("trigflow", 0.5)])
def test_prior_sample_std(name, std):
    p = make(name)
    n = 200_000
    x = p.prior_sample((n,), generator=gen(5), dtype=F64)
    # sample std s.e. ~ std / sqrt(2 n), mean s.e. std / sqrt(n); 5-sigma
    assert abs(x.std().item() - std) <= 5 * std / math.sqrt(2 * n)
    assert abs(x.mean().item()) <= 5 * std / math.sqrt(n)
    assert torch.equal(x, p.prior_sample((n,), generator=gen(5), dtype=F64))


# ---- regressions of fixed library bugs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trigflow", "vp_cosine"])
def test_t_max_accepted_for_float32_data(name):
    p = make(name)
    x0 = torch.randn(8, 2, generator=gen(6))
    eps = torch.randn(8, 2, generator=gen(7))
    x_t, _ = p.q_sample(x0, p.t_max, eps=eps)
    a, s = (float(v) for v in closed_alpha_sigma(name, p.t_max))
    # float32 arithmetic: a few ulps of max|x|
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=0, atol=1e-5)


def test_ddpm_sigma_at_zero_is_positive_zero_and_increasing():
    p = DDPM(1000)
    h = 1e-8
    one_sided = (p.sigma(h) - p.sigma(0.0)) / h       # > 0: sigma grows like sqrt(t) from 0
    assert one_sided > 0
    assert not torch.signbit(p.sigma(0.0))
    assert p.d_sigma(0.0) == math.inf                   # same as VP().d_sigma(0.0)


@pytest.mark.parametrize("proc", [DDPM(1000), DDPM(1000, "cosine"), VP(), VP("cosine"), VE(80.0), RectifiedFlow(),
                                  TrigFlow(0.5)], ids=lambda p: repr(p))
def test_t_from_edm_sigma_inverts_edm_sigma(proc):
    """Each process's closed-form inverse of sigma(t)/alpha(t): edm_sigma(t_from_edm_sigma(s)) == s (float64)."""
    s = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.5, 10.0, 50.0], dtype=torch.float64)
    t = proc.t_from_edm_sigma(s)
    torch.testing.assert_close(proc.edm_sigma(t), s, rtol=1e-9, atol=0.0)
    with pytest.raises(ValueError, match="s must be non-negative"):
        proc.t_from_edm_sigma(-1.0)
