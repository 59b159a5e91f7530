"""Handbook Sec. 3.3 objectives: ReFL, DRaFT-K, QSM, DDPO_SF / DDPO_IS, DRWR (the theorems are in align.* checks)."""
import pytest
import torch

from dstar_edu.objectives.pretrain import denoising_loss
from dstar_edu.objectives.reward_finetune import (ddpo_is_loss, ddpo_sf_loss, draft_loss, drwr_loss, drwr_weights,
                                                  gaussian_log_prob, normalize_advantages, qsm_loss, refl_loss,
                                                  sample_until, sample_with_log_probs, transition_stats)
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VP
from dstar_edu.rewards import QuadraticReward, RegionReward
from dstar_edu.samplers.diffusion import ddim, ddpm_step

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _net(process, seed=0):
    torch.manual_seed(seed)
    return MLPPredictor(process, "eps", 2, hidden=32, depth=2).double()


TS = torch.tensor([900.0, 600.0, 300.0, 100.0, 20.0], dtype=F64)


class Linear:
    """eps_theta = a x + b with learnable scalars (one predictor for all t)."""

    def __init__(self, process):
        self.a = torch.tensor(0.4, dtype=F64, requires_grad=True)
        self.b = torch.tensor([0.1, -0.2], dtype=F64, requires_grad=True)
        self.pred = FunctionPredictor(lambda x, t, c: self.a * x + self.b, process, "eps")


def test_refl_gradient_is_reward_gradient_through_tweedie():
    """ReFL: -grad R(x0_hat), x0_hat = (x_t - sqrt(1-ab) eps_theta)/sqrt(ab): closed form for a linear eps."""
    p = DDPM(1000)
    lin = Linear(p)
    R = QuadraticReward([0.5, 0.5], scale=0.6)
    x_t = torch.randn(16, 2, generator=_g(0), dtype=F64)
    t = 400.0
    loss = refl_loss(lin.pred, x_t, t, R)
    ga, gb = torch.autograd.grad(loss, (lin.a, lin.b))
    ab = p.alpha_bar(t)
    x0 = (x_t - (1 - ab).sqrt() * (lin.a * x_t + lin.b)) / ab.sqrt()
    dR = -(x0 - R.center) / R.scale ** 2                       # grad_x R at x0_hat
    k = -(1 - ab).sqrt() / ab.sqrt()                            # d x0_hat / d eps_theta
    torch.testing.assert_close(ga, -(dR * k * x_t).sum(1).mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gb, -(dR * k).mean(0), rtol=1e-12, atol=1e-14)


def test_sample_until_is_the_truncated_ddim_chain():
    p = DDPM(1000)
    net = _net(p)
    x = torch.randn(8, 2, generator=_g(1), dtype=F64)
    a = sample_until(net, TS, x, 3, eta=0.0)
    torch.testing.assert_close(a, ddim(net, TS[:4], x, eta=0.0))
    assert not a.requires_grad
    with pytest.raises(ValueError, match="stop"):
        sample_until(net, TS, x, 5)


def test_draft_k_only_reaches_the_last_k_steps():
    """Per-step parameters: DRaFT-K's gradient is zero for the steps before the last K."""
    p = DDPM(1000)
    a = torch.zeros(len(TS) - 1, dtype=F64, requires_grad=True)

    def eps(x, t, c):
        k = int(torch.nonzero(TS[:-1] == torch.as_tensor(t, dtype=F64))[0])
        return (0.3 + a[k]) * x
    pred = FunctionPredictor(eps, p, "eps")
    R = QuadraticReward([1.0, 0.0])
    x = torch.randn(8, 2, generator=_g(2), dtype=F64)
    for K in (1, 2, 4):
        (g,) = torch.autograd.grad(draft_loss(pred, TS, x, R, K=K), a)
        assert bool((g[: 4 - K] == 0).all()) and bool((g[4 - K:] != 0).all())
    full = torch.autograd.grad(draft_loss(pred, TS, x, R), a)[0]
    torch.testing.assert_close(full, torch.autograd.grad(draft_loss(pred, TS, x, R, K=4), a)[0])
    with pytest.raises(ValueError, match="K=5"):
        draft_loss(pred, TS, x, R, K=5)
    loss, sample = draft_loss(pred, TS, x, R, K=1, return_sample=True)
    torch.testing.assert_close(loss, -R(sample).mean())


def test_qsm_loss_vanishes_when_the_score_is_the_reward_gradient():
    p = VP()
    R = QuadraticReward([0.5, -0.5], scale=0.8)
    exact = FunctionPredictor(lambda x, t, c: 2.0 * (-(x - R.center) / R.scale ** 2), p, "score")
    x = torch.randn(10, 2, generator=_g(3), dtype=F64)
    assert float(qsm_loss(exact, x, 0.3, R, scale=2.0)) < 1e-24
    # a mismatch of exactly delta per entry gives ||delta||^2
    off = FunctionPredictor(lambda x, t, c: -(x - R.center) / R.scale ** 2 + 0.25, p, "score")
    torch.testing.assert_close(qsm_loss(off, x, 0.3, R), torch.tensor(2 * 0.25 ** 2, dtype=F64))


def test_transition_is_the_ddpm_posterior_at_eta_one():
    """Eq. 49-50 at eta = 1 on the full grid = ddpm_step's posterior (mean with zero noise, std^2 = Eq. 8 var)."""
    p = DDPM(1000)
    net = _net(p, 1)
    x = torch.randn(6, 2, generator=_g(4), dtype=F64)
    for t in (2.0, 57.0, 700.0):
        mean, std = transition_stats(net, x, t, t - 1, eta=1.0)
        torch.testing.assert_close(mean, ddpm_step(net, x, t, t - 1, noise=torch.zeros_like(x)), rtol=1e-12, atol=1e-12)
        a_t, ab_t, ab_p = p.alphas[int(t) - 1], p.alpha_bars[int(t)], p.alpha_bars[int(t) - 1]
        torch.testing.assert_close(std ** 2, (1 - a_t) * (1 - ab_p) / (1 - ab_t), rtol=1e-12, atol=0)


