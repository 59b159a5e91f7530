"""Throughput of our DDIM loop vs a loop over diffusers' DDIMScheduler on the same predictor.

    PYTHONPATH=. python bench/bench_sampling.py [--repeats 5] [--threads N]

Two workloads: a 2D ``MLPPredictor`` (eps, DDPM T = 1000) on 10k points for 50 steps, and the tiny
``UNet2DModel`` (3x32x32) at batch 16 for 20 steps; a third row times the loops alone (a trivial
predictor on 16 points), i.e. each sampler's per-step overhead. Both loops use the same grid (diffusers' default
"leading" spacing; ours from ``samplers.subsequence``), eta = 0, float32, ``torch.no_grad``. Each time
is the best of ``--repeats`` interleaved runs after one warm-up; the outputs of the two loops are compared so the
ratio is between equal computations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import DDIMScheduler  # noqa: E402

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet  # noqa: E402
from dstar_edu.predictors import FunctionPredictor, MLPPredictor  # noqa: E402
from dstar_edu.process import DDPM  # noqa: E402
from dstar_edu.samplers.common import subsequence  # noqa: E402
from dstar_edu.samplers.diffusion import ddim  # noqa: E402


def ours_loop(pred, x, n_steps):
    return ddim(pred, subsequence(1000, n_steps, "leading"), x, eta=0.0)


def diffusers_loop(pred, x, n_steps):
    sch = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    sch.set_timesteps(n_steps)
    for k in sch.timesteps:
        eps = pred(x, float(k) + 1.0)                # handbook t = diffusers timestep + 1
        x = sch.step(eps, k, x).prev_sample
    return x


def best_times(fns, repeats):
    """Best-of-``repeats`` wall time of each function, runs interleaved (A B A B ...) after a warm-up so that
    background load hits both alike; returns the times and the last outputs."""
    outs = [fn() for fn in fns]                      # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times], outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = DDPM(1000)
    mlp = MLPPredictor(p, "eps", dim=2).eval()
    unet = DiffusersUNetPredictor(tiny_unet(), p, "epsilon").eval()
    g = torch.Generator().manual_seed(0)
    null = FunctionPredictor(lambda x, t, cond: 0.1 * x, p, "eps")  # isolates the loop's own cost
    cases = [("2D MLP, 10k points, 50 steps", mlp, torch.randn(10_000, 2, generator=g), 50),
             ("tiny UNet 3x32x32, batch 16, 20 steps", unet, torch.randn(16, 3, 32, 32, generator=g), 20),
             ("loop only (eps = 0.1 x), 16 points, 50 steps", null, torch.randn(16, 2, generator=g), 50)]
    rows = []
    with torch.no_grad():
        for name, pred, x, n in cases:
            (t_ours, t_diff), (y_ours, y_diff) = best_times(
                [lambda: ours_loop(pred, x, n), lambda: diffusers_loop(pred, x, n)], args.repeats)
            diff = float((y_ours - y_diff).abs().max() / y_diff.abs().max())
            rows.append((name, t_ours, t_diff, t_ours / t_diff, diff))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}, "
          f"best of {args.repeats}")
    head = f"{'workload':46} {'ours (s)':>9} {'diffusers (s)':>14} {'ours/diffusers':>15} {'max rel diff':>13}"
    print(head)
    print("-" * len(head))
    for name, a, b, r, d in rows:
        print(f"{name:46} {a:9.4f} {b:14.4f} {r:15.2f} {d:13.2e}")
    return rows


if __name__ == "__main__":
    main()
