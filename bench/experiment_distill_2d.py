"""Toy-scale test of SIM's empirical claims (SIM Sec. 3.3 and 4.1): SIM (pseudo-Huber) vs SiD vs Diff-Instruct.

SIM claims that the pseudo-Huber distance makes distillation (i) robust to large learning rates, (ii) faster
to converge than SiD and Diff-Instruct, and that (iii) Diff-Instruct tends to collapse modes. Here: one-step
generators distilled from an 8-Gaussian teacher on 2D,

* teacher ``exact``: the exact mixture (``toy_data.mixtures.eight_gaussians_mixture``), generator a fresh
  ``MLPGenerator``, online score a fresh ``MLPPredictor`` warmed up on the initial generator;
* teacher ``trained``: an ``MLPPredictor`` trained on the 8 Gaussians (``training.train_2d``), generator
  SIM's construction ``TeacherInitGenerator`` (teacher copy at sigma* = 2.5, SIM Eq. B.4), online score a
  copy of the teacher (SIM App. B.2),

with the same budget for every method (generator steps, one online-score step per generator step, batch,
Adam betas (0, 0.999), time distributions p_SIM for the generator and p_EDM for the online score, both
clamped to sigma in [0.002, 80]; SiD keeps its own generator times, the Karras grid counted from sigma_min as in
SiD's public code, see ``bench_distillation.py --sid-times``), at a small and a large generator learning rate, several seeds. All three
losses are the EDM/denoiser-space forms of the public methods: SIM Alg. 2 (Eq. B.13, pseudo-Huber, weight 1),
SiD (alpha = 1.2, weight 1/mean|x0 - D_q|), Diff-Instruct (sg(D_psi - D_q) . x_t, weight 1).

Measured every ``--every`` steps on 2000 generator samples: the sliced Wasserstein distance to 2000 fresh
teacher samples (``metrics.sliced_wasserstein``; its noise floor is the distance between two independent
2000-samples of the teacher, ``metrics.sw_noise_floor``) and mode coverage (modes with >= 10 samples within
radius 0.3 = 3 std). Prints one table per teacher; ``--json`` writes every curve.

    PYTHONPATH=. python bench/experiment_distill_2d.py            # ~5-10 min on 2 CPU cores
    PYTHONPATH=. python bench/experiment_distill_2d.py --quick    # 1 seed, 600 steps
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import multiprocessing as mp
import statistics
import time

import torch

N_EVAL = 2000
RADIUS = 0.3
#: a run whose sliced Wasserstein exceeds this (the data lie within |x| < 2.5) has diverged
DIVERGED = 100.0
#: width of every MLP (generator, online score, trained teacher)
HIDDEN = 64
#: the networks predict the handbook's v (Sec. 2.6.2): x0 = sqrt(ab) x_t + sqrt(1 - ab) v keeps x0-space errors
#: bounded at every noise level (like EDM's preconditioning); an eps-network's x0 error grows like sigma/alpha
PREDICTION = "v"


def build(teacher_kind: str, seed: int, trained_teacher=None):
    """(process, teacher, generator, fake, fake_warmup)."""
    from dstar_edu.generators import MLPGenerator, TeacherInitGenerator
    from dstar_edu.predictors import MLPPredictor
    from dstar_edu.process import VP
    from toy_data.mixtures import eight_gaussians_mixture
    process = VP()
    torch.manual_seed(1000 + seed)
    if teacher_kind == "exact":
        teacher = eight_gaussians_mixture(process)
        gen = MLPGenerator(2, hidden=HIDDEN)
        fake = MLPPredictor(process, PREDICTION, dim=2, hidden=HIDDEN)
        return process, teacher, gen, fake, 300
    teacher = trained_teacher
    gen = TeacherInitGenerator(teacher, sigma_star=2.5)
    fake = copy.deepcopy(teacher)
    fake.requires_grad_(True)
    return process, teacher, gen, fake, 0


def train_teacher(steps: int, seed: int = 0):
    from dstar_edu.training import train_2d
    from dstar_edu.process import VP
    from toy_data.mixtures import eight_gaussians_mixture
    model, losses = train_2d(eight_gaussians_mixture(), VP(), PREDICTION, steps=steps, batch_size=512, lr=2e-3,
                             seed=seed, hidden=HIDDEN, progress=False)
    return model


def loss_fn(method: str, c: float):
    from dstar_edu.objectives.distill import diff_instruct_loss, sid_generator_loss, sim_generator_loss
    if method == "SIM":
        return functools.partial(sim_generator_loss, distance="pseudo_huber", c=c, space="x0")
    if method == "SiD":
        return functools.partial(sid_generator_loss, alpha=1.2, weighting="sid")
    if method == "DI":
        return functools.partial(diff_instruct_loss, space="x0")
    raise ValueError(f"method={method!r}; allowed: SIM, SiD, DI")


def run_one(cfg: dict) -> dict:
    torch.set_num_threads(1)
    from dstar_edu.distillation import distill
    from dstar_edu.metrics import mode_coverage, sliced_wasserstein
    from dstar_edu.objectives.distill import p_edm, p_sid, p_sim
    from toy_data.datasets2d import eight_gaussians_means
    from toy_data.mixtures import eight_gaussians_mixture
    trained = None
    if cfg["teacher"] == "trained":
        trained = torch.load(cfg["teacher_path"], weights_only=False)
    process, teacher, gen, fake, warmup = build(cfg["teacher"], cfg["seed"], trained)
    truth = eight_gaussians_mixture(process)
    ref = truth.sample(N_EVAL, torch.Generator().manual_seed(10_000 + cfg["seed"])).float()
    means = eight_gaussians_means()

    def callback(step, g):
        with torch.no_grad():
            x = g.sample(N_EVAL, torch.Generator().manual_seed(20_000 + step))
        if not torch.isfinite(x).all():
            return {"sw": math.inf, "modes": 0, "near": 0.0}
        cov = mode_coverage(x, means, RADIUS)
        return {"sw": sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(7)),
                "modes": cov["modes_covered"], "near": cov["fraction_near"]}

    status = "ok"
    start = time.perf_counter()
    try:
        hist = distill(gen, teacher, fake, loss_fn(cfg["method"], cfg["c"]), steps=cfg["steps"], fake_steps=1,
                       lr_gen=cfg["lr"], lr_fake=cfg["lr_fake"], batch_size=cfg["batch"],
                       # SiD's own recipe samples its generator times on the Karras grid from sigma_min
                       # (sigma in [0.002, 24.5]); with SIM's p_sim (median sigma 0.03) alpha = 1.2 diverges
                       t_sampler_gen=(p_sid(process, from_end="min") if cfg["method"] == "SiD"
                                      else p_sim(process, sigma_min=0.002, sigma_max=80.0)),
                       t_sampler_fake=p_edm(process, sigma_min=0.002, sigma_max=80.0), fake_warmup=warmup,
                       generator=torch.Generator().manual_seed(cfg["seed"]), progress=False, callback=callback,
                       callback_every=cfg["every"])
        metrics = hist["metrics"]
    except FloatingPointError as exc:
        status, metrics = f"NaN ({str(exc)[:60]})", []
    return {**cfg, "status": status, "metrics": metrics, "wall": time.perf_counter() - start}


def summarize(results: list[dict], floor: float, steps_shown: list[int]) -> str:
    lines = []
    thr = 1.5 * floor
    for teacher in sorted({r["teacher"] for r in results}):
        lines.append(f"\nteacher = {teacher}   (SW noise floor {floor:.3f}; threshold 1.5 x floor = {thr:.3f}; "
                     f"means over the seeds that did not diverge (SW > {DIVERGED:g} or NaN); 'div' counts the others; "
                     "final SW, modes and near are over the non-diverged seeds)")
        head = (f"{'lr':>8} {'method':6} " + " ".join(f"SW@{s:<8}" for s in steps_shown)
                + f" {'final SW [min..max]':>22} {'best':>6} {'steps<=1.5fl':>12} {'modes(/8)':>9} {'near':>5} "
                f"{'div':>4}")
        lines.append(head)
        lines.append("-" * len(head))
        for lr in sorted({r["lr"] for r in results}):
            for method in ("SIM", "SiD", "DI"):
                rs = [r for r in results if r["teacher"] == teacher and r["lr"] == lr and r["method"] == method]
                if not rs:
                    continue
                ok = [r for r in rs if r["status"] == "ok" and r["metrics"]]
                n_nan = len(rs) - len(ok)

                def at(step, r):
                    m = [x for x in r["metrics"] if x["step"] == step]
                    return m[0]["sw"] if m else math.nan
                cols = []
                for s in steps_shown:
                    vals = [at(s, r) for r in ok]
                    n_div = sum(not (math.isfinite(v) and v < DIVERGED) for v in vals)
                    good = [v for v in vals if math.isfinite(v) and v < DIVERGED]
                    txt = f"{statistics.mean(good):.3f}" if good else "-"
                    cols.append(f"{txt + (f'({n_div}div)' if n_div else ''):<11}")
                diverged = sum(not (math.isfinite(r["metrics"][-1]["sw"]) and r["metrics"][-1]["sw"] < DIVERGED)
                               for r in ok)
                ok = [r for r in ok if math.isfinite(r["metrics"][-1]["sw"]) and r["metrics"][-1]["sw"] < DIVERGED]
                finals = [r["metrics"][-1]["sw"] for r in ok]
                best = [min(x["sw"] for x in r["metrics"]) for r in ok]
                hits = [next((x["step"] for x in r["metrics"] if x["sw"] <= thr), None) for r in ok]
                hit_txt = (f"{statistics.median([h for h in hits if h is not None]):.0f} ({sum(h is not None for h in hits)}/{len(rs)})"
                           if any(h is not None for h in hits) else f"never (0/{len(rs)})")
                modes = [r["metrics"][-1]["modes"] for r in ok]
                near = [r["metrics"][-1]["near"] for r in ok]
                fin = f"{statistics.mean(finals):.3f} [{min(finals):.3f}..{max(finals):.3f}]" if finals else "-"
                lines.append(f"{lr:>8.0e} {method:6} " + " ".join(cols) + f" {fin:>22} "
                             f"{(min(best) if best else math.nan):>6.3f} {hit_txt:>12} "
                             f"{(statistics.mean(modes) if modes else math.nan):>9.2f} "
                             f"{(statistics.mean(near) if near else math.nan):>5.2f} {diverged + n_nan:>4}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    ap.add_argument("--lr-fake", type=float, default=1e-3)
    ap.add_argument("--c", type=float, default=1e-3, help="pseudo-Huber constant (x0 space)")
    ap.add_argument("--teachers", nargs="+", default=["exact", "trained"])
    ap.add_argument("--teacher-steps", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="print the tables of a saved --json run (no training)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        res = saved["results"]
        steps = max(r["steps"] for r in res)
        print(f"sliced-W noise floor at n={N_EVAL}: {saved['floor']:.4f} +- {saved['floor_sd']:.4f}")
        print(summarize(res, saved["floor"], sorted({s for s in (100, 300, 600, 1000, steps) if s <= steps})))
        return res
    if args.quick:
        args.steps, args.seeds, args.every = 600, 1, 100
    from dstar_edu.metrics import sw_noise_floor
    from toy_data.mixtures import eight_gaussians_mixture
    truth = eight_gaussians_mixture()
    floor, floor_sd = sw_noise_floor(lambda n, g: truth.sample(n, g).float(), N_EVAL, repeats=10)
    print(f"sliced-W noise floor at n={N_EVAL}: {floor:.4f} +- {floor_sd:.4f}")
    teacher_path = None
    if "trained" in args.teachers:
        t0 = time.perf_counter()
        import tempfile
        teacher = train_teacher(args.teacher_steps)
        teacher_path = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
        torch.save(teacher, teacher_path)
        from dstar_edu.metrics import sliced_wasserstein
        from dstar_edu.samplers.common import uniform_grid
        from dstar_edu.samplers.diffusion import ddim
        x = ddim(teacher, uniform_grid(teacher.process, 50),
                 torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(3)))
        ref = truth.sample(N_EVAL, torch.Generator().manual_seed(4)).float()
        print(f"trained teacher: {args.teacher_steps} steps in {time.perf_counter() - t0:.1f} s; 50-step DDIM SW to "
              f"the data = {sliced_wasserstein(x.detach(), ref, generator=torch.Generator().manual_seed(7)):.4f}")
    cfgs = [{"teacher": te, "method": m, "lr": lr, "seed": s, "steps": args.steps, "every": args.every,
             "batch": args.batch, "lr_fake": args.lr_fake, "c": args.c, "teacher_path": teacher_path}
            for te in args.teachers for lr in args.lrs for m in ("SIM", "SiD", "DI") for s in range(args.seeds)]
    t0 = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(run_one, cfgs)
    else:
        results = [run_one(c) for c in cfgs]
    print(f"{len(cfgs)} runs in {time.perf_counter() - t0:.0f} s ({args.steps} generator steps each, batch "
          f"{args.batch}, lr_fake {args.lr_fake}, pseudo-Huber c {args.c})")
    shown = [s for s in (100, 300, 600, 1000, args.steps) if s <= args.steps]
    shown = sorted(set(shown))
    print(summarize(results, floor, shown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"floor": floor, "floor_sd": floor_sd, "results": results}, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
