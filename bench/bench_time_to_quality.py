"""Time to quality on 2D data: CPU seconds of training until samples match the data up to noise.

For each method (DDPM with eps- and v-prediction sampled by 50 DDIM steps, rectified flow sampled by 50
Euler steps, TrigFlow sampled by 50 DDIM-TrigFlow steps, handbook Sec. 2.5.2) and each data set
(8 Gaussians, checkerboard), a ``MLPPredictor`` (128 wide, 3 residual blocks, Adam 2e-3, batch 256) is
trained with ``dstar_edu.training.training_steps`` on the matching objective of
``dstar_edu.objectives``, with an EMA copy of the weights (decay 0.999 with warm-up) used for sampling. At
each check, 10k samples are drawn and their sliced Wasserstein distance (1024 projections) to 10k fresh
data points, averaged over 2 such draws, is compared with the two-sample noise floor (the same distance
between two independent 10k data samples, mean of 5). The clock is the
process CPU time spent in training steps only (single-threaded, so it does not depend on other load
on the machine); sampling for evaluation is excluded. Checks happen at ``first_eval * growth^k`` CPU
seconds (1 s, 1.2 s, 1.44 s, ...: the reported time is resolved to within the factor ``growth``). A run
stops when SW <= ``--factor`` x floor (``reached``) or at ``--cap`` CPU seconds (``not reached``, with
the best ratio seen).

    PYTHONPATH=. python bench/bench_time_to_quality.py            # full table (several minutes)
    PYTHONPATH=. python bench/bench_time_to_quality.py --cap 20 --methods rf --datasets eight_gaussians
    PYTHONPATH=. python bench/bench_time_to_quality.py --json results.json     # with the check histories
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from dstar_edu.metrics import sliced_wasserstein, sw_noise_floor
from dstar_edu.objectives import denoising_loss, flow_matching_loss, trigflow_diffusion_loss
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import DDPM, RectifiedFlow, TrigFlow
from dstar_edu.training import EMA, training_steps
from toy_data.datasets2d import DATASETS

METHODS = ("ddpm_eps", "ddpm_v", "rf", "trigflow")
N_EVAL = 10_000
N_PROJ = 1024
N_DRAWS = 2          # sample sets per check (their SW is averaged: the metric alone fluctuates by ~30%)
EMA_DECAY = 0.999    # samples come from the EMA weights (horizon ~1000 steps, a few CPU seconds)


def build(method: str, data_std: float):
    """(process, prediction, loss(model, x0, g), sample(model, z_standard_normal))."""
    if method in ("ddpm_eps", "ddpm_v"):
        from dstar_edu.samplers.common import subsequence
        from dstar_edu.samplers.diffusion import ddim
        process, prediction = DDPM(1000), ("eps" if method == "ddpm_eps" else "v")
        grid = subsequence(1000, 50)

        def sample(model, z):
            return ddim(model, grid, z)
        return process, prediction, (lambda m, x0, g: denoising_loss(m, x0, generator=g)), sample
    if method == "rf":
        from dstar_edu.samplers.flow import rectified_flow_euler
        grid = torch.linspace(1.0, 0.0, 51, dtype=torch.float64)

        def sample(model, z):
            return rectified_flow_euler(model, grid, z)
        return RectifiedFlow(), "velocity", (lambda m, x0, g: flow_matching_loss(m, x0, generator=g)), sample
    if method == "trigflow":
        from dstar_edu.samplers.flow import trigflow, trigflow_timesteps
        process = TrigFlow(sigma_data=data_std)
        grid = trigflow_timesteps(50)

        def sample(model, z):
            return trigflow(model, grid, data_std * z)
        return process, "trigflow_F", (lambda m, x0, g: trigflow_diffusion_loss(m, x0, generator=g)), sample
    raise ValueError(f"method={method!r} is unknown; allowed: {METHODS}")


def run(method: str, dataset: str, cap: float, factor: float, first_eval: float = 1.0, growth: float = 1.2,
        seed: int = 0) -> dict:
    data_fn = DATASETS[dataset]
    data_std = float(data_fn(N_EVAL, generator=torch.Generator().manual_seed(123)).std())
    floor, floor_std = sw_noise_floor(lambda n, g: data_fn(n, generator=g), N_EVAL, repeats=5,
                                      n_projections=N_PROJ, seed=seed + 7)
    process, prediction, loss, sample = build(method, data_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLPPredictor(process, prediction, dim=2, hidden=128, depth=3)
    ema = EMA(model, EMA_DECAY, warmup=True)
    gen = torch.Generator().manual_seed(seed + 1)
    eval_gen = torch.Generator().manual_seed(seed + 2)

    def loss_fn(step, g):
        return loss(model, data_fn(256, generator=g), g)

    cpu, steps, history, best = 0.0, 0, [], math.inf
    result = {"method": method, "dataset": dataset, "floor": floor, "floor_std": floor_std, "reached": False}
    it = training_steps(loss_fn, model, 10 ** 9, 2e-3, generator=gen, ema=ema)
    next_eval = first_eval
    while cpu < cap:
        start = time.process_time()
        while cpu + (time.process_time() - start) < min(next_eval, cap):
            next(it)
            steps += 1
        cpu += time.process_time() - start
        next_eval *= growth
        sws = []
        with torch.no_grad():
            for _ in range(N_DRAWS):
                x = sample(ema.model, torch.randn(N_EVAL, 2, generator=eval_gen))
                sws.append(sliced_wasserstein(x, data_fn(N_EVAL, generator=eval_gen), N_PROJ, eval_gen))
        sw = sum(sws) / len(sws)
        best = min(best, sw / floor)
        history.append((round(cpu, 2), steps, round(sw / floor, 3)))
        if sw <= factor * floor:
            result.update(reached=True, seconds=cpu, steps=steps, ratio=sw / floor)
            break
    result.update(best_ratio=best, history=history, cpu_seconds_trained=cpu, steps_trained=steps)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--datasets", nargs="+", default=["eight_gaussians", "checkerboard"], choices=sorted(DATASETS))
    ap.add_argument("--cap", type=float, default=120.0, help="CPU seconds of training per run")
    ap.add_argument("--factor", type=float, default=1.5, help="target: SW <= factor x noise floor")
    ap.add_argument("--first-eval", type=float, default=1.0, help="CPU seconds of training before the first check")
    ap.add_argument("--growth", type=float, default=1.2, help="checks at first_eval * growth^k CPU seconds")
    ap.add_argument("--json", default=None, help="write all results (with histories) to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'method':10} {'dataset':16} {'floor':>7} {'result':>22} {'steps':>7} {'SW/floor':>9}", flush=True)
    for dataset in args.datasets:
        for method in args.methods:
            r = run(method, dataset, args.cap, args.factor, args.first_eval, args.growth)
            rows.append(r)
            res = f"{r['seconds']:.1f} s" if r["reached"] else f"not reached ({args.cap:.0f} s)"
            ratio = r.get("ratio", r["best_ratio"])
            print(f"{method:10} {dataset:16} {r['floor']:7.4f} {res:>22} {r['steps_trained']:7d} {ratio:9.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
