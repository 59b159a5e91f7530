"""Prediction conversions: round trips for every pair, closed forms written here, diffusers conventions."""

import numpy as np
import pytest
import torch

from dstar_edu.conversions import PREDICTIONS, convert
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- independent closed forms of alpha, sigma and their derivatives (numpy only) --------------------------
def _ddpm_linear_betas(T=1000):
    return np.linspace(1e-4, 0.02, T)


def closed(name, t):
    """(alpha, sigma, d alpha/dt, d sigma/dt) as float64 numpy arrays."""
    t = np.asarray(t, dtype=np.float64)
    if name == "ddpm":  # log ab linear on each step, slope log(1 - beta_ceil(t)) (t non-integer here)
        b = _ddpm_linear_betas()
        tab = np.concatenate([[0.0], np.cumsum(np.log1p(-b))])
        lo = np.clip(np.ceil(t) - 1, 0, 999).astype(int)
        lab = tab[lo] + (t - lo) * (tab[lo + 1] - tab[lo])
        dlab = np.log1p(-b[lo])
    elif name == "vp":
        lab = -(0.1 * t + 19.9 * t ** 2 / 2)
        dlab = -(0.1 + 19.9 * t)
    elif name == "vp_cosine":
        c = np.pi / 2 / 1.008
        lab = 2 * (np.log(np.cos((t + 0.008) * c)) - np.log(np.cos(0.008 * c)))
        dlab = -2 * c * np.tan((t + 0.008) * c)
    elif name == "ve":
        return np.ones_like(t), t.copy(), np.zeros_like(t), np.ones_like(t)
    elif name == "rf":
        return 1 - t, t.copy(), -np.ones_like(t), np.ones_like(t)
    elif name == "trigflow":
        return np.cos(t), 0.5 * np.sin(t), -np.sin(t), 0.5 * np.cos(t)
    else:
        raise KeyError(name)
    ab = np.exp(lab)
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    return a, s, 0.5 * dlab * a, -0.5 * ab * dlab / s


PROCS = {
    "ddpm": (lambda: DDPM(1000), [3.3, 40.5, 250.7, 600.2]),
    "vp": (lambda: VP(), [0.02, 0.2, 0.5, 0.9]),
    "vp_cosine": (lambda: VP("cosine"), [0.05, 0.3, 0.6, 0.9]),
    "ve": (lambda: VE(80.0), [0.05, 0.7, 5.0, 40.0]),
    "rf": (lambda: RectifiedFlow(), [0.05, 0.3, 0.6, 0.9]),
    "trigflow": (lambda: TrigFlow(0.5), [0.1, 0.5, 1.0, 1.4]),
}


def preds_for(name):
    return [p for p in PREDICTIONS if p != "trigflow_F" or name == "trigflow"]


def col(v, x):
    return torch.as_tensor(v, dtype=F64).reshape(-1, *[1] * (x.ndim - 1))


def make_case(name, shape, scalar_t, seed=0):
    """x0, eps, x_t and the closed-form coefficients for one process; t scalar or one per batch element."""
    factory, ts = PROCS[name]
    p = factory()
    g = gen(seed)
    B = len(ts)
    x0 = torch.randn(B, *shape, generator=g, dtype=F64)
    eps = torch.randn(B, *shape, generator=g, dtype=F64)
    t = ts[1] if scalar_t else torch.tensor(ts, dtype=F64)
    tt = np.full(B, ts[1]) if scalar_t else np.asarray(ts)
    a, s, da, ds = (col(v, x0) for v in closed(name, tt))
    x_t = a * x0 + s * eps
    return p, x0, eps, x_t, t, a, s, da, ds


