"""The training loop (dstar_edu.training) and what it trains: closed forms for the loop's own arithmetic
(EMA, learning-rate schedule), NaN handling that leaves the weights untouched, and trained 2D models
measured against data (sliced Wasserstein noise floor) and against the exact 1-rectified flow."""
import math

import pytest
import torch

from dstar_edu.metrics import sliced_wasserstein, sw_noise_floor
from dstar_edu.objectives import flow_matching_loss
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import RectifiedFlow
from dstar_edu.training import EMA, cpu_threads, train, train_2d, training_steps
from toy_data.datasets2d import eight_gaussians
from toy_data.mixtures import eight_gaussians_mixture

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def quadratic_problem():
    w = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    target = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    return w, (lambda step, g: ((w - target) ** 2).sum())


def test_ema_matches_its_closed_form():
    """With the source frozen at p after the first update, ema_k = p + decay^k (p0 - p)."""
    model = torch.nn.Linear(2, 2).double()
    ema = EMA(model, decay=0.9)
    p0 = [q.detach().clone() for q in ema.model.parameters()]
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)
    for _ in range(7):
        ema.update()
    for q0, q, qe in zip(p0, model.parameters(), ema.model.parameters()):
        torch.testing.assert_close(qe, q + 0.9 ** 7 * (q0 - q), rtol=1e-12, atol=1e-14)
    assert not any(q.requires_grad for q in ema.model.parameters())
    # warm-up: the k-th update uses min(decay, (1 + k) / (10 + k)), so ema_k - p = prod_k d_k (p0 - p)
    warm = EMA(torch.nn.Linear(2, 2).double(), decay=0.9, warmup=True)
    q0 = [q.detach().clone() for q in warm.model.parameters()]
    with torch.no_grad():
        for q in warm.source.parameters():
            q.mul_(-2.0)
    for _ in range(30):
        warm.update()
    factor = math.prod(min(0.9, (1 + k) / (10 + k)) for k in range(30))
    for a, q, qe in zip(q0, warm.source.parameters(), warm.model.parameters()):
        torch.testing.assert_close(qe, q + factor * (a - q), rtol=1e-12, atol=1e-14)


def test_cosine_schedule_with_warmup_and_reproducibility():
    w, loss_fn = quadratic_problem()
    recs = list(training_steps(loss_fn, [w], 60, 0.3, lr_schedule="cosine", warmup=4))
    expected = [0.3 * min(1.0, (k + 1) / 4) * 0.5 * (1 + math.cos(math.pi * k / 60)) for k in range(60)]
    assert [r.lr for r in recs] == pytest.approx(expected, rel=1e-12)
    w2, loss_fn2 = quadratic_problem()
    recs2 = list(training_steps(loss_fn2, [w2], 60, 0.3, lr_schedule="cosine", warmup=4))
    assert [r.loss for r in recs] == [r.loss for r in recs2]
    assert recs[-1].loss < 1e-2 * recs[0].loss


def test_nan_loss_stops_before_the_update():
    """FloatingPointError names the step; the weights are those after the last good step."""
    w, good = quadratic_problem()
    snapshot = {}

    def loss_fn(step, g):
        if step == 3:
            snapshot["w"] = w.detach().clone()
            return w.sum() * float("nan")
        return good(step, g)
    with pytest.raises(FloatingPointError, match="step 3"):
        train(loss_fn, [w], 10, 0.1, progress=False)
    torch.testing.assert_close(w.detach(), snapshot["w"], rtol=0, atol=0)


def test_nan_gradient_stops_before_the_update():
    w = torch.nn.Parameter(torch.ones(2, dtype=F64))

    def loss_fn(step, g):  # finite loss, infinite gradient: d sqrt(x)/dx at 0
        return torch.sqrt(w - 1.0).sum()
    with pytest.raises(FloatingPointError, match="gradient norm is inf at step 0"):
        train(loss_fn, [w], 5, 0.1, progress=False)
    torch.testing.assert_close(w.detach(), torch.ones(2, dtype=F64))


def test_callback_stops_early_and_ema_is_updated_each_step():
    model = torch.nn.Linear(2, 1).double()
    ema = EMA(model, 0.5)
    x = torch.randn(16, 2, generator=gen(0), dtype=F64)
    losses = train(lambda s, g: (model(x) ** 2).mean(), model, 50, 1e-2, progress=False, ema=ema,
                   callback=lambda rec: rec.step == 4)
    assert len(losses) == 5 and ema.num_updates == 5


