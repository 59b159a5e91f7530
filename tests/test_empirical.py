"""The chunked exact empirical teacher against a direct formula with explicit (batch, N, D) differences."""
import math

import pytest
import torch

from dstar_edu.process import DDPM, VE
from toy_data.mixtures import EmpiricalDistribution

F64 = torch.float64


def _direct(points, x, a, s, logw=None):
    """log p, score and posterior mean written out from the definition (1/N) sum_i N(a x_i, s^2 I)."""
    N, D = points.shape[0], points[0].numel()
    diff = x.reshape(len(x), 1, D) - a * points.reshape(1, N, D)           # (B, N, D)
    logit = -0.5 * (diff ** 2).sum(-1) / s ** 2 + (math.log(1 / N) if logw is None else logw)
    log_p = torch.logsumexp(logit, 1) - 0.5 * D * math.log(2 * math.pi * s ** 2)
    r = torch.softmax(logit, 1)
    post = r @ points.reshape(N, D)
    score = -(r[:, :, None] * diff).sum(1) / s ** 2
    return log_p, score, post, r


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 100])
def test_chunked_sums_equal_the_direct_formula(chunk):
    g = torch.Generator().manual_seed(0)
    points = torch.rand(10, 3, 4, 4, generator=g, dtype=F64) * 2 - 1
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)
    p = DDPM()
    dist = EmpiricalDistribution(points, process=p, chunk_size=chunk)
    a, s = float(p.alpha(150)), float(p.sigma(150))
    log_p, score, post, r = _direct(points, x, a, s)
    # float64 round-off of sums over N*D = 480 terms of size <= 1e2: 1e-12 relative is a generous bound
    torch.testing.assert_close(dist.log_prob(x, 150), log_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.score(x, 150).reshape(5, -1), score, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(dist.posterior_mean(x, 150).reshape(5, -1), post, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.responsibilities(x, 150), r, rtol=1e-12, atol=1e-13)


def test_score_is_the_gradient_of_log_prob_and_conditioning_works():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(12, 6, generator=g, dtype=F64)
    labels = torch.arange(12) % 3
    p = VE(80.0)
    dist = EmpiricalDistribution(points, process=p, labels=labels, chunk_size=5)
    x = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(dist.log_prob(x, 0.7).sum(), x)
    torch.testing.assert_close(dist.score(x, 0.7), grad, rtol=1e-10, atol=1e-12)
    logw = torch.where(labels == 2, math.log(1 / 4), -math.inf).expand(4, 12)
    _, score, post, _ = _direct(points, x.detach(), 1.0, 0.7, logw)
    torch.testing.assert_close(dist.posterior_mean(x.detach(), 0.7, cond=2), post, rtol=1e-12, atol=1e-12)
    only = dist.conditional(2)
    torch.testing.assert_close(only.score(x.detach(), 0.7), score, rtol=1e-11, atol=1e-12)
    assert only.K == 4 and only._sq_norms.shape == (4,)


def test_float32_points_are_not_copied_and_float64_queries_stay_exact():
    g = torch.Generator().manual_seed(2)
    points32 = torch.rand(9, 3, 8, 8, generator=g) * 2 - 1
    dist = EmpiricalDistribution(points32, process=DDPM(), chunk_size=4)
    assert dist.means.data_ptr() == points32.data_ptr()                   # a view, not a copy
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
    _, _, post, _ = _direct(points32.double(), x, float(DDPM().alpha(400)), float(DDPM().sigma(400)))
    torch.testing.assert_close(dist.posterior_mean(x, 400).reshape(3, -1), post, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist.mean(), points32.double().mean(0), rtol=1e-12, atol=1e-12)


def test_far_queries_do_not_underflow():
    """A query far from every point: all exp(logit) underflow without the running max; the result is finite."""
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64)
    dist = EmpiricalDistribution(points, process=VE(80.0), chunk_size=1)
    x = torch.tensor([[400.0, 0.0]], dtype=F64)
    post = dist.posterior_mean(x, 0.05)                                   # the nearest point wins outright
    torch.testing.assert_close(post, torch.tensor([[1.0, 0.0]], dtype=F64))
    assert torch.isfinite(dist.log_prob(x, 0.05)).all()


@pytest.mark.parametrize("points, kwargs, message", [
    (torch.zeros(0, 3), {}, r"points has no components \(shape \(0, 3\)\)"),
    (torch.zeros(3), {}, r"points must have shape \(K, \*event_shape\)"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), {}, r"points must be finite; points\[1\] contains NaN"),
    (torch.tensor([[0.0, float("inf")]]), {}, r"points must be finite; points\[0\] contains NaN or inf"),
    (torch.zeros(2, 2), {"chunk_size": 0}, r"chunk_size=0 must be a positive integer"),
    (torch.zeros(2, 2), {"labels": [0]}, r"labels has 1 entries but there are K=2"),
])
def test_bad_points_are_refused(points, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmpiricalDistribution(points, process=DDPM(), **kwargs)