def expected(target, x0, eps, x_t, a, s, da, ds, name):
    """The definition of each prediction, written from the handbook (Sec. 2.6-2.7, Eq. 18, 19, 30, 38)."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "score":
        return -eps / s
    if target == "velocity":
        return da * x0 + ds * eps
    if target in ("v", "v_bar"):
        v = (s * x0 - a * eps) / torch.sqrt(a * a + s * s)
        return v if target == "v" else -v
    if target == "instaflow_v":
        return x0 - eps
    if target == "trigflow_F":   # x_t = cos t x0 + sin t z, z = sd eps: sd F = dx/dt = -sin t x0 + cos t z
        sd = 0.5
        sin_t, cos_t = s / sd, a
        return (-sin_t * x0 + cos_t * sd * eps) / sd
    if target == "cm_f":         # Eq. 19 at the EDM noise level sig = sigma/alpha, sigma_d = 0.5, eps = 0.002
        sig = s / a
        c_skip = 0.25 / ((sig - 0.002) ** 2 + 0.25)
        c_out = 0.5 * (sig - 0.002) / torch.sqrt(sig ** 2 + 0.25)
        return c_skip * x_t + c_out * x0
    raise KeyError(target)


# Round-off budget: each conversion is an affine map in (x_t, value) whose coefficients are at most
# K ~ max(1/alpha, 1/sigma, |sigma'|/|det|, ...) <= ~1e3 at these interior times, so a round trip loses
# at most ~100 K eps64 ~ 2e-11 relative to the largest quantity involved; rtol 1e-9 leaves margin but is
# still 7 orders below any formula error (which would be O(1)).
RTOL = 1e-9


def _close(got, want, scale):
    err = (got - want).abs().max().item()
    assert err <= RTOL * scale, f"max err {err:.3g} > {RTOL * scale:.3g}"


@pytest.mark.parametrize("name, source", [(n, src) for n in PROCS for src in preds_for(n)])
def test_round_trip_every_pair(name, source):
    p, x0, eps, x_t, t, a, s, da, ds = make_case(name, (2,), scalar_t=False, seed=1)
    value = torch.randn(x_t.shape, generator=gen(2), dtype=F64)   # an arbitrary prediction, not an exact one
    scale = max(value.abs().max().item(), x_t.abs().max().item())
    for target in preds_for(name):
        mid = convert(value, source, target, x_t, t, p)
        back = convert(mid, target, source, x_t, t, p)
        _close(back, value, scale * max(1.0, mid.abs().max().item() / scale))


@pytest.mark.parametrize("name", list(PROCS))
@pytest.mark.parametrize("shape", [(2,), (3, 32, 32)], ids=["2d", "3x32x32"])
@pytest.mark.parametrize("scalar_t", [True, False], ids=["scalar_t", "batch_t"])
def test_closed_forms(name, shape, scalar_t):
    p, x0, eps, x_t, t, a, s, da, ds = make_case(name, shape, scalar_t, seed=3)
    preds = preds_for(name)
    want = {k: expected(k, x0, eps, x_t, a, s, da, ds, name) for k in preds}
    for source in ("x0", "eps"):
        for target in preds:
            got = convert(want[source], source, target, x_t, t, p)
            _close(got, want[target], max(1.0, want[target].abs().max().item(), x_t.abs().max().item()))
    # and back: every closed-form prediction converts to the true x0 and eps
    for source in preds:
        for target in ("x0", "eps"):
            got = convert(want[source], source, target, x_t, t, p)
            _close(got, want[target], max(1.0, want[source].abs().max().item(), x_t.abs().max().item()))


def test_score_is_minus_eps_over_sigma_ve():
    """A plain numeric instance: VE at t = 2, eps = 1 -> score = -0.5; x0 = x_t - 2 eps."""
    p = VE(80.0)
    x_t = torch.tensor([[3.0, -1.0]], dtype=F64)
    eps = torch.tensor([[1.0, 0.5]], dtype=F64)
    torch.testing.assert_close(convert(eps, "eps", "score", x_t, 2.0, p), torch.tensor([[-0.5, -0.25]], dtype=F64))
    torch.testing.assert_close(convert(eps, "eps", "x0", x_t, 2.0, p), torch.tensor([[1.0, -2.0]], dtype=F64))


@pytest.mark.parametrize("shape", [(2,), (3, 32, 32)], ids=["2d", "3x32x32"])
def test_v_bar_is_diffusers_v_prediction(shape):
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    p = DDPM.from_diffusers_config(sched)
    timesteps = torch.tensor([0, 9, 249, 624, 998])
    B = len(timesteps)
    g = gen(4)
    x0 = torch.randn(B, *shape, generator=g, dtype=F64)
    eps = torch.randn(B, *shape, generator=g, dtype=F64)
    t = timesteps.to(F64) + 1                                # handbook t = diffusers timestep + 1
    x_t, _ = p.q_sample(x0, t, eps=eps)
    ours = convert(eps, "eps", "v_bar", x_t, t, p)
    theirs = sched.get_velocity(x0, eps, timesteps)
    # diffusers' alphas_cumprod is float32: relative error delta_t <= 2^-24 sum_{i<=t}(2 + 4 b_i/(1-b_i))
    # (see test_process.py); sqrt(ab) moves by <= sqrt(ab) delta/2 and sqrt(1-ab) by <= ab delta/(2 sqrt(1-ab)).
    b = p.betas.numpy()
    delta = torch.tensor(2.0 ** -24 * np.cumsum(2 + 4 * b / (1 - b)))[timesteps]
    ab = col(p.alpha_bar(t), x0)
    d = col(delta, x0)
    tol = 1.01 * (ab.sqrt() * d / 2 * eps.abs() + ab * d / (2 * (1 - ab).sqrt()) * x0.abs()) + 1e-14
    assert ((ours - theirs).abs() <= tol).all(), ((ours - theirs).abs() / tol).max()
    # the test can fail: the off-by-one reading (handbook t = timestep) breaks the bound
    a_w, s_w = col(p.alpha(t - 1), x0), col(p.sigma(t - 1), x0)
    wrong = a_w * eps - s_w * x0
    assert ((wrong - theirs).abs() > tol).any()


def test_rectified_flow_velocity_is_flowmatch_target_and_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    p = RectifiedFlow()
    g = gen(5)
    x0 = torch.randn(2, 3, 32, 32, generator=g, dtype=F64)
    eps = torch.randn(2, 3, 32, 32, generator=g, dtype=F64)
    i = 3
    ts, sig, sig_next = sched.timesteps[i], float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    # diffusers' forward process x = sigma eps + (1 - sigma) x0 equals ours at t = sigma
    x_t, _ = p.q_sample(x0, sig, eps=eps)
    x_diff = sched.scale_noise(x0, ts.reshape(1).expand(2), eps)
    torch.testing.assert_close(x_t, x_diff, rtol=1e-14, atol=1e-14)     # same float64 arithmetic up to order
    vel = convert(eps, "eps", "velocity", x_t, sig, p)
    torch.testing.assert_close(vel, eps - x0, rtol=0, atol=1e-12)      # FlowMatch training target noise - x0
    # an Euler step of diffusers' scheduler with our velocity lands on the same straight line at sigma_next
    out = sched.step(vel.float(), ts, x_t.float()).prev_sample
    ref, _ = p.q_sample(x0, sig_next, eps=eps)
    # float32 arithmetic in the scheduler: |x| <= ~6, so a few float32 ulps: 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_source_equals_target_returns_value():
    p, x0, eps, x_t, t, *_ = make_case("vp", (2,), scalar_t=True)
    assert convert(eps, "eps", "eps", x_t, t, p) is eps
