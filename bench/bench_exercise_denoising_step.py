"""Where the pass threshold of exercise ``denoising_step`` (notebook 03) comes from.

For ``--seeds`` grading seeds, trains the exercise's MLP with the reference loss and with each catalogued mistake
(exactly as ``exercises.check`` does: ``exercises.training.train_with``, ``sample_distance``, ``denoiser_errors``
and ``graded_error``) and prints both graded statistics -- the samples' sliced Wasserstein distance to the data over
the noise floor, and the geometric mean of the denoiser's relative squared errors at ``GRADED_TIMES`` -- with the
reference's false-fail count, a log-normal tail estimate of its false-fail probability per grading (fitted to the
logs of the measured statistics; a union bound over the two criteria), and each mistake's fail count.

    python bench/bench_exercise_denoising_step.py --seeds 100 --mistake-seeds 10
"""
import argparse
import math
import statistics
import time

import torch

from dstar_edu.exercises import EXERCISES
from dstar_edu.exercises import training as tr


def ratios(step_fn, seeds):
    out, secs = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
        mix = tr._mixture(g)
        t0 = time.perf_counter()
        model, _, problem = tr.train_with(step_fn, mix, seed)
        secs.append(time.perf_counter() - t0)
        if problem is not None:
            out.append((float("inf"), float("inf")))
            continue
        gen = torch.Generator().manual_seed(seed + 5)
        _, _, sw, floor = tr.sample_distance(model.eval(), mix, gen)
        if sw != sw:
            out.append((float("inf"), float("inf")))
            continue
        errs = tr.denoiser_errors(model, mix, gen)
        out.append((sw / floor, tr.graded_error(errs)))
    return out, secs


def lognormal_tail(values, threshold):
    """``P(X > threshold)`` for a log-normal fitted to ``values`` (mean and standard deviation of the logs)."""
    logs = [math.log(v) for v in values]
    mu, sd = statistics.mean(logs), statistics.stdev(logs)
    return 0.5 * math.erfc((math.log(threshold) - mu) / (sd * math.sqrt(2)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--mistake-seeds", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated mistake indices (default: all, and the reference)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ex = EXERCISES["denoising_step"]
    only = [int(k) for k in a.only.split(",") if k]
    if not only:
        ref, secs = ratios(ex.reference, range(a.first_seed, a.first_seed + a.seeds))
        sw, den = sorted(r[0] for r in ref), sorted(r[1] for r in ref)
        fails = sum(r[0] > tr.THRESHOLD or r[1] > tr.DENOISER_THRESHOLD for r in ref)
        p_sw, p_den = lognormal_tail(sw, tr.THRESHOLD), lognormal_tail(den, tr.DENOISER_THRESHOLD)
        print(f"reference over {a.seeds} seeds: SW ratio min {sw[0]:.3g} median {statistics.median(sw):.3g} max "
              f"{sw[-1]:.3g} (threshold {tr.THRESHOLD}); denoiser error min {den[0]:.3g} median "
              f"{statistics.median(den):.3g} max {den[-1]:.3g} (threshold {tr.DENOISER_THRESHOLD}); training "
              f"{statistics.median(secs):.2f} s median", flush=True)
        print(f"reference false fails: {fails}/{len(ref)}; log-normal tail: P(SW ratio > {tr.THRESHOLD}) = "
              f"{p_sw:.1e}, P(denoiser error > {tr.DENOISER_THRESHOLD}) = {p_den:.1e}, false-fail probability "
              f"<= {p_sw + p_den:.1e} per grading", flush=True)
    for i, (wrong, why) in enumerate(ex.mistakes):
        if only and i not in only:
            continue
        rs, _ = ratios(wrong, range(1000, 1000 + a.mistake_seeds))
        print(f"mistake {i} ({why[:50]}...): SW ratio {min(r[0] for r in rs):.3g}-{max(r[0] for r in rs):.3g}, "
              f"denoiser error {min(r[1] for r in rs):.3g}-{max(r[1] for r in rs):.3g}; fails on "
              f"{sum(r[0] > tr.THRESHOLD or r[1] > tr.DENOISER_THRESHOLD for r in rs)}/{len(rs)}", flush=True)


if __name__ == "__main__":
    main()
