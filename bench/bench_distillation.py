"""Benchmark: one-step distillation of the exact 8-Gaussian teacher, time to quality (issue 4).

For SIM (pseudo-Huber, SIM Alg. 2 / Eq. B.13), SiD (alpha = 1.2) and Diff-Instruct: CPU seconds (one thread,
``time.process_time``, evaluation excluded, online-score warm-up included) and generator steps until the
one-step generator's sliced Wasserstein distance to fresh teacher samples is within 1.5x its noise floor
(checked every ``--every`` steps on 2000 samples; the floor is the distance between two independent
2000-samples of the teacher). Then the ratio of the one-step generator's final distance to that of 50-step DDIM
samples from the same exact teacher (final = after the full ``--max-steps`` budget; training does not stop at
the threshold).

Setup (same for the three methods): VP process, ``MLPGenerator(hidden=64)``, online score
``MLPPredictor("v", hidden=64)`` warmed up for 300 steps on the initial generator, batch 256, Adam betas
(0, 0.999), online-score times p_EDM clamped to sigma in [0.002, 80], generator times p_SIM (SIM, DI) and SiD's
own (``p_sid(from_end="min")``: the Karras grid counted from sigma_min, sigma in [0.002, 24.5], as in SiD's
public code; ``--sid-times p_sim`` gives SiD SIM's times instead, with which alpha = 1.2 diverges in 2 of 3 seeds).
Runs that diverge are stopped by the loop's divergence detector (status ``Diverged``).

    PYTHONPATH=. python bench/bench_distillation.py [--lr 3e-4] [--seeds 3] [--max-steps 3000]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

N_EVAL = 2000


def run(method: str, seed: int, lr: float, max_steps: int, every: int, threshold: float, ref: torch.Tensor,
        c: float = 1e-3, sid_times: str = "p_sid", sid_alpha: float = 1.2) -> dict:
    from dstar_edu.distillation import distill
    from dstar_edu.generators import MLPGenerator
    from dstar_edu.metrics import sliced_wasserstein
    from dstar_edu.objectives.distill import (diff_instruct_loss, p_edm, p_sid, p_sim, sid_generator_loss,
                                              sim_generator_loss)
    from dstar_edu.predictors import MLPPredictor
    from dstar_edu.process import VP
    from toy_data.mixtures import eight_gaussians_mixture
    process = VP()
    teacher = eight_gaussians_mixture(process)
    torch.manual_seed(1000 + seed)
    gen = MLPGenerator(2, hidden=64)
    fake = MLPPredictor(process, "v", dim=2, hidden=64)
    loss = {"SIM": functools.partial(sim_generator_loss, distance="pseudo_huber", c=c, space="x0"),
            "SiD": functools.partial(sid_generator_loss, alpha=sid_alpha, weighting="sid"),
            "DI": functools.partial(diff_instruct_loss, space="x0")}[method]
    eval_cpu = [0.0]
    hit = {}

    def callback(step, g):
        t0 = time.process_time()
        with torch.no_grad():
            x = g.sample(N_EVAL, torch.Generator().manual_seed(20_000 + step))
        sw = sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(7)) if torch.isfinite(x).all() \
            else float("inf")
        if sw <= threshold and "step" not in hit:
            hit.update(step=step, cpu=time.process_time() - cpu0 - eval_cpu[0] - (time.process_time() - t0))
        eval_cpu[0] += time.process_time() - t0
        return {"sw": sw}

    cpu0 = time.process_time()
    status = "ok"
    try:
        hist = distill(gen, teacher, fake, loss, steps=max_steps, lr_gen=lr, lr_fake=1e-3, batch_size=256,
                       t_sampler_gen=(p_sid(process, from_end="min") if method == "SiD" and sid_times == "p_sid"
                                      else p_sim(process, sigma_min=0.002, sigma_max=80.0)),
                       t_sampler_fake=p_edm(process, sigma_min=0.002, sigma_max=80.0), fake_warmup=300,
                       generator=torch.Generator().manual_seed(seed), progress=False, callback=callback,
                       callback_every=every)
        final = hist["metrics"][-1]["sw"]
        best = min(m["sw"] for m in hist["metrics"])
        steps_run = hist["metrics"][-1]["step"]
    except FloatingPointError as err:       # NaN/inf loss, or the divergence detector (distillation.Diverged)
        status, final, steps_run = type(err).__name__, float("inf"), getattr(err, "step", None)
        best = min((m["sw"] for m in getattr(err, "history", {}).get("metrics", [])), default=float("inf"))
    return {"method": method, "seed": seed, "status": status, "steps_to_threshold": hit.get("step"),
            "cpu_s_to_threshold": hit.get("cpu"), "final_sw": final, "best_sw": best, "steps_run": steps_run,
            "cpu_s_total": time.process_time() - cpu0 - eval_cpu[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--methods", default="SIM,SiD,DI", help="comma-separated subset of SIM,SiD,DI")
    ap.add_argument("--sid-times", default="p_sid", choices=("p_sim", "p_sid"),
                    help="SiD's generator times: p_sim (same as the others) or p_sid (SiD's own recipe: sigma on "
                         "the Karras grid, k ~ U{0..800} from sigma_min, i.e. sigma in [0.002, 24.5])")
    ap.add_argument("--sid-alpha", type=float, default=1.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dstar_edu.metrics import sliced_wasserstein, sw_noise_floor
    from dstar_edu.process import VP
    from dstar_edu.samplers.common import uniform_grid
    from dstar_edu.samplers.diffusion import ddim
    from toy_data.mixtures import eight_gaussians_mixture
    process = VP()
    teacher = eight_gaussians_mixture(process)
    floor, floor_sd = sw_noise_floor(lambda n, g: teacher.sample(n, g).float(), N_EVAL, repeats=10)
    threshold = 1.5 * floor
    ref = teacher.sample(N_EVAL, torch.Generator().manual_seed(10_000)).float()
    x_ddim = ddim(teacher, uniform_grid(process, 50), torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(3),
                                                                  dtype=torch.float64))
    sw_ddim = sliced_wasserstein(x_ddim.float(), ref, generator=torch.Generator().manual_seed(7))
    print(f"noise floor (n={N_EVAL}) {floor:.4f} +- {floor_sd:.4f}; threshold 1.5 x floor = {threshold:.4f}; "
          f"50-step DDIM of the exact teacher: SW = {sw_ddim:.4f}")
    results = []
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        for seed in range(args.seeds):
            r = run(method, seed, args.lr, args.max_steps, args.every, threshold, ref, sid_times=args.sid_times,
                    sid_alpha=args.sid_alpha)
            results.append(r)
            print(f"  {method:4} seed {seed}: steps to 1.5 x floor = {r['steps_to_threshold']}, CPU s = "
                  f"{r['cpu_s_to_threshold'] if r['cpu_s_to_threshold'] is None else round(r['cpu_s_to_threshold'], 1)}, "
                  f"final SW {r['final_sw']:.4f} after {r['steps_run']} steps ({r['status']})", flush=True)
    print(f"\nlr_gen {args.lr:g}, max {args.max_steps} steps, one CPU thread, SiD times {args.sid_times}, "
          f"SiD alpha {args.sid_alpha:g}")
    print(f"{'method':6} {'reached':>8} {'steps (median)':>15} {'CPU s (median)':>15} {'final SW (median)':>18} "
          f"{'final SW / DDIM-50 SW':>22}")
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        hits = [r for r in rs if r["steps_to_threshold"] is not None]
        med_steps = statistics.median([r["steps_to_threshold"] for r in hits]) if hits else None
        med_cpu = statistics.median([r["cpu_s_to_threshold"] for r in hits]) if hits else None
        finals = [r["final_sw"] for r in rs]
        med_final = statistics.median(finals)
        print(f"{method:6} {len(hits):>4}/{len(rs):<3} {('-' if med_steps is None else f'{med_steps:.0f}'):>15} "
              f"{('-' if med_cpu is None else f'{med_cpu:.1f}'):>15} {med_final:>18.4f} {med_final / sw_ddim:>22.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"floor": floor, "floor_sd": floor_sd, "sw_ddim50": sw_ddim, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
