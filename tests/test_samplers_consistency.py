"""Consistency-model samplers (handbook Alg. 4, 5, 9; Eq. 19, 24, 26, 27): closed forms, diffusers, seeds, errors."""
import math

import pytest
import torch

from dstar_edu.conversions import cm_c_skip_c_out, convert
from dstar_edu.predictors import FunctionPredictor
from dstar_edu.process import DDPM, VE, RectifiedFlow, TrigFlow
from dstar_edu.samplers import consistency as cs
from dstar_edu.verify.fixtures import ExactGaussian
from dstar_edu.verify.measure import law_step
from toy_data.mixtures import GaussianMixture

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian(process, shape=(2,)):
    mean = torch.linspace(-0.6, 0.9, math.prod(shape), dtype=F64).reshape(shape)
    var = torch.linspace(0.05, 1.5, math.prod(shape), dtype=F64).reshape(shape)
    return ExactGaussian(mean, var, process)


# ---- the consistency output --------------------------------------------------------------------------------
def test_cm_f_predictor_is_used_raw_and_other_predictors_give_x0():
    """A cm_f network's output *is* f; convert(cm_f -> x0) returns the inner x0_hat of Eq. 19 instead."""
    ve = VE(80.0)
    net = FunctionPredictor(lambda x, t, c: 0.3 * x + 1.0, ve, "cm_f")
    x = torch.randn(4, 2, generator=gen(0), dtype=F64)
    f = cs.consistency_output(net, x, 5.0)
    assert torch.equal(f, 0.3 * x + 1.0)
    c_skip, c_out = cm_c_skip_c_out(torch.tensor(5.0, dtype=F64))
    inner = net.predict("x0", x, 5.0)
    torch.testing.assert_close(inner, (0.3 * x + 1.0 - c_skip * x) / c_out, rtol=1e-13, atol=0)
    assert (inner - f).abs().max() > 0.1
    g = gaussian(ve)
    torch.testing.assert_close(cs.consistency_output(g, x, 5.0), g.pair(x, 5.0)[0], rtol=0, atol=0)


def test_trigflow_F_consistency_output_is_eq38():
    """For a TrigFlow F-model, predict('x0') is exactly Eq. 38's f = cos t x - sin t sigma_d F."""
    tf = TrigFlow(0.5)
    net = FunctionPredictor(lambda x, t, c: torch.tanh(x) - 0.2, tf, "trigflow_F")
    x = torch.randn(3, 2, generator=gen(1), dtype=F64)
    t = 0.9
    F = net(x, t)
    torch.testing.assert_close(cs.consistency_output(net, x, t), math.cos(t) * x - math.sin(t) * 0.5 * F,
                               rtol=1e-14, atol=1e-15)


# ---- Alg. 4 ---------------------------------------------------------------------------------------------------
def test_consistency_multistep_matches_hand_written_alg4_with_eq26():
    """A cm_f model on VE: our loop equals Alg. 4 written out (f, then x0 + sqrt(t^2 - eps^2) z), same draws."""
    ve = VE(80.0)
    eps = 0.002

    def f(x, t, c):
        c_skip, c_out = cm_c_skip_c_out(torch.as_tensor(t, dtype=F64), eps=eps)
        return c_skip * x + c_out * torch.sin(x)

    net = FunctionPredictor(f, ve, "cm_f")
    grid = [80.0, 10.0, 1.0, 0.002]
    x_init = ve.prior_sample((5, 3), generator=gen(2), dtype=F64)
    out, traj = cs.consistency_multistep(net, grid, x_init, generator=gen(3), return_trajectory=True)
    g, x, expected = gen(3), x_init, [x_init]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x0 = f(x, t, None)
        if t_next <= eps:
            x = x0
        else:
            x = x0 + math.sqrt(t_next ** 2 - eps ** 2) * torch.randn(x.shape, generator=g, dtype=F64)
        expected.append(x)
    assert len(traj) == len(grid)
    for a, b in zip(traj, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    assert torch.equal(out, traj[-1])


def test_one_step_cm_with_exact_flow_map_is_the_flow_map():
    ve = VE(80.0)
    g = gaussian(ve, (3, 4, 4))
    fmap = cs.GaussianFlowMap(g.as_mixture(), t_end=0.002)
    x = ve.prior_sample((2, 3, 4, 4), generator=gen(4), dtype=F64)
    out = cs.consistency_multistep(fmap, [80.0, 0.0], x)
    torch.testing.assert_close(out, fmap.flow(x, 80.0, 0.002), rtol=0, atol=0)
    # closed form of the Gaussian flow map per coordinate
    expected = g.mean + torch.sqrt(g.var + 0.002 ** 2) / torch.sqrt(g.var + 80.0 ** 2) * (x - g.mean)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)


