"""Exact at both ends of every time domain, finite inside, whatever CPU kernels torch picks (issue 8 item 2).

Property tests (``hypothesis``) over the whole domain including the end points and their neighbouring floats
(``math.nextafter``), for every process and schedule, with 0-d and batched ``t``, float32 and float64 ``x``;
then conversions and the samplers' first/last steps at the ends. References are independent: ``math``-module
closed forms (float64, scalar libm) and hand-derived end values.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dstar_edu.conversions import convert
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow
from dstar_edu.samplers.diffusion import ddim
from toy_data.mixtures import GaussianMixture

F64, F32 = torch.float64, torch.float32
SET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

PROCS = {
    "ddpm_linear": lambda: DDPM(1000), "ddpm_scaled_linear": lambda: DDPM(1000, "scaled_linear"),
    "ddpm_cosine": lambda: DDPM(1000, "cosine"), "ddpm_custom": lambda: DDPM(betas=[0.1, 0.25, 0.5, 0.9]),
    "vp_linear": lambda: VP(), "vp_cosine": lambda: VP("cosine"), "ve": lambda: VE(80.0),
    "rf": lambda: RectifiedFlow(), "trigflow": lambda: TrigFlow(0.5),
}
IDS = list(PROCS)


def ref_alpha_sigma(p, t: float) -> tuple[float, float]:
    """Independent float64 reference with the math module (scalar libm), written from the definitions."""
    if isinstance(p, DDPM):
        k = min(max(math.ceil(t) - 1, 0), p.T - 1)
        logs = [math.log1p(-float(b)) for b in p.betas]
        lo = math.fsum(logs[:k])
        lab = lo + (t - k) * logs[k]
        return math.exp(0.5 * lab), math.sqrt(-math.expm1(lab))
    if isinstance(p, VP):
        if p.schedule == "linear":
            lab = -(p.beta_min * t + 0.5 * (p.beta_max - p.beta_min) * t * t)
        else:
            c = math.pi / (2 * (1 + p.s))
            lab = 2 * (math.log(math.cos((t + p.s) * c)) - math.log(math.cos(p.s * c)))
        lab = min(lab, 0.0)
        return math.exp(0.5 * lab), math.sqrt(-math.expm1(lab))
    if isinstance(p, VE):
        return 1.0, t
    if isinstance(p, RectifiedFlow):
        return 1.0 - t, t
    return math.cos(t), p.sigma_data * math.sin(t)


def domain_times(p):
    """Floats over the whole domain, weighted towards the ends and their neighbouring floats."""
    lo, hi = p.t_min, p.t_max
    ends = [lo, math.nextafter(lo, math.inf), math.nextafter(math.nextafter(lo, math.inf), math.inf),
            math.nextafter(hi, -math.inf), hi, 1e-300, 1e-12]
    return st.one_of(st.sampled_from([e for e in ends if lo <= e <= hi]),
                     st.floats(lo, hi, allow_nan=False, allow_infinity=False))


# ---- exact end values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("batched", [False, True], ids=["0d", "batched"])
def test_exact_at_t_min(name, dtype, batched):
    p = PROCS[name]()
    x = torch.zeros(3, 2, dtype=dtype)
    t = torch.full((3,), p.t_min, dtype=F64) if batched else p.t_min
    assert (p.alpha(t, x) == 1).all() and (p.sigma(t, x) == 0).all() and (p.alpha_bar(t, x) == 1).all()
    assert (p.edm_sigma(t, x) == 0).all()
    a, s = p.coefficients(t, x)
    assert (a == 1).all() and (s == 0).all() and a.dtype == dtype


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("batched", [False, True], ids=["0d", "batched"])
def test_exact_at_t_max(name, dtype, batched):
    """RF: (alpha, sigma) = (0, 1); TrigFlow: (0, sigma_d) (cos(pi/2) in float64 is 6e-17, not 0); VE: (1, t_max);
    VP/DDPM: the float64 reference rounded once to the dtype (alpha > 0 there)."""
    p = PROCS[name]()
    x = torch.zeros(3, 2, dtype=dtype)
    t = torch.full((3,), p.t_max, dtype=F64) if batched else p.t_max
    a, s = p.alpha(t, x), p.sigma(t, x)
    exact = {"rf": (0.0, 1.0), "trigflow": (0.0, 0.5), "ve": (1.0, 80.0)}.get(name)
    if exact is None:
        ra, rs = ref_alpha_sigma(p, p.t_max)
        # one rounding of a float64 value computed through exp/log1p/cumsum: 1e-12 relative covers the
        # float64 route (T = 1000 summed logs, ~1e-13) before the final cast
        assert torch.allclose(a.double(), torch.tensor(ra, dtype=F64), rtol=max(1e-12, torch.finfo(dtype).eps), atol=0)
        assert torch.allclose(s.double(), torch.tensor(rs, dtype=F64), rtol=max(1e-12, torch.finfo(dtype).eps), atol=0)
    else:
        assert (a == exact[0]).all() and (s == exact[1]).all()
    assert a.dtype == dtype and bool((a >= 0).all())


def test_float32_trigflow_end_is_clamped_not_negative():
    """float32(pi/2) = 1.5707964 > pi/2: accepted (one-ulp slack), clamped to the end, alpha exactly 0, not -4e-8."""
    p = TrigFlow(0.5)
    t = torch.tensor(math.pi / 2, dtype=F32)
    assert float(t) > math.pi / 2
    assert float(p.alpha(t)) == 0.0 and float(p.sigma(t)) == 0.5


@pytest.mark.parametrize("bump", [2.7e-20, 1e-16, 1e-12])
def test_vp_cosine_sigma0_survives_positive_log_alpha_bar(monkeypatch, bump):
    """Emulate a CPU whose vectorised log(cos) rounds log alpha_bar(0) to +2.7e-20 (issue 8, AMD EPYC): before the
    clamp sigma(0) = sqrt(-expm1(+tiny)) was NaN; now it is exactly 0 and alpha(0) exactly 1, inside too."""
    p = VP("cosine")
    raw = VP._log_alpha_bar
    monkeypatch.setattr(VP, "_log_alpha_bar", lambda self, t: raw(self, t) + bump)
    for t in (0.0, torch.zeros(5, dtype=F64)):
        assert (p.sigma(t) == 0).all() and (p.alpha(t) == 1).all() and (p.alpha_bar(t) == 1).all()
    s = p.sigma(torch.tensor([1e-300, 1e-20, 1e-9], dtype=F64))
    assert torch.isfinite(s).all() and (s >= 0).all()


# ---- finite and correct everywhere, scalar and vector paths ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", IDS)
def test_finite_and_correct_over_the_domain(name, dtype):
    p = PROCS[name]()
    x = torch.zeros(4, 2, dtype=dtype)
    eps = torch.finfo(dtype).eps

    @SET
    @given(t=domain_times(p), others=st.lists(domain_times(p), min_size=3, max_size=3))
    def check(t, others):
        tb = torch.tensor([t, *others], dtype=F64)               # batched (vector kernels)
        a0, s0 = p.alpha(t, x), p.sigma(t, x)                      # 0-d (scalar path)
        ab, sb = p.alpha(tb, x), p.sigma(tb, x)
        for v in (a0, s0, ab, sb, p.alpha_bar(tb, x), p.d_alpha(tb, x)):
            assert bool(torch.isfinite(v).all()) and v.dtype == dtype
        assert bool((ab >= 0).all() and (sb >= 0).all())
        ds = p.d_sigma(tb, x)
        assert bool(torch.isfinite(ds[sb > 0]).all())              # d sigma/dt = +inf only where sigma = 0
        # scalar and vector kernels may differ by an ulp per elementary function (~4 in a chain): 8 eps
        assert torch.allclose(a0, ab[0], rtol=8 * eps, atol=8 * eps)
        assert torch.allclose(s0, sb[0], rtol=8 * eps, atol=8 * eps)
        ra, rs = ref_alpha_sigma(p, t)
        scale = max(1.0, abs(p.t_max)) if name == "ve" else 1.0
        # float64: a few ulps of libm + DDPM's cumulative log table (<= 1e-12 relative); float32: one final rounding
        tol = 1e-12 if dtype == F64 else 2 * eps
        assert abs(float(a0) - ra) <= tol * (1 + abs(ra)) and abs(float(s0) - rs) <= tol * (scale + abs(rs))
    check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, F32], ids=["bf16", "f32"])
def test_ddpm_time_stays_float64(dtype):
    """With a low-precision x, coefficients are the float64 values rounded once (t is never cast): at t = T the
    bf16 grid has no 1000 +- 1 neighbours (spacing 4), and 601 would become 600."""
    p = DDPM(1000)
    x = torch.zeros(2, 2, dtype=dtype)

    @SET
    @given(t=st.one_of(st.sampled_from([0, 1, 600, 601, 998, 999, 1000]), st.integers(0, 1000),
                       st.floats(0, 1000, allow_nan=False)))
    def check(t):
        a, s = p.coefficients(t, x)
        assert a.dtype == dtype
        assert float(a) == float(p.alpha(t).to(dtype)) and float(s) == float(p.sigma(t).to(dtype))
    check()
    assert float(p.sigma(601, x)) != float(p.sigma(600, x)) or dtype == torch.bfloat16  # 601 is not moved
    assert float(p.coefficients(601, x)[1]) == float(p.sigma(601).to(dtype))


# ---- conversions and samplers at the ends ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", IDS)
def test_conversions_at_the_ends(name, dtype):
    """At t_min (alpha = 1, sigma = 0): x0 from eps is x_t itself, exactly. At t_max where alpha = 0 (RF,
    TrigFlow): eps from x0 is x_t / sigma exactly; elsewhere finite. Round trips inside are finite."""
    p = PROCS[name]()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 2, generator=g, dtype=dtype), torch.randn(4, 2, generator=g, dtype=dtype)
    assert torch.equal(convert(v, "eps", "x0", x, p.t_min, p), x)
    eps = convert(v, "x0", "eps", x, p.t_max, p)
    if name in ("rf", "trigflow"):
        assert torch.equal(eps, (x - 0.0 * v) / p.sigma(p.t_max, x))
    assert torch.isfinite(eps).all()

    @SET
    @given(t=domain_times(p))
    def check(t):
        if float(p.alpha(t)) == 0.0 or float(p.sigma(t)) == 0.0:
            return
        out = convert(convert(v, "eps", "v", x, t, p), "v", "eps", x, t, p)
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
    check()


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", IDS)
def test_sampler_first_and_last_step_at_the_ends(name, dtype):
    """One deterministic DDIM step from t_max to t_min with the exact mixture: x(t_min) = alpha(t_min) x0_hat +
    sigma(t_min) eps_hat = x0_hat exactly (1 and 0 are exact), i.e. the posterior mean at t_max."""
    p = PROCS[name]()
    teacher = GaussianMixture(torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64), 0.1, process=p)
    x = p.prior_sample((6, 2), torch.Generator().manual_seed(1), dtype=dtype)
    out = ddim(teacher, [p.t_max, p.t_min], x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, teacher.posterior_mean(x, p.t_max))


@pytest.mark.parametrize("dtype", [torch.bfloat16, F32], ids=["bf16", "f32"])
def test_callers_keep_time_float64(dtype):
    """Conversions, the forward sample, a loss and a sampler with a low-precision x at t = T, T-1, 601, 0: no
    IndexError at t >= 998 (the bf16 grid near 1000 has spacing 4), coefficients = float64 values cast once."""
    p = DDPM(1000)
    t = torch.tensor([1000.0, 999.0, 601.0, 0.0], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 2, generator=g).to(dtype), torch.randn(4, 2, generator=g).to(dtype)
    x_t, _ = p.q_sample(x, t, eps=eps)
    a, s = p.alpha(t).to(dtype)[:, None], p.sigma(t).to(dtype)[:, None]
    assert x_t.dtype == dtype and torch.equal(x_t, a * x + s * eps)
    x0 = convert(eps[:3], "eps", "x0", x_t[:3], t[:3], p)
    assert torch.equal(x0, (x_t[:3] - s[:3] * eps[:3]) / a[:3])
    from dstar_edu.objectives import denoising_loss
    from dstar_edu.predictors import MLPPredictor
    torch.manual_seed(0)
    net = MLPPredictor(p, "eps", dim=2, hidden=8, depth=1).to(dtype)
    loss = denoising_loss(net, x, t=torch.tensor([1000.0, 999.0, 601.0, 1.0], dtype=F64), eps=eps)
    assert loss.dtype == dtype and torch.isfinite(loss)
    teacher = GaussianMixture(torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64), 0.1, process=p)
    out = ddim(teacher, [1000, 999, 601, 0], torch.randn(4, 2, generator=g).to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
