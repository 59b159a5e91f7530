"""Flow samplers: rectified-flow Euler (Sec. 2.4.2), InstaFlow (Alg. 6-8), TrigFlow (Sec. 2.5.2)."""
import math

import pytest
import torch

from dstar_edu.predictors import FunctionPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow
from dstar_edu.samplers import consistency as cs
from dstar_edu.samplers import flow as fl
from dstar_edu.verify.fixtures import ExactGaussian
from dstar_edu.verify.measure import law_step
from toy_data.mixtures import EmpiricalDistribution

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def gaussian(process, shape=(2,), prediction="x0"):
    mean = torch.linspace(-0.6, 0.9, math.prod(shape), dtype=F64).reshape(shape)
    var = torch.linspace(0.05, 1.5, math.prod(shape), dtype=F64).reshape(shape)
    return ExactGaussian(mean, var, process, prediction)


# ---- rectified flow ------------------------------------------------------------------------------------------
def test_euler_is_exact_on_straight_paths_both_directions():
    """One data point c: the RF velocity is (x - c)/t, paths are straight, so Euler is exact for any grid."""
    rf = RectifiedFlow()
    c = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    net = FunctionPredictor(lambda x, t, cond: (x - c) / t, rf, "velocity")
    noise = torch.randn(4, 3, generator=gen(0), dtype=F64)
    grid = torch.tensor([1.0, 0.93, 0.5, 0.11, 0.0], dtype=F64)
    out = fl.rectified_flow_euler(net, grid, noise)
    torch.testing.assert_close(out, c.expand(4, 3), rtol=0, atol=1e-14)
    # to_noise from t = 0.2 (x_0.2 = 0.8 c + 0.2 eps) lands on the same eps at t = 1
    x = 0.8 * c + 0.2 * noise
    back = fl.rectified_flow_euler(net, torch.tensor([0.2, 0.3, 0.75, 1.0], dtype=F64), x, direction="to_noise")
    torch.testing.assert_close(back, noise, rtol=0, atol=1e-13)
    # the same answer through the exact empirical distribution's 'velocity'
    dist = EmpiricalDistribution(c, process=rf)
    torch.testing.assert_close(fl.rectified_flow_euler(dist, grid, noise), c.expand(4, 3), rtol=0, atol=1e-13)


def test_euler_first_order_to_exact_gaussian_flow_at_image_shape():
    rf = RectifiedFlow()
    g = gaussian(rf, (3, 8, 8), prediction="velocity")
    fmap = cs.GaussianFlowMap(g.as_mixture())
    x1 = torch.randn(2, 3, 8, 8, generator=gen(1), dtype=F64)
    exact = fmap.flow(x1, 1.0, 0.0)
    errs = [float((fl.rectified_flow_euler(g, torch.linspace(1, 0, n + 1, dtype=F64), x1) - exact).abs().max())
            for n in (32, 64, 128)]
    assert 1.9 < errs[0] / errs[1] < 2.1 and 1.9 < errs[1] / errs[2] < 2.1


