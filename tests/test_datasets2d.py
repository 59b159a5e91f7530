import math

import pytest
import torch

from toy_data import datasets2d as d2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(d2.DATASETS))
def test_seeded_reproducibility_and_dtype(name):
    f = d2.DATASETS[name]
    a = f(500, generator=gen(1))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, f(500, generator=gen(1)))
    assert not torch.allclose(a, f(500, generator=gen(2)))
    b = d2.sample_dataset(name, 500, generator=gen(1), dtype=torch.float64)
    assert b.dtype == torch.float64
    assert torch.equal(b.float(), a)  # drawn in float64, then cast
    assert torch.isfinite(a).all() and a.abs().max() < 3.0
    torch.manual_seed(3)
    c = f(10)
    torch.manual_seed(3)
    assert torch.equal(c, f(10))  # generator=None uses the global RNG


@pytest.mark.parametrize("name", sorted(d2.DATASETS))
@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, None])
def test_bad_n_raises(name, bad):
    with pytest.raises(ValueError, match=r"\bn\b.*positive integer"):
        d2.DATASETS[name](bad, generator=gen())


def test_sample_dataset_unknown_name():
    with pytest.raises(ValueError, match="name") as info:
        d2.sample_dataset("moons", 10)
    for name in d2.DATASETS:
        assert name in str(info.value)


def _check_mixture(x, means, std, n):
    dist = torch.cdist(x.double(), means)
    nearest = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() < 6 * std
    k = len(means)
    counts = torch.bincount(nearest, minlength=k).double()
    p = 1.0 / k
    assert (counts - n * p).abs().max() < 5 * math.sqrt(n * p * (1 - p))
    resid = x.double() - means[nearest]
    assert resid.mean(dim=0).abs().max() < 5 * std / math.sqrt(n)
    s = resid.std()  # over all 2n coordinates
    assert abs(s - std) < 5 * std / math.sqrt(2 * 2 * n)


def test_eight_gaussians_statistics():
    means = d2.eight_gaussians_means()
    assert means.shape == (8, 2) and means.dtype == torch.float64
    assert torch.allclose(means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert torch.allclose(means[2], torch.tensor([0.0, 2.0], dtype=torch.float64), atol=1e-12)
    n = 16000
    _check_mixture(d2.eight_gaussians(n, generator=gen(0), dtype=torch.float64), means, 0.1, n)


def test_grid25_statistics():
    means = d2.grid25_means()
    assert means.shape == (25, 2)
    assert set(means.flatten().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert len({tuple(m) for m in means.tolist()}) == 25
    n = 25000
    _check_mixture(d2.grid25(n, generator=gen(0), dtype=torch.float64), means, 0.05, n)


def test_ring_statistics():
    n = 20000
    x = d2.ring(n, generator=gen(0), dtype=torch.float64)
    r = x.norm(dim=1)
    assert abs(r.mean() - 1.5) < 5 * 0.05 / math.sqrt(n)
    assert abs(r.std() - 0.05) < 5 * 0.05 / math.sqrt(2 * n)
    theta = torch.atan2(x[:, 1], x[:, 0])
    # uniform angle: E[cos], E[sin] = 0 with variance 1/2 per sample
    assert theta.cos().mean().abs() < 5 / math.sqrt(2 * n)
    assert theta.sin().mean().abs() < 5 / math.sqrt(2 * n)
    quadrant = torch.bincount(((theta + math.pi) // (math.pi / 2)).long().clamp(max=3), minlength=4)
    assert (quadrant.double() - n / 4).abs().max() < 5 * math.sqrt(n * 0.25 * 0.75)


def test_two_moons_geometry():
    n = 10000
    x = d2.two_moons(n, generator=gen(0), dtype=torch.float64)
    t = torch.linspace(0, math.pi, 5001, dtype=torch.float64)
    upper = torch.stack([t.cos() - 0.5, t.sin() - 0.25], dim=1)
    lower = torch.stack([0.5 - t.cos(), 0.25 - t.sin()], dim=1)
    arcs = d2.TWO_MOONS_SCALE * torch.cat([upper, lower])
    dist = torch.cdist(x, arcs)
    assert dist.min(dim=1).values.max() < 6 * 0.05  # every point is near one of the half circles
    on_upper = dist[:, :5001].min(dim=1).values < dist[:, 5001:].min(dim=1).values
    # n // 2 points per moon, up to the few that sit where the noisy moons come close
    assert abs(on_upper.sum().item() - n // 2) < 0.01 * n
    # centred: the clean moons have mean exactly 0; coordinates have std < 1.5
    assert x.mean(dim=0).abs().max() < 5 * 1.5 / math.sqrt(n)
    assert x[:, 0].min() > -2.3 and x[:, 0].max() < 2.3
    assert x[:, 1].min() > -1.3 and x[:, 1].max() < 1.3
    assert x[:, 0].min() < -1.9 and x[:, 0].max() > 1.9  # spans about [-2, 2]


def test_swiss_roll_geometry():
    n = 2000
    x = d2.swiss_roll(n, generator=gen(0), dtype=torch.float64)
    t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 20001, dtype=torch.float64)
    curve = d2.SWISS_ROLL_SCALE * torch.stack([t * t.cos(), t * t.sin()], dim=1)
    dist = torch.cdist(x, curve)
    assert dist.min(dim=1).values.max() < 6 * 0.05  # windings are ~0.89 apart
    # t ~ U(1.5pi, 4.5pi): parameter of the nearest curve point has the uniform mean and variance
    t_hat = t[dist.argmin(dim=1)]
    width = 3 * math.pi
    assert abs(t_hat.mean() - 3 * math.pi) < 5 * width / math.sqrt(12 * n) + 0.05
    assert x.abs().max() < 2.3


def test_checkerboard_uniform_on_dark_squares():
    n = 16000
    x = d2.checkerboard(n, generator=gen(0), dtype=torch.float64)
    assert d2.checkerboard_dark_mask(x).all()
    assert x.min() >= -2.0 and x.max() <= 2.0
    idx = torch.floor(x + 2).long()
    assert ((idx[:, 0] + idx[:, 1]) % 2 == 0).all()
    cell = idx[:, 0] * 4 + idx[:, 1]
    counts = torch.bincount(cell, minlength=16).double()
    dark = [i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    assert counts[dark].sum() == n and len(dark) == 8
    p = 1 / 8
    assert (counts[dark] - n * p).abs().max() < 5 * math.sqrt(n * p * (1 - p))
    chi2 = ((counts[dark] - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 30  # 7 degrees of freedom; P(chi2_7 > 30) ~ 1e-4
    # uniform within each square: fractional part has mean 1/2 and variance 1/12
    frac = x + 2 - idx
    assert (frac.mean(dim=0) - 0.5).abs().max() < 5 * math.sqrt(1 / 12 / n)
    assert (frac.var(dim=0) - 1 / 12).abs().max() < 5 * math.sqrt(1 / 180 / n)


def test_checkerboard_dark_mask():
    pts = torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [0.5, 0.5], [1.5, 0.5], [2.5, 2.5]])
    assert d2.checkerboard_dark_mask(pts).tolist() == [True, False, True, False, False]