def test_gaussian_log_prob_matches_torch_distributions():
    x = torch.randn(4, 3, 5, generator=_g(5), dtype=F64)
    m = torch.randn(4, 3, 5, generator=_g(6), dtype=F64)
    ref = torch.distributions.Normal(m, 0.7).log_prob(x).reshape(4, -1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, m, 0.7), ref, rtol=1e-13, atol=1e-12)
    with pytest.raises(ValueError, match="std"):
        gaussian_log_prob(x, m, 0.0)


def test_sample_with_log_probs_is_the_ddim_eta1_chain():
    p = DDPM(1000)
    net = _net(p, 2)
    x = torch.randn(16, 2, generator=_g(7), dtype=F64)
    traj, logp = sample_with_log_probs(net, TS, x, eta=1.0, generator=_g(8))
    torch.testing.assert_close(traj[-1], ddim(net, TS, x, eta=1.0, generator=_g(8)), rtol=1e-12, atol=1e-12)
    assert logp.shape == (16, 4) and len(traj) == 5
    for i in range(4):
        mean, std = transition_stats(net, traj[i], TS[i], TS[i + 1])
        torch.testing.assert_close(logp[:, i], gaussian_log_prob(traj[i + 1], mean, std))
    with pytest.raises(ValueError, match="alpha_bar = 1"):
        sample_with_log_probs(net, torch.tensor([500.0, 0.0]), x)
    with pytest.raises(ValueError, match="eta"):
        sample_with_log_probs(net, TS, x, eta=0.0)


def test_ddpo_is_at_old_policy_is_ddpo_sf_over_steps_and_clipping_stops_gradients():
    p = DDPM(1000)
    net = _net(p, 3)
    x = torch.randn(32, 2, generator=_g(9), dtype=F64)
    traj, old = sample_with_log_probs(net, TS, x, generator=_g(10))
    adv = normalize_advantages(RegionReward([0.0, 0.0], 1.0)(traj[-1]))
    params = list(net.parameters())
    g_sf = torch.autograd.grad(ddpo_sf_loss(net, traj, TS, adv), params)
    g_is = torch.autograd.grad(ddpo_is_loss(net, traj, TS, adv, old), params)
    for a, b in zip(g_is, g_sf):
        torch.testing.assert_close(a, b / 4, rtol=1e-10, atol=1e-12)
    # old log-probs far below the current ones: ratio >> 1 + eps, clipped for positive advantages
    g_clip = torch.autograd.grad(ddpo_is_loss(net, traj, TS, adv.abs(), old - 5.0, clip_range=0.2), params)
    assert all(float(g.abs().max()) == 0.0 for g in g_clip)
    with pytest.raises(ValueError, match="old_log_probs"):
        ddpo_is_loss(net, traj, TS, adv, old[:, :2])
    with pytest.raises(ValueError, match="advantages"):
        ddpo_sf_loss(net, traj, TS, adv[:3])


def test_normalize_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=F64)
    a = normalize_advantages(r)
    assert abs(float(a.mean())) < 1e-15 and abs(float(a.std()) - 1) < 1e-7


def test_drwr_weights_and_loss():
    r = torch.tensor([0.1, -0.5, 1.2], dtype=F64)
    torch.testing.assert_close(drwr_weights(r, 2.0), torch.exp(2 * r))
    torch.testing.assert_close(drwr_weights(r, 2.0, w_max=3.0), torch.exp(2 * r).clamp(max=3.0))
    torch.testing.assert_close(drwr_weights(r, 2.0, baseline="mean"), torch.exp(2 * (r - r.mean())))
    torch.testing.assert_close(drwr_weights(r, 2.0, baseline=0.5), torch.exp(2 * (r - 0.5)))
    for bad, match in (({"beta": -1.0}, "beta"), ({"beta": 1.0, "w_max": 0.0}, "w_max"),
                       ({"beta": 1.0, "baseline": "median"}, "baseline")):
        with pytest.raises(ValueError, match=match):
            drwr_weights(r, **bad)
    with pytest.raises(FloatingPointError, match="overflow"):
        drwr_weights(torch.tensor([1000.0], dtype=F64), 1.0)
    p = DDPM(1000)
    net = _net(p, 4)
    x0 = torch.randn(3, 2, generator=_g(11), dtype=F64)
    w = drwr_weights(r, 1.0)
    t = torch.tensor([10.0, 300.0, 800.0], dtype=F64)
    eps = torch.randn(3, 2, generator=_g(12), dtype=F64)
    per = denoising_loss(net, x0, t=t, eps=eps, target="eps", reduction="none")
    torch.testing.assert_close(drwr_loss(net, x0, w, t=t, eps=eps), (w * per).mean())
    with pytest.raises(ValueError, match="weights"):
        drwr_loss(net, x0, -w, t=t, eps=eps)


def test_reward_gradient_methods_reject_non_differentiable_rewards():
    p = DDPM(1000)
    net = _net(p)
    R = RegionReward([0.0, 0.0], 1.0)
    R.differentiable = False
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="not differentiable"):
        draft_loss(net, TS, x, R)
    with pytest.raises(ValueError, match="not differentiable"):
        refl_loss(net, x, 100.0, R)