def test_bad_arguments():
    w, loss_fn = quadratic_problem()
    for kw, msg in [(dict(steps=0), "steps=0"), (dict(lr=-1.0), "lr=-1.0"), (dict(optimizer="sgd"), "optimizer='sgd'"),
                    (dict(lr_schedule="step"), "lr_schedule='step'"), (dict(ema=0.99), "ema must be")]:
        args = dict(steps=5, lr=0.1)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            train(loss_fn, [w], progress=False, **args)
    with pytest.raises(ValueError, match="scalar tensor"):
        train(lambda s, g: w * 1.0, [w], 2, 0.1, progress=False)
    with pytest.raises(ValueError, match="data='moons'"):
        train_2d("moons", steps=1, progress=False)
    with pytest.raises(ValueError, match="objective='ddpm'"):
        train_2d("eight_gaussians", steps=1, objective="ddpm", progress=False)
    with pytest.raises(ValueError, match="threads"):
        with cpu_threads(0):
            pass


def _euler(model, z, n_steps):
    from dstar_edu.samplers.flow import rectified_flow_euler
    with torch.no_grad():
        return rectified_flow_euler(model, torch.linspace(1.0, 0.0, n_steps + 1, dtype=F64), z)


def test_train_2d_rectified_flow_reaches_the_noise_floor():
    """About 2 s of CPU: 1-RF on 8 Gaussians, Euler 50 steps, sliced W2 within 3x the two-sample noise
    floor of 4000 points (an untrained network is far outside it)."""
    model, losses = train_2d("eight_gaussians", "rectified_flow", "velocity", steps=800, batch_size=256, lr=3e-3,
                             hidden=64, depth=2, progress=False, seed=0)
    floor, _ = sw_noise_floor(eight_gaussians, 4000, repeats=5)
    data = eight_gaussians(4000, gen(7)).double()
    z = torch.randn(4000, 2, generator=gen(8), dtype=F64)
    sw = sliced_wasserstein(_euler(model.double(), z, 50), data, generator=gen(9))
    untrained = MLPPredictor(RectifiedFlow(), "velocity", dim=2, hidden=64, depth=2).double()
    sw0 = sliced_wasserstein(_euler(untrained, z, 50), data, generator=gen(9))
    assert sw0 > 3 * floor, (sw0, floor)
    assert sw < 3 * floor, (f"trained SW {sw:.4f} vs noise floor {floor:.4f} "
                            f"(losses {losses[0]:.3f} -> {losses[-1]:.3f})")


def test_reflow_is_straighter_and_better_in_one_or_two_steps():
    """Eq. 28-29: 1-RF is the EXACT rectified-flow velocity of the 8-Gaussian mixture; 2-RF is a small MLP
    trained (flow_matching_loss on fixed pairs) on (noise, 1-RF ODE endpoint). Straightness (Liu et al.)
    S = E int ||(z - x_data) - v(x_t, t)||^2 dt along each flow's own Euler trajectories, and the error
    E||Euler_k(z) - Flow_1(z)||^2 at k = 1, 2 steps for fresh z: both must drop by a large factor."""
    with cpu_threads(1):
        p = RectifiedFlow()
        exact = eight_gaussians_mixture(p)
        fine = torch.linspace(1.0, 0.0, 101, dtype=F64)
        from dstar_edu.samplers.flow import rectified_flow_euler
        z = torch.randn(4000, 2, generator=gen(10), dtype=F64)
        x1 = rectified_flow_euler(exact, fine, z)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = MLPPredictor(p, "velocity", dim=2, hidden=64, depth=2).double()

        def loss_fn(step, g):
            idx = torch.randint(0, 4000, (256,), generator=g)
            return flow_matching_loss(model, x1[idx], eps=z[idx], generator=g)
        train(loss_fn, model, 600, 3e-3, generator=gen(11), progress=False, lr_schedule="cosine")
        model.eval()

        def straightness(pred, zz, grid):
            with torch.no_grad():
                x_end, traj = rectified_flow_euler(pred, grid, zz, return_trajectory=True)
                s = 0.0
                for i in range(len(grid) - 1):
                    v = pred.predict("velocity", traj[i], grid[i].expand(zz.shape[0]))
                    s = s + (grid[i] - grid[i + 1]) * ((zz - x_end - v) ** 2).sum(1)
            return float(s.mean())
        zt = torch.randn(1000, 2, generator=gen(12), dtype=F64)
        ref = rectified_flow_euler(exact, fine, zt)
        s1, s2 = straightness(exact, zt, fine[::2]), straightness(model, zt, fine[::2])
        errs = {k: (float(((_euler(exact, zt, k) - ref) ** 2).sum(1).mean()),
                    float(((_euler(model, zt, k) - ref) ** 2).sum(1).mean())) for k in (1, 2)}
    assert s2 < 0.1 * s1, (s1, s2)
    for k, (e1, e2) in errs.items():
        assert e2 < 0.2 * e1, (k, e1, e2)