def test_cm_multistep_seeds_reproducible_and_distinct():
    ve = VE(80.0)
    fmap = cs.GaussianFlowMap(gaussian(ve).as_mixture(), t_end=0.002)
    x = ve.prior_sample((6, 2), generator=gen(5), dtype=F64)
    grid = [80.0, 5.0, 0.5, 0.002]
    a = cs.consistency_multistep(fmap, grid, x, generator=gen(6))
    b = cs.consistency_multistep(fmap, grid, x, generator=gen(6))
    c = cs.consistency_multistep(fmap, grid, x, generator=gen(7))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_renoise_special_cases():
    ve, ddpm = VE(80.0), DDPM(1000)
    x, z = torch.randn(3, 2, generator=gen(8), dtype=F64), torch.randn(3, 2, generator=gen(9), dtype=F64)
    torch.testing.assert_close(cs.renoise(x, 0.002, 3.0, ve, z), x + math.sqrt(9 - 0.002 ** 2) * z, rtol=1e-15, atol=0)
    a, s = float(ddpm.alpha(400.0)), float(ddpm.sigma(400.0))
    torch.testing.assert_close(cs.renoise(x, 0.0, 400.0, ddpm, z), a * x + s * z, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="t_to"):
        cs.renoise(x, 3.0, 1.0, ve, z)


# ---- exact consistency functions -----------------------------------------------------------------------------
@pytest.mark.parametrize("process,t", [(VE(80.0), 7.0), (DDPM(1000), 600.0), (TrigFlow(0.5), 1.1),
                                       (RectifiedFlow(), 0.7)])
def test_gaussian_flow_map_pushes_marginals_and_composes(process, t):
    """Exact law of f(x_t) for x_t ~ q_t is the data law; flows compose; f(x, t_end) = x."""
    g = gaussian(process)
    fmap = cs.GaussianFlowMap(g.as_mixture())
    m, V = law_step(lambda x, z: fmap(x, t), *g.law(t))
    m0, V0 = g.law(process.t_min)
    torch.testing.assert_close(m, m0, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(V, V0, rtol=1e-12, atol=1e-13)
    x = torch.randn(4, 2, generator=gen(10), dtype=F64)
    mid = 0.5 * (t + process.t_min)
    torch.testing.assert_close(fmap.flow(fmap.flow(x, t, mid), mid, process.t_min), fmap(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fmap(x, process.t_min), x, rtol=0, atol=1e-15)


def test_gaussian_flow_map_full_covariance_matches_ode_solution():
    """Full covariance (eigenbasis path) against a numerical PF-ODE solve of an independent closed-form teacher
    (E[x0|x_t] = mu + a Sigma (a^2 Sigma + s^2 I)^-1 (x_t - a mu) by a linear solve), first-order convergence."""
    ddpm = DDPM(1000)
    mu = torch.tensor([0.4, -0.2], dtype=F64)
    cov = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=F64)

    def posterior_mean(x, t, c):
        a, s = float(ddpm.alpha(t)), float(ddpm.sigma(t))
        return mu + torch.linalg.solve(a * a * cov + s * s * torch.eye(2, dtype=F64), (x - a * mu).T).T @ (a * cov)

    teacher = FunctionPredictor(posterior_mean, ddpm, "x0")
    fmap = cs.GaussianFlowMap(GaussianMixture(mu[None], cov[None], process=ddpm))
    x = torch.randn(8, 2, generator=gen(11), dtype=F64)
    exact = fmap(x, 700.0)
    sols = [cs.ODEFlowMap(teacher, n_steps=n)(x, 700.0) for n in (50, 100, 200)]
    errs = [float((s - exact).abs().max()) for s in sols]
    for a, b in zip(errs, errs[1:]):
        assert 1.8 < a / b < 2.2        # DDIM is first order
    richardson = 2 * sols[2] - sols[1]  # removes the first-order term: what is left is O(1/n^2)
    assert float((richardson - exact).abs().max()) < errs[-1] / 20


def test_ode_flow_map_is_exact_for_a_single_data_point():
    """DDIM (the exponential integrator) is exact when the data is one point: f(x_t) = that point."""
    ve = VE(80.0)
    point = torch.tensor([[0.3, -1.2]], dtype=F64)
    from toy_data.mixtures import EmpiricalDistribution
    dist = EmpiricalDistribution(point, process=ve)
    x = torch.randn(5, 2, generator=gen(12), dtype=F64) * 20
    torch.testing.assert_close(cs.ODEFlowMap(dist, n_steps=3)(x, 20.0), point.expand(5, 2), rtol=0, atol=1e-12)


# ---- LCM (Alg. 5 / 9) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 50])
def test_lcm_timesteps_match_diffusers(n):
    from diffusers import LCMScheduler
    sched = LCMScheduler()
    sched.set_timesteps(n)
    ts = cs.lcm_timesteps(n)
    assert ts[-1] == 0
    assert torch.equal(ts[:-1] - 1, sched.timesteps.double())


def test_lcm_boundary_scalings_match_diffusers_and_boundary():
    from diffusers import LCMScheduler
    sched = LCMScheduler()
    for k in (0, 19, 259, 999):
        c_skip, c_out = cs.lcm_boundary_scalings(k + 1)
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(k)   # python ints: float64 maths
        assert abs(c_skip.item() - float(ref_skip)) <= 1e-15 and abs(c_out.item() - float(ref_out)) <= 1e-15
    c_skip, c_out = cs.lcm_boundary_scalings(1)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_lcm_equals_diffusers_lcm_scheduler_at_3x32x32():
    """Same trajectory as LCMScheduler (float64 alphas_cumprod, python-int timesteps), images, 4 steps, same noise."""
    from diffusers import LCMScheduler
    sched = LCMScheduler()
    sched.set_timesteps(4)
    p = DDPM.from_diffusers_config(sched.config)
    sched.alphas_cumprod = p.alpha_bars[1:].clone()
    g = gaussian(p, (3, 32, 32))
    x0 = torch.randn(2, 3, 32, 32, generator=gen(13), dtype=F64)
    x, g1 = x0, gen(14)
    for k in sched.timesteps.tolist():
        x = sched.step(g.predict("eps", x, k + 1.0), int(k), x, generator=g1).prev_sample
    ours = cs.lcm(g, cs.lcm_timesteps(4), x0, boundary=True, generator=gen(14))
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-13)


