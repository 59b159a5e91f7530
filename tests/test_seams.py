"""The core seams: Process.at (one coefficients value), Predictor.denoise, the DDPM posterior, the DDIM step and
the objectives' noisy batch, each against an independent reference."""
import math

import pytest
import torch

from dstar_edu.conversions import to_x0_eps
from dstar_edu.objectives.common import NoisyBatch, noisy_batch, reduce_loss, sample_weight
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VE, VP, Coefficients, RectifiedFlow, TrigFlow
from dstar_edu.samplers.diffusion import ddim_sigma, ddim_update, ddpm_posterior
from toy_data.mixtures import EmpiricalDistribution, GaussianMixture

F64 = torch.float64
PROCESSES = [DDPM(1000), VP(), VP("cosine"), VE(), RectifiedFlow(), TrigFlow(0.5)]


def _closed_forms(p, t):
    """alpha, sigma and their derivatives written out per process (independent of process.py's kernels)."""
    t = torch.as_tensor(t, dtype=F64)
    if isinstance(p, VE):
        return torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t)
    if isinstance(p, RectifiedFlow):
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if isinstance(p, TrigFlow):
        return torch.cos(t), 0.5 * torch.sin(t), -torch.sin(t), 0.5 * torch.cos(t)
    assert isinstance(p, VP) and p.schedule == "linear"
    lab = -(0.1 * t + 0.5 * 19.9 * t * t)
    dlab = -(0.1 + 19.9 * t)
    a, s = torch.exp(0.5 * lab), torch.sqrt(1 - torch.exp(lab))
    return a, s, 0.5 * dlab * a, -0.5 * torch.exp(lab) * dlab / s


@pytest.mark.parametrize("p", [VP(), VE(), RectifiedFlow(), TrigFlow(0.5)], ids=repr)
def test_at_matches_closed_forms_and_broadcasts(p):
    t = torch.linspace(p.t_min, p.t_max, 9, dtype=F64)[1:-1]
    x = torch.zeros(7, 3, 4, 4, dtype=F64)
    c = p.at(t, x)
    assert isinstance(c, Coefficients) and c.alpha.shape == (7, 1, 1, 1) and c.t.dtype == F64
    for got, ref in zip((c.alpha, c.sigma, c.d_alpha, c.d_sigma), _closed_forms(p, t)):
        torch.testing.assert_close(got.flatten(), ref, rtol=1e-13, atol=1e-15)   # float64 round-off
    torch.testing.assert_close(c.alpha_bar.flatten(), (c.alpha ** 2 / (c.alpha ** 2 + c.sigma ** 2)).flatten(),
                               rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(c.edm_sigma.flatten(), (c.sigma / c.alpha).flatten(), rtol=0, atol=0)


def test_at_casts_once_from_float64_time_and_splits():
    p = DDPM(1000)
    x32 = torch.zeros(3, 2, dtype=torch.float32)
    c = p.at(601, x32)
    assert c.alpha.dtype == torch.float32 and c.alpha.ndim == 0 and c.t.dtype == F64 and c.t.item() == 601
    assert c.alpha.item() == p.alpha(torch.tensor(601.0, dtype=F64)).float().item()   # float64 then cast once
    grid = p.at(torch.tensor([1000.0, 500.0, 0.0], dtype=F64))
    parts = grid.split()
    assert [q.t.item() for q in parts] == [1000.0, 500.0, 0.0]
    assert [q.alpha.item() for q in parts] == grid.alpha.tolist()
    assert parts[2].sigma.item() == 0.0 and math.isinf(parts[2].d_sigma.item())     # VP: d sigma = inf at t = 0
    with pytest.raises(ValueError, match="outside the time domain"):
        p.at(1001)
    with pytest.raises(ValueError, match="split"):
        p.at(torch.tensor([1.0, 2.0]), torch.zeros(2, 3)).split()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "velocity", "score"])
def test_predictor_denoise_is_the_conversion_of_one_evaluation(prediction):
    p = VP()
    torch.manual_seed(0)
    net = MLPPredictor(p, prediction, dim=2, hidden=16, depth=1).double()
    x, t = torch.randn(5, 2, dtype=F64), torch.rand(5, dtype=F64) * 0.9 + 0.05
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    x0, eps = net.denoise(x, t)
    assert len(calls) == 1
    # independent reference: x_t = alpha x0 + sigma eps must hold, and the raw output converts back
    a, s, _, _ = _closed_forms(p, t)
    torch.testing.assert_close(a[:, None] * x0 + s[:, None] * eps, x, rtol=1e-12, atol=1e-12)
    ref = to_x0_eps(prediction, net(x, t), x, t, p)
    torch.testing.assert_close(x0, ref[0], rtol=0, atol=0)


