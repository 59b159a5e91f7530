"""Predictors: conversion through ``predict``, MLP training on 8 Gaussians, class conditioning."""
import math

import numpy as np
import pytest
import torch

from dstar_edu.predictors import FunctionPredictor, MLPPredictor, sinusoidal_embedding
from dstar_edu.process import DDPM, RectifiedFlow, VP
from toy_data.datasets2d import eight_gaussians

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ddpm_linear_ab(t):
    """alpha_bar at integer handbook t from a numpy cumulative product of (1 - beta), beta 1e-4..0.02."""
    ab = np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))])
    return ab[np.asarray(t, dtype=int)]


def test_function_predictor_predict_x0_is_eq7():
    p = DDPM(1000)
    g = gen(0)
    x_t = torch.randn(5, 2, generator=g, dtype=F64)
    known_eps = torch.randn(5, 2, generator=g, dtype=F64)
    calls = []
    pred = FunctionPredictor(lambda x, t, c: (calls.append(c), known_eps)[1], p, "eps")
    ts = np.array([1, 10, 100, 500, 1000])
    ab = torch.tensor(ddpm_linear_ab(ts))[:, None]
    eq7 = (x_t - torch.sqrt(1 - ab) * known_eps) / torch.sqrt(ab)      # handbook Eq. 7
    # float64, one division by sqrt(ab) >= 0.006: ~1e-13 relative
    torch.testing.assert_close(pred.predict("x0", x_t, torch.tensor(ts, dtype=F64), cond="c"), eq7,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pred.predict("score", x_t, torch.tensor(ts, dtype=F64)),
                               -known_eps / torch.sqrt(1 - ab), rtol=1e-10, atol=1e-10)
    assert calls == ["c", None]                                        # cond is passed through


def test_mlp_predict_converts_its_output():
    torch.manual_seed(0)
    p = VP()
    mlp = MLPPredictor(p, "eps", dim=2, hidden=32, depth=2).double()
    x_t = torch.randn(6, 2, generator=gen(1), dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=F64)
    with torch.no_grad():
        eps_hat = mlp(x_t, t)
        ab = torch.exp(-(0.1 * t + 19.9 * t ** 2 / 2))[:, None]          # VP linear closed form
        torch.testing.assert_close(mlp.predict("x0", x_t, t), (x_t - torch.sqrt(1 - ab) * eps_hat) / torch.sqrt(ab),
                                   rtol=1e-10, atol=1e-10)
        v_bar = torch.sqrt(ab) * eps_hat - torch.sqrt(1 - ab) * (x_t - torch.sqrt(1 - ab) * eps_hat) / torch.sqrt(ab)
        torch.testing.assert_close(mlp.predict("v_bar", x_t, t), v_bar, rtol=1e-10, atol=1e-10)
        # a scalar t gives the same as a constant batch of times
        torch.testing.assert_close(mlp(x_t, 0.4), mlp(x_t, torch.full((6,), 0.4, dtype=F64)), rtol=0, atol=0)


def test_sinusoidal_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 250.0], dtype=F64)
    emb = sinusoidal_embedding(t, 8)
    freqs = 10_000.0 ** (-np.arange(4) / 4)
    ref = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], 1)
    np.testing.assert_allclose(emb.numpy(), ref, rtol=1e-12, atol=1e-12)


def _loss(model, p, x0, t, eps):
    x_t, _ = p.q_sample(x0, t, eps=eps)
    return ((model(x_t, t) - eps) ** 2).sum(1)


def test_mlp_trains_on_eight_gaussians():
    """Adam on the eps-prediction loss E|eps_hat - eps|^2 beats the best constant predictor.

    Reference: eps ~ N(0, I_2) is independent of the constant, so the best constant (zero) has loss
    E|eps|^2 = 2. The trained model must reach < 0.7 * 2 on fresh held-out samples with a 5-s.e. margin.
    """
    torch.manual_seed(0)
    p = DDPM(1000)
    model = MLPPredictor(p, "eps", dim=2, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = gen(2)
    for _ in range(300):
        x0 = eight_gaussians(256, generator=g)
        t = torch.randint(1, 1001, (256,), generator=g).float()
        eps = torch.randn(256, 2, generator=g)
        loss = _loss(model, p, x0, t, eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gh = gen(3)                                        # held-out: a different stream
    n = 20_000
    with torch.no_grad():
        x0 = eight_gaussians(n, generator=gh)
        t = torch.randint(1, 1001, (n,), generator=gh).float()
        eps = torch.randn(n, 2, generator=gh)
        per = _loss(model, p, x0, t, eps).double()
        zero = (eps.double() ** 2).sum(1)
    est, se = per.mean().item(), per.std().item() / math.sqrt(n)
    print(f"held-out loss {est:.4f} +- {se:.4f} (s.e.), zero predictor {zero.mean().item():.4f}, reference 2")
    # sanity of the reference itself: the zero predictor's held-out loss is 2 within 5 s.e.
    assert abs(zero.mean().item() - 2) <= 5 * zero.std().item() / math.sqrt(n)
    assert est + 5 * se < 0.7 * 2, (est, se)


def test_class_conditional_mlp():
    torch.manual_seed(0)
    p = RectifiedFlow()
    mlp = MLPPredictor(p, "velocity", dim=2, hidden=32, depth=2, num_classes=3)
    x = torch.randn(4, 2, generator=gen(4))
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    with torch.no_grad():
        # cond=None means the "unconditional" label num_classes (classifier-free guidance slot)
        torch.testing.assert_close(mlp(x, t, None), mlp(x, t, torch.full((4,), 3)), rtol=0, atol=0)
        # per-sample labels act row by row
        cond = torch.tensor([0, 2, 1, 0])
        rows = torch.cat([mlp(x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(mlp(x, t, cond), rows, rtol=1e-6, atol=1e-6)   # float32 batch vs rows
        # a scalar label broadcasts to the batch
        torch.testing.assert_close(mlp(x, t, 2), mlp(x, t, torch.full((4,), 2)), rtol=0, atol=0)
        # the label enters additively through its embedding: the difference between two labels is the
        # network's response to a shift of the hidden state by emb[a] - emb[b]; with the class
        # embedding zeroed every label gives the same output
        assert (mlp(x, t, 0) - mlp(x, t, 1)).abs().max() > 1e-4
        mlp.class_emb.weight.zero_()
        torch.testing.assert_close(mlp(x, t, 0), mlp(x, t, None), rtol=0, atol=0)


def test_mlp_rejects_wrong_input():
    mlp = MLPPredictor(VP(), "eps", dim=2, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"x_t has shape \(4, 3\); this MLP expects \(batch, 2\)"):
        mlp(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"t=1\.5 is outside the time domain \[0, 1\]"):
        mlp(torch.zeros(4, 2), 1.5)
    with pytest.raises(TypeError, match="process must be a dstar_edu Process"):
        MLPPredictor("vp", "eps")