def test_lcm_predicted_noise_is_ddim_closed_form():
    """Prop. 2.3 on Gaussian data: lcm(noise='predicted') = DDIM eta=0 with the closed-form denoiser."""
    p = DDPM(1000)
    g = gaussian(p)
    x = torch.randn(7, 2, generator=gen(15), dtype=F64)
    ts = cs.lcm_timesteps(6)
    out = cs.lcm(g, ts, x, noise="predicted")
    for t, tp in zip(ts[:-1].tolist(), ts[1:].tolist()):
        a, s = float(p.alpha(t)), float(p.sigma(t))
        c = a * a * g.var + s * s
        x0 = g.mean + a * g.var / c * (x - a * g.mean)
        eps = s / c * (x - a * g.mean)
        x = math.sqrt(float(p.alpha_bar(tp))) * x0 + math.sqrt(1 - float(p.alpha_bar(tp))) * eps
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-13)


def test_lcm_last_step_draws_no_noise_and_seeds_reproduce():
    p = DDPM(1000)
    g = gaussian(p)
    x = torch.randn(4, 2, generator=gen(16), dtype=F64)
    gen_a = gen(17)
    cs.lcm_step(g, x, 260.0, 0.0, generator=gen_a)
    assert torch.equal(gen_a.get_state(), gen(17).get_state())        # nothing drawn on the final step
    a = cs.lcm(g, cs.lcm_timesteps(4), x, generator=gen(18))
    b = cs.lcm(g, cs.lcm_timesteps(4), x, generator=gen(18))
    assert torch.equal(a, b)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    ve, ddpm = VE(80.0), DDPM(1000)
    fmap = cs.GaussianFlowMap(gaussian(ve).as_mixture(), t_end=0.002)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        cs.consistency_multistep(fmap, [1.0, 5.0, 0.0], x)
    with pytest.raises(ValueError, match=r"timesteps\[-1\]"):
        cs.consistency_multistep(fmap, [80.0, 1.0], x)
    with pytest.raises(ValueError, match="epsilon"):
        cs.consistency_multistep(fmap, [80.0, 0.0], x, epsilon=-1.0)
    with pytest.raises(ValueError, match="x_init"):
        cs.consistency_multistep(fmap, [80.0, 0.0], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="generator"):
        cs.consistency_multistep(fmap, [80.0, 0.0], x, generator=0)
    with pytest.raises(ValueError, match="outside the time domain"):
        cs.consistency_multistep(fmap, [81.0, 0.0], x)
    g = gaussian(ddpm)
    with pytest.raises(ValueError, match="noise="):
        cs.lcm(g, cs.lcm_timesteps(2), x, noise="random")
    with pytest.raises(ValueError, match="boundary=True needs a DDPM"):
        cs.lcm_step(gaussian(ve), x, 10.0, 0.0, boundary=True)
    with pytest.raises(ValueError, match="boundary twice"):
        cs.lcm_step(FunctionPredictor(lambda x, t, c: x, ddpm, "cm_f"), x, 10.0, 0.0, boundary=True)
    with pytest.raises(ValueError, match="n_steps"):
        cs.lcm_timesteps(60)
    with pytest.raises(ValueError, match="t=0"):
        cs.lcm_boundary_scalings(0.0)
    with pytest.raises(ValueError, match=r"noise has shape \(3, 2\); allowed: \(2, 2\)"):
        cs.lcm_step(g, x, 10.0, 5.0, noise=torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="one-component"):
        cs.GaussianFlowMap(GaussianMixture(torch.zeros(2, 2, dtype=F64), 1.0, process=ve))
    with pytest.raises(ValueError, match="n_steps"):
        cs.ODEFlowMap(fmap, n_steps=0)


def test_convert_cm_f_round_trip_is_what_the_sampler_avoids():
    """Documented pitfall: treating f as x0 through convert double-applies the boundary."""
    ve = VE(80.0)
    x = torch.randn(3, 2, generator=gen(19), dtype=F64)
    f = torch.randn(3, 2, generator=gen(20), dtype=F64)
    x0_inner = convert(f, "cm_f", "x0", x, 2.0, ve)
    assert (x0_inner - f).abs().max() > 0.1