def test_exact_models_override_denoise_with_the_posterior_mean():
    p = RectifiedFlow()
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64)
    for dist in (GaussianMixture(means, 0.3, process=p), EmpiricalDistribution(means, process=p)):
        x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
        x0, eps = dist.denoise(x, 1.0)                       # alpha(1) = 0: defined for the exact model only
        torch.testing.assert_close(x0, dist.mean().expand(4, 2), rtol=1e-12, atol=1e-12)   # E[x0 | pure noise]
        torch.testing.assert_close(eps, x, rtol=0, atol=0)  # sigma(1) = 1
        x0b, _ = dist.denoise(x, torch.full((4,), 0.4, dtype=F64))
        torch.testing.assert_close(x0b, dist.posterior_mean(x, 0.4), rtol=0, atol=0)


def test_ddpm_posterior_is_gaussian_conditioning_on_a_subsequence():
    p = DDPM(1000)
    ab_t, ab_s = p.alpha_bars[700], p.alpha_bars[400]
    # conditioning: x_s = sqrt(ab_s) x0 + sqrt(1-ab_s) e1, x_t = sqrt(ab_t/ab_s) x_s + sqrt(1-ab_t/ab_s) e2
    r = ab_t / ab_s
    cov_st = torch.sqrt(r) * (1 - ab_s)                      # Cov(x_s, x_t | x0)
    c_xt_ref = cov_st / (1 - ab_t)
    c_x0_ref = torch.sqrt(ab_s) - c_xt_ref * torch.sqrt(ab_t)
    var_ref = (1 - ab_s) - cov_st ** 2 / (1 - ab_t)
    c_x0, c_xt, var = ddpm_posterior(ab_t, ab_s)
    for got, ref in ((c_x0, c_x0_ref), (c_xt, c_xt_ref), (var, var_ref)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-15)
    floats = ddpm_posterior(ab_t.item(), ab_s.item())
    assert all(isinstance(v, float) for v in floats)
    torch.testing.assert_close(torch.tensor(floats, dtype=F64), torch.stack([c_x0, c_xt, var]), rtol=1e-15, atol=0)
    assert ddim_sigma(ab_t.item(), ab_s.item(), 1.0) == math.sqrt(var.item())


def test_ddim_update_eq14_and_its_deterministic_case():
    g = torch.Generator().manual_seed(2)
    x0, eps, z = (torch.randn(3, 2, dtype=F64, generator=g) for _ in range(3))
    ab_p, sig = 0.6, 0.3
    out = ddim_update(x0, eps, math.sqrt(ab_p), 1 - ab_p, sig, z)
    ref = math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p - sig ** 2) * eps + sig * z
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=1e-15)
    p, t = TrigFlow(0.5), torch.tensor([0.3, 1.2, 0.0], dtype=F64)
    c = p.at(t, x0)
    # sigma = 0: the deterministic step is the forward map with the predicted noise (Eq. 21 / Eq. 6)
    torch.testing.assert_close(ddim_update(x0, eps, c.alpha, c.sigma ** 2), p.q_sample(x0, t, eps=eps)[0],
                               rtol=0, atol=0)


def test_noisy_batch_and_shared_pieces():
    p = VE()
    x0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    nb = noisy_batch(x0, p, 2.0, generator=torch.Generator().manual_seed(6))
    eps = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    assert isinstance(nb, NoisyBatch) and nb.t.shape == (4,)
    torch.testing.assert_close(nb.eps, eps, rtol=0, atol=0)
    torch.testing.assert_close(nb.x_t, x0 + 2.0 * eps, rtol=0, atol=0)        # VE: alpha = 1, sigma = t
    with pytest.raises(ValueError, match="sigma"):
        noisy_batch(x0, p, 0.0)
    w = sample_weight(lambda t: t ** 2, nb.t, 4, F64)
    assert w.tolist() == [4.0] * 4
    assert reduce_loss(torch.tensor([1.0, 3.0]), "mean", "x").item() == 2.0
    with pytest.raises(FloatingPointError, match="not finite"):
        reduce_loss(torch.tensor([1.0, float("nan")]), "sum", "x")
    with pytest.raises(ValueError, match="reduction="):
        reduce_loss(torch.tensor([1.0]), "median", "x")


def test_duck_typed_predictor_still_denoises_in_samplers():
    from dstar_edu.samplers.diffusion import denoise
    p = VE()

    class Duck(torch.nn.Module):      # not a Predictor subclass: .process, .prediction and a forward
        process, prediction = p, "x0"

        def forward(self, x, t, cond=None):
            return 0.5 * x

    x = torch.ones(2, 2, dtype=F64)
    x0, eps = denoise(Duck(), x, 2.0)
    torch.testing.assert_close(x0, 0.5 * x)
    torch.testing.assert_close(eps, (x - 0.5 * x) / 2.0)
    assert FunctionPredictor(lambda x, t, c: 0.5 * x, p, "x0").denoise(x, 2.0)[1].tolist() == eps.tolist()