def test_trajectory_and_direction_conventions():
    rf = RectifiedFlow()
    g = gaussian(rf, prediction="velocity")
    x = torch.randn(3, 2, generator=gen(2), dtype=F64)
    out, traj = fl.rectified_flow_euler(g, [1.0, 0.5, 0.0], x, return_trajectory=True)
    assert len(traj) == 3 and traj[0] is x and torch.equal(traj[-1], out)
    v = g.predict("velocity", x, 1.0)
    torch.testing.assert_close(traj[1], x - 0.5 * v, rtol=0, atol=0)    # dt = t_next - t = -0.5
    with pytest.raises(ValueError, match="strictly decreasing"):
        fl.rectified_flow_euler(g, [0.0, 1.0], x)
    with pytest.raises(ValueError, match="strictly increasing"):
        fl.rectified_flow_euler(g, [1.0, 0.0], x, direction="to_noise")
    with pytest.raises(ValueError, match="direction="):
        fl.rectified_flow_euler(g, [1.0, 0.0], x, direction="backwards")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_match_timesteps_match_diffusers(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = fl.flow_match_timesteps(n, shift)
    assert ours.dtype == F64 and ours[-1] == 0 and len(ours) == n + 1
    assert torch.equal(ours.float(), sched.sigmas)                     # diffusers rounds the same values to float32
    torch.testing.assert_close((1000 * ours[:-1]).float(), sched.timesteps, rtol=2 ** -23, atol=0)


def test_euler_step_equals_flow_match_scheduler_step():
    """diffusers casts the sample to float32 inside step(); on a float32-representable sample they agree exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    rf = RectifiedFlow()
    g = gaussian(rf, (3, 4, 4), prediction="velocity")
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    grid = fl.flow_match_timesteps(6, 3.0)
    sched.sigmas = grid.clone()
    x = torch.randn(2, 3, 4, 4, generator=gen(3)).double()          # float32 values
    for i in range(6):
        v = g.predict("velocity", x, grid[i])
        theirs = sched.step(v, sched.timesteps[i], x).prev_sample
        ours = fl.rectified_flow_euler_step(g, x, grid[i], grid[i + 1])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        x = theirs.float().double()


# ---- InstaFlow ------------------------------------------------------------------------------------------------
def test_instaflow_ddim_is_x_space_ddim_divided_by_beta():
    p = DDPM(1000)
    g = gaussian(p, (3, 4, 4))
    x = torch.randn(2, 3, 4, 4, generator=gen(4), dtype=F64)
    ts = [1000.0, 800.0, 450.0, 120.0, 0.0]
    y = fl.instaflow(g, ts, x / float(fl.instaflow_beta(p, 1000.0)), method="ddim", eta=0.0)
    for t, tp in zip(ts[:-1], ts[1:]):
        x0, eps = g.pair(x, t)
        ab = float(p.alpha_bar(tp))
        x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-13)          # y_0 = x_0 (beta_0 = 1)


def test_instaflow_alg8_eta1_full_grid_is_alg6_and_steps_use_given_noise():
    p = DDPM(1000)
    g = gaussian(p)
    y = torch.randn(5, 2, generator=gen(5), dtype=F64)
    z = torch.randn(5, 2, generator=gen(6), dtype=F64)
    for t in (999.0, 400.0, 2.0):
        a = fl.instaflow_ddim_step(g, y, t, t - 1, eta=1.0, noise=z)
        b = fl.instaflow_posterior_step(g, y, t, t - 1, noise=z)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_instaflow_last_posterior_step_returns_tweedie_x0_with_its_exact_variance():
    """t = 1 -> 0: Eq. 10 gives mu = x0_hat and sigma = 0, so y_0 = E[x0 | x_1]; from the exact marginal its
    law has the data mean and variance lam - Var[x0 | x_1] = lam - lam s^2 / (a^2 lam + s^2)."""
    p = DDPM(1000)
    g = gaussian(p)
    m, V = g.law(1.0)
    b = float(fl.instaflow_beta(p, 1.0))
    m, V = law_step(lambda y, z: fl.instaflow_posterior_step(g, y, 1.0, 0.0, noise=z), m / b, V / b ** 2)
    a, s = float(p.alpha(1.0)), float(p.sigma(1.0))
    torch.testing.assert_close(m[0], g.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(V[0], g.var - g.var * s * s / (a * a * g.var + s * s), rtol=1e-12, atol=1e-14)


def test_instaflow_prior_and_seeds():
    p = DDPM(1000, "scaled_linear", beta_start=0.00085, beta_end=0.012)
    beta = float(fl.instaflow_beta(p, 1000.0))
    ab = float(p.alpha_bar(1000.0))
    assert abs(beta - (math.sqrt(ab) + math.sqrt(1 - ab))) < 1e-15
    y = fl.instaflow_prior(p, (20000, 2), generator=gen(7))
    assert abs(float(y.var()) * beta ** 2 - 1) < 5 * math.sqrt(2 / 40000)
    g = gaussian(p)
    ts = torch.linspace(1000, 0, 11, dtype=F64).round()
    a = fl.instaflow(g, ts, y[:8], method="ddim", eta=1.0, generator=gen(8))
    b = fl.instaflow(g, ts, y[:8], method="ddim", eta=1.0, generator=gen(8))
    c = fl.instaflow(g, ts, y[:8], method="ddim", eta=1.0, generator=gen(9))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


def test_instaflow_bad_inputs():
    p = DDPM(1000)
    g = gaussian(p)
    y = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="method="):
        fl.instaflow(g, [1000.0, 0.0], y, method="euler")
    with pytest.raises(ValueError, match="DDPM/VP process"):
        fl.instaflow(gaussian(VE(80.0)), [80.0, 0.0], y)
    with pytest.raises(ValueError, match="eta="):
        fl.instaflow_ddim_step(g, y, 500.0, 400.0, eta=-1.0)
    with pytest.raises(ValueError, match="too large"):
        fl.instaflow_ddim_step(g, y, 500.0, 100.0, eta=50.0)
    with pytest.raises(ValueError, match="t_prev"):
        fl.instaflow_posterior_step(g, y, 500.0, 500.0)
    with pytest.raises(ValueError, match="y_init"):
        fl.instaflow(g, [1000.0, 0.0], "noise")
    assert isinstance(fl.instaflow(gaussian(VP()), [1.0, 0.5, 0.0], y), torch.Tensor)   # VP works too


# ---- TrigFlow -------------------------------------------------------------------------------------------------
def test_trigflow_timesteps_endpoints_exact():
    for n in (1, 3, 7, 8, 100):
        ts = fl.trigflow_timesteps(n)
        assert ts[0].item() == math.pi / 2 and ts[-1].item() == 0.0 and (ts[1:] < ts[:-1]).all()
        TrigFlow(0.5).check_t(ts)


def test_trigflow_one_ddim_step_to_zero_is_posterior_mean_and_from_pi_half_the_data_mean():
    tf = TrigFlow(0.5)
    g = gaussian(tf, (3, 4, 4))
    x = tf.prior_sample((2, 3, 4, 4), generator=gen(10), dtype=F64)
    out = fl.trigflow(g, fl.trigflow_timesteps(1), x)          # no information at pi/2: E[x0 | x] = mean
    torch.testing.assert_close(out, g.mean.expand_as(out), rtol=0, atol=1e-15)
    xs = 0.4 * x + 0.3
    torch.testing.assert_close(fl.trigflow_step(g, xs, 0.9, 0.0), g.pair(xs, 0.9)[0], rtol=1e-13, atol=1e-14)


def test_trigflow_step_is_a_rotation_of_x0_and_z():
    """x_s = cos s x0 + sin s z and sigma_d F = cos s z - sin s x0 (exact pair): the step gives cos t x0 + sin t z."""
    tf = TrigFlow(0.7)
    x0, z = torch.randn(3, 2, generator=gen(11), dtype=F64), 0.7 * torch.randn(3, 2, generator=gen(12), dtype=F64)
    s, t = 1.2, 0.4
    F = (math.cos(s) * z - math.sin(s) * x0) / 0.7
    net = FunctionPredictor(lambda x, tt, c: F, tf, "trigflow_F")
    out = fl.trigflow_step(net, math.cos(s) * x0 + math.sin(s) * z, s, t)
    torch.testing.assert_close(out, math.cos(t) * x0 + math.sin(t) * z, rtol=1e-13, atol=1e-14)


def test_trigflow_consistency_sampler_equals_scm_scheduler():
    from diffusers import SCMScheduler
    tf = TrigFlow(0.5)
    g = gaussian(tf, (3, 4, 4))
    sched = SCMScheduler(sigma_data=0.5)
    sched.set_timesteps(4, intermediate_timesteps=None)
    grid = fl.trigflow_timesteps(4)
    sched.timesteps = grid.clone()
    x = tf.prior_sample((2, 3, 4, 4), generator=gen(13), dtype=F64)
    g1, g2 = gen(14), gen(14)
    for i in range(4):                                           # replay: both steps start from the same x
        s, t = grid[i].item(), grid[i + 1].item()
        ours = cs.consistency_multistep_step(g, x, s, t, epsilon=0.0, generator=g2, noise_dtype=torch.float32)
        out = sched.step(g.predict("velocity", x, s), grid[i], x, generator=g1)
        # SCMScheduler forms sin(t) * sigma_d * z in float32: two float32 roundings of that term
        noise_term = out.prev_sample - math.cos(t) * out.pred_original_sample
        torch.testing.assert_close(ours, out.prev_sample, rtol=1e-13,
                                   atol=2.0 ** -23 * float(noise_term.abs().max()) + 1e-15)
        x = out.prev_sample
    assert float(noise_term.abs().max()) == 0.0                  # last step: t = 0, no noise left
    # the full sampler is the same chain of steps (epsilon = 0, float32 noise draws)
    x0 = tf.prior_sample((2, 3, 4, 4), generator=gen(15), dtype=F64)
    full = fl.trigflow(g, grid, x0, sampler="consistency", generator=gen(16), noise_dtype=torch.float32)
    x, g4 = x0, gen(16)
    for i in range(4):
        x = cs.consistency_multistep_step(g, x, grid[i], grid[i + 1], epsilon=0.0, generator=g4,
                                          noise_dtype=torch.float32)
    assert torch.equal(full, x)


def test_trigflow_bad_inputs():
    tf = TrigFlow(0.5)
    g = gaussian(tf)
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="sampler="):
        fl.trigflow(g, fl.trigflow_timesteps(2), x, sampler="heun")
    with pytest.raises(ValueError, match="TrigFlow process"):
        fl.trigflow(gaussian(DDPM(1000)), [1000.0, 0.0], x)
    with pytest.raises(ValueError, match="smaller than s"):
        fl.trigflow_step(g, x, 0.5, 0.9)
    with pytest.raises(ValueError, match="outside the time domain"):
        fl.trigflow_step(g, x, 1.6, 0.9)
    with pytest.raises(ValueError, match="n_steps"):
        fl.trigflow_timesteps(0)
    with pytest.raises(ValueError, match=r"timesteps\[-1\]"):
        fl.trigflow(g, [math.pi / 2, 0.3], x, sampler="consistency")
