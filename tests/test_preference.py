"""KL-regularised optimum, DPO, Diffusion-DPO and Diffusion-NPO (Wang talk); theorems are in align.* checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from dstar_edu.objectives.alignment import GuidedPredictor
from dstar_edu.objectives.preference import (diffusion_dpo_implicit_reward, diffusion_dpo_loss, diffusion_npo_loss,
                                             dpo_loss, gaussian_kl_optimum, kl_regularized_objective,
                                             kl_regularized_optimum, npo_guided_eps, npo_swap)
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_kl_optimum_maximises_the_objective():
    g = _g(0)
    log_ref = torch.log_softmax(torch.randn(5, generator=g, dtype=F64), 0)
    r = torch.randn(5, generator=g, dtype=F64)
    star = kl_regularized_optimum(log_ref, r, 0.3)
    best = kl_regularized_objective(star, log_ref, r, 0.3)
    for _ in range(20):
        other = torch.log_softmax(star + 0.5 * torch.randn(5, generator=g, dtype=F64), 0)
        assert kl_regularized_objective(other, log_ref, r, 0.3) < best
    # beta -> infinity keeps the reference, beta -> 0 puts all mass on the best outcome
    torch.testing.assert_close(kl_regularized_optimum(log_ref, r, 1e9).exp(), log_ref.exp(), rtol=1e-6, atol=1e-9)
    assert float(kl_regularized_optimum(log_ref, r, 1e-4).exp()[r.argmax()]) > 1 - 1e-9
    with pytest.raises(ValueError, match="beta"):
        kl_regularized_optimum(log_ref, r, 0.0)
    with pytest.raises(ValueError, match="not normalised"):
        kl_regularized_optimum(torch.zeros(5, dtype=F64), r, 1.0)


def test_gaussian_kl_optimum_matches_numerical_tilting():
    """pi* ∝ N(mu, S) exp(r/beta) on a fine 2D grid (moments by the trapezoid rule) vs the closed form."""
    mu = torch.tensor([0.3, -0.2], dtype=F64)
    S = torch.tensor([[0.5, 0.2], [0.2, 0.4]], dtype=F64)
    b = torch.tensor([1.0, -0.5], dtype=F64)
    A = torch.tensor([[0.6, 0.1], [0.1, 0.3]], dtype=F64)
    beta = 0.8
    m_star, S_star = gaussian_kl_optimum(mu, S, b, A, beta)
    u = torch.linspace(-6, 6, 801, dtype=F64)
    X = torch.cartesian_prod(u, u)
    d = X - mu
    logp = -0.5 * (d @ torch.linalg.inv(S) * d).sum(1) + (X @ b - 0.5 * (X @ A * X).sum(1)) / beta
    w = torch.softmax(logp, 0)
    m = w @ X
    C = (w[:, None] * (X - m)).T @ (X - m)
    torch.testing.assert_close(m, m_star, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(C, S_star, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_kl_optimum(mu, S, b, -10 * torch.eye(2, dtype=F64), beta)


def test_dpo_loss_values():
    lw, ll = torch.tensor([-1.0, -2.0], dtype=F64), torch.tensor([-1.5, -1.0], dtype=F64)
    rw, rl = torch.tensor([-1.2, -2.0], dtype=F64), torch.tensor([-1.2, -1.0], dtype=F64)
    h = 0.5 * ((lw - rw) - (ll - rl))
    torch.testing.assert_close(dpo_loss(lw, ll, rw, rl, 0.5, reduction="none"), -F.logsigmoid(h))
    # policy = reference: log 2 per pair
    torch.testing.assert_close(dpo_loss(rw, rl, rw, rl, 2.0), torch.tensor(math.log(2), dtype=F64))
    assert npo_swap(1, 2) == (2, 1)


def _linear_eps(process, a, b):
    return FunctionPredictor(lambda x, t, c: a * x + b, process, "eps")


def test_diffusion_dpo_implicit_reward_matches_its_closed_form():
    """For eps = a x_t + b: E_eps ||eps - eps_hat||^2 = D (1 - a sigma)^2 + ||a alpha x0 + b||^2. The Monte-Carlo
    mean of the per-draw implicit reward over 20000 noises is within 5 standard errors of the closed form."""
    p = DDPM(1000)
    a_m, b_m = 0.7, torch.tensor([0.1, -0.3], dtype=F64)
    a_r, b_r = 0.5, torch.tensor([0.0, 0.2], dtype=F64)
    model, ref = _linear_eps(p, a_m, b_m), _linear_eps(p, a_r, b_r)
    x0 = torch.tensor([[0.4, -1.0]], dtype=F64)
    n, t, beta = 20000, 300.0, 2.0
    eps = torch.randn(n, 2, generator=_g(1), dtype=F64)
    h = diffusion_dpo_implicit_reward(model, ref, x0.expand(n, 2), beta, t=t, eps=eps)
    al, si = float(p.alpha(t)), float(p.sigma(t))

    def err(a, b):
        return 2 * (1 - a * si) ** 2 + ((a * al * x0[0] + b) ** 2).sum()
    expected = -beta * (err(a_m, b_m) - err(a_r, b_r))
    assert abs(float(h.mean()) - float(expected)) < 5 * float(h.std()) / math.sqrt(n)


def test_diffusion_dpo_and_npo_are_complementary_and_dpo_lowers_the_winner_error():
    p = DDPM(1000)
    torch.manual_seed(0)
    model = MLPPredictor(p, "eps", 2, hidden=32, depth=2).double()
    ref = MLPPredictor(p, "eps", 2, hidden=32, depth=2).double()
    ref.load_state_dict(model.state_dict())
    g = _g(2)
    x_w = torch.randn(64, 2, generator=g, dtype=F64)
    x_l = torch.randn(64, 2, generator=g, dtype=F64)
    t = torch.randint(1, 1000, (64,), generator=g).to(F64)
    eps = torch.randn(64, 2, generator=g, dtype=F64)
    kw = dict(beta=50.0, t=t, eps_w=eps, reduction="none")
    # at the reference, every pair costs log 2
    torch.testing.assert_close(diffusion_dpo_loss(model, ref, x_w, x_l, **kw), torch.full((64,), math.log(2), dtype=F64))
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=g, dtype=F64))
    L_dpo = diffusion_dpo_loss(model, ref, x_w, x_l, **kw)
    L_npo = diffusion_npo_loss(model, ref, x_w, x_l, **kw)
    torch.testing.assert_close(torch.exp(-L_dpo) + torch.exp(-L_npo), torch.ones(64, dtype=F64), rtol=1e-12, atol=1e-12)
    # one small gradient step on Diffusion-DPO widens the implicit-reward margin h_w - h_l
    margin = lambda: (diffusion_dpo_implicit_reward(model, ref, x_w, 50.0, t=t, eps=eps)
                      - diffusion_dpo_implicit_reward(model, ref, x_l, 50.0, t=t, eps=eps)).mean().detach()
    before = float(margin())
    loss = diffusion_dpo_loss(model, ref, x_w, x_l, beta=50.0, t=t, eps_w=eps)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for q, gr in zip(model.parameters(), grads):
            q.sub_(1e-4 * gr)
    assert float(margin()) > before
    with pytest.raises(ValueError, match="same shape"):
        diffusion_dpo_loss(model, ref, x_w, x_l[:3], beta=1.0)


def test_npo_guidance_is_cfg_with_the_negative_model():
    p = DDPM(1000)
    torch.manual_seed(1)
    pos = MLPPredictor(p, "eps", 2, hidden=16, depth=1, num_classes=3).double()
    neg = MLPPredictor(p, "eps", 2, hidden=16, depth=1, num_classes=3).double()
    x = torch.randn(5, 2, generator=_g(3), dtype=F64)
    t, c = 420.0, torch.tensor([0, 1, 2, 0, 1])
    guided = GuidedPredictor(pos, 3.0, negative=neg, uncond=c)
    torch.testing.assert_close(guided(x, t, c), npo_guided_eps(pos(x, t, c), neg(x, t, c), 3.0))
    with pytest.raises(ValueError, match="eps_pos"):
        npo_guided_eps(torch.zeros(2, 2), torch.zeros(3, 2), 1.0)
