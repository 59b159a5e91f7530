"""Issue 5 experiments on 2D: preference alignment of a one-step generator (DI++ vs DI*) and reward
fine-tuning of a multi-step diffusion model (ReFL / DRaFT-K / DDPO / DRWR), reported honestly.

Part A (one-step, Luo talk DI++ Alg. 1 vs DI* Alg. 1): a one-step ``MLPGenerator`` is distilled with SIM from
the exact 8-Gaussians teacher (radius-2 circle), then aligned to the saturating "aesthetic" reward
``r(x) = tanh(x_2)`` (prefers the upper half of the support: rewards of the 8 modes are about
0, 0.89, 0.96, 0.89, 0, -0.89, -0.96, -0.89) with DI++ (integral KL, ``diff_instruct_pp_loss``) and DI*
(pseudo-Huber score divergence, ``diff_instruct_star_loss``) at the same reward scales ``alpha_rew``, same
time distribution, weighting, fake-score updates, optimiser and seeds. Logged over training: mean reward,
mode entropy (of the nearest-mode histogram, in units of log 8), modes covered, sliced Wasserstein distance
to the reference, and to the data-level KL-regularised optimum ``pi* ∝ p_ref exp(alpha_rew r)`` (sampled by
importance resampling of the reference; DI++ regularises with the weaker *integral* KL, so this is a reference
point, not its exact optimum). Distillation and alignment both run in ``dstar_edu.distillation.distill`` (2
fake-score updates per generator update, Adam (0, 0.999), lr 1e-3, batch 256, generator times uniform over
DDPM steps 20..980, w(t) = sigma(t)^2, pseudo-Huber c = 0.1); 800 alignment steps, 3 seeds.

Part B (multi-step, handbook Sec. 3.3): a small DDPM eps-model on the same data, a 10-step stochastic DDIM
chain (eta = 1, t = 1000 -> 1), fine-tuned with ReFL, DRaFT-1, DRaFT-10 (full), DDPO_SF, DDPO_IS (4 clipped
updates per batch) and DRWR for 150 Adam steps each (lr 5e-5, batch 128, loop ``training.train``); reward
gained per CPU second of training and CPU seconds to reach mean reward 0.5 (evaluation time excluded).

Run: ``PYTHONPATH=. python bench/experiment_align_2d.py [--quick] [--json out.json] [--plot out.png]``.
Single-threaded (``training.cpu_threads(1)``): CPU seconds are process seconds of one core.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

import functools

from dstar_edu.distillation import distill
from dstar_edu.generators import MLPGenerator
from dstar_edu.metrics import mode_coverage, sliced_wasserstein
from dstar_edu.objectives.alignment import diff_instruct_pp_loss, diff_instruct_star_loss
from dstar_edu.objectives.distill import sim_generator_loss
from dstar_edu.objectives.reward_finetune import (ddpo_is_loss, ddpo_sf_loss, draft_loss, drwr_loss, drwr_weights,
                                                  normalize_advantages, refl_loss, sample_until,
                                                  sample_with_log_probs)
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import DDPM
from dstar_edu.rewards import AestheticReward
from dstar_edu.samplers.diffusion import ddim
from dstar_edu.training import cpu_threads, train, train_2d
from toy_data.datasets2d import eight_gaussians_means
from toy_data.mixtures import eight_gaussians_mixture

MEANS = eight_gaussians_means(torch.float32)
REWARD = AestheticReward([0.0, 1.0], scale=1.0)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diversity(x: torch.Tensor) -> dict:
    """Mode statistics of 2D samples against the 8 modes (radius 0.5 around each mean)."""
    cov = mode_coverage(x, MEANS, radius=0.5, min_count=max(5, x.shape[0] // 200))
    counts = torch.tensor(cov["counts"], dtype=torch.float64)
    p = counts / counts.sum().clamp(min=1)
    ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(8))
    return {"modes": cov["modes_covered"], "entropy": ent, "near": cov["fraction_near"], "counts": cov["counts"]}


def summary(x: torch.Tensor, ref: torch.Tensor, target: torch.Tensor | None = None) -> dict:
    x = x.detach().float()
    out = {"reward": float(REWARD(x.double()).mean()), **diversity(x),
           "sw_ref": sliced_wasserstein(x, ref, generator=_g(123))}
    if target is not None:
        out["sw_opt"] = sliced_wasserstein(x, target, generator=_g(124))
    return out


# ---- Part A: one-step alignment ---------------------------------------------------------------------------
def kl_optimum_samples(teacher, alpha_rew: float, n: int, seed: int) -> torch.Tensor:
    """Samples of pi* ∝ p_ref exp(alpha_rew r) by importance resampling 40n reference samples."""
    x = teacher.sample(40 * n, generator=_g(seed)).float()
    logw = alpha_rew * REWARD(x.double())
    idx = torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=_g(seed + 1))
    return x[idx]


def _fake(process, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLPPredictor(process, "eps", 2, hidden=128, depth=3)


def part_one_step(quick: bool) -> dict:
    p = DDPM(1000)
    teacher = eight_gaussians_mixture(p)
    ref = teacher.sample(4000, generator=_g(1)).float()

    def t_gen(n, g):  # generator-loss times: uniform over the DDPM steps 20..980
        return torch.randint(20, 981, (n,), generator=g).float()

    def weight(t):
        return p.sigma(t).float() ** 2  # w(t) = sigma^2: score-space terms of comparable size across t

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gen = MLPGenerator(2, hidden=128, depth=3)
    fake = _fake(p, 1)
    t0 = time.process_time()
    distill_steps = 600 if quick else 2500
    distill(gen, teacher, fake, functools.partial(sim_generator_loss, distance="pseudo_huber", c=0.1, weight=weight),
            steps=distill_steps, fake_steps=2, lr_gen=1e-3, lr_fake=1e-3, batch_size=256, t_sampler_gen=t_gen,
            t_sampler_fake=None, generator=_g(2), progress=False)
    distill_cpu = time.process_time() - t0
    with torch.no_grad():
        start = summary(gen.sample(4000, _g(3)), ref)
    runs = []
    alphas = (0.3, 3.0) if quick else (0.1, 0.3, 1.0, 3.0)
    seeds = (0,) if quick else (0, 1, 2)
    align_steps = 300 if quick else 800
    log_every = 20 if quick else 40
    for method in ("DI++ (KL)", "DI* (pseudo-Huber)"):
        for a in alphas:
            target = kl_optimum_samples(teacher, a, 4000, seed=5)
            for seed in seeds:
                g_run, f_run = copy.deepcopy(gen), copy.deepcopy(fake)
                if method.startswith("DI++"):
                    loss = functools.partial(diff_instruct_pp_loss, reward=REWARD, alpha_rew=a, weight=weight)
                else:
                    loss = functools.partial(diff_instruct_star_loss, reward=REWARD, alpha_rew=a, weight=weight,
                                             distance="pseudo_huber", c=0.1)

                eval_cpu = [0.0]

                def log(step, model, target=target, eval_cpu=eval_cpu):
                    e0 = time.process_time()
                    with torch.no_grad():
                        out = summary(model.sample(4000, _g(7)), ref, target)
                    eval_cpu[0] += time.process_time() - e0
                    return out
                t0 = time.process_time()
                out = distill(g_run, teacher, f_run, loss, steps=align_steps, fake_steps=2, lr_gen=1e-3, lr_fake=1e-3,
                              batch_size=256, t_sampler_gen=t_gen, t_sampler_fake=None, generator=_g(11 + 100 * seed),
                              progress=False, callback=log, callback_every=log_every)
                hist = [{"step": 0, **start}] + out["metrics"]
                runs.append({"method": method, "alpha_rew": a, "seed": seed,
                             "cpu_s": time.process_time() - t0 - eval_cpu[0],
                             "history": hist, "final": hist[-1], "kl_optimum": summary(target, ref)})
    return {"distill_steps": distill_steps, "distill_cpu_s": distill_cpu, "start": start, "runs": runs,
            "align_steps": align_steps}


# ---- Part B: multi-step reward fine-tuning ----------------------------------------------------------------------
TS = torch.cat([torch.arange(1000.0, 0.0, -100.0), torch.tensor([1.0])]).double()   # 10 stochastic steps


def sample_chain(model, n, seed):
    with torch.no_grad():
        return ddim(model, TS, torch.randn(n, 2, generator=_g(seed)), eta=1.0, generator=_g(seed + 1))


LR_B = 5e-5   # Adam normalises gradient scale: larger rates push the chain off the data within tens of steps
EVAL_EVERY = 10
TARGET_B = 0.5  # "CPU seconds to reach mean reward 0.5" (from about 0.02)


def part_multistep(quick: bool) -> dict:
    p = DDPM(1000)
    ref = eight_gaussians_mixture(p).sample(4000, generator=_g(1)).float()
    t0 = time.process_time()
    base, _ = train_2d("eight_gaussians", p, "eps", steps=800 if quick else 3000, batch_size=256, lr=2e-3, seed=0,
                       progress=False)
    base_cpu = time.process_time() - t0
    start = summary(sample_chain(base, 4000, 100), ref)
    steps = 40 if quick else 150
    B = 128

    def make(method):
        model = copy.deepcopy(base).train()
        state = {}

        if method == "ReFL":
            def loss_fn(k, g):
                stop = int(torch.randint(5, len(TS) - 1, (1,), generator=g))
                x_t = sample_until(model, TS, torch.randn(B, 2, generator=g), stop, eta=1.0, generator=g)
                return refl_loss(model, x_t, TS[stop], REWARD)
        elif method.startswith("DRaFT"):
            K = int(method.split("-")[1])

            def loss_fn(k, g):
                return draft_loss(model, TS, torch.randn(B, 2, generator=g), REWARD, K=K, eta=1.0, generator=g)
        elif method == "DDPO_SF":
            def loss_fn(k, g):
                traj, _ = sample_with_log_probs(model, TS, torch.randn(B, 2, generator=g), generator=g)
                return ddpo_sf_loss(model, traj, TS, normalize_advantages(REWARD(traj[-1])))
        elif method == "DDPO_IS":
            def loss_fn(k, g):
                if k % 4 == 0:   # a fresh on-policy batch, then 4 clipped importance-sampled updates on it
                    traj, old = sample_with_log_probs(model, TS, torch.randn(B, 2, generator=g), generator=g)
                    state.update(traj=traj, old=old, adv=normalize_advantages(REWARD(traj[-1])))
                return ddpo_is_loss(model, state["traj"], TS, state["adv"], state["old"], clip_range=0.2)
        elif method == "DRWR":
            def loss_fn(k, g):
                x = sample_chain(model, B, int(torch.randint(0, 2 ** 31, (1,), generator=g)))
                w = drwr_weights(REWARD(x.double()).float(), 3.0, w_max=20.0, baseline="mean")
                return drwr_loss(model, x, w, generator=g)
        else:
            raise ValueError(method)
        return model, loss_fn

    rows = []
    for method in ("ReFL", "DRaFT-1", "DRaFT-10", "DDPO_SF", "DDPO_IS", "DRWR"):
        model, loss_fn = make(method)
        curve, eval_cpu = [(0.0, start["reward"])], [0.0]
        t0 = time.process_time()

        def callback(rec, model=model, curve=curve, eval_cpu=eval_cpu, t0=t0):
            if (rec.step + 1) % EVAL_EVERY == 0:
                e0 = time.process_time()
                model.eval()
                r = float(REWARD(sample_chain(model, 1000, 200).double()).mean())
                model.train()
                eval_cpu[0] += time.process_time() - e0
                curve.append((time.process_time() - t0 - eval_cpu[0], r))
        train(loss_fn, model, steps, LR_B, generator=_g(50), progress=False, callback=callback)
        cpu = time.process_time() - t0 - eval_cpu[0]
        model.eval()
        end = summary(sample_chain(model, 4000, 100), ref)
        hit = next((c for c, r in curve if r >= TARGET_B), None)
        rows.append({"method": method, "steps": steps, "cpu_s": cpu, "reward_start": start["reward"],
                     "reward_end": end["reward"], "gain_per_cpu_s": (end["reward"] - start["reward"]) / cpu,
                     "cpu_s_to_target": hit, "curve": curve,
                     "entropy_end": end["entropy"], "modes_end": end["modes"], "near_end": end["near"],
                     "sw_ref_end": end["sw_ref"]})
    return {"base_train_cpu_s": base_cpu, "start": start, "rows": rows}


# ---- reporting ---------------------------------------------------------------------------------------------------
def _mean_sd(vals) -> str:
    v = torch.tensor(vals, dtype=torch.float64)
    return f"{float(v.mean()):.3f}" + (f" ± {float(v.std()):.3f}" if len(vals) > 1 else "")


def table_one_step(res: dict) -> str:
    lines = [f"One-step generator distilled with SIM ({res['distill_steps']} steps, {res['distill_cpu_s']:.1f} CPU s): "
             f"reward {res['start']['reward']:.3f}, mode entropy {res['start']['entropy']:.3f}, "
             f"modes {res['start']['modes']}/8, SW to reference {res['start']['sw_ref']:.3f}",
             f"Final values after {res['align_steps']} alignment steps, mean ± sd over seeds "
             f"(n = {len({r['seed'] for r in res['runs']})}):", "",
             "| method | alpha_rew | reward | mode entropy | modes covered | near a mode | SW to ref | "
             "SW to p_ref e^(a r) | p_ref e^(a r): reward / entropy | CPU s per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in res["runs"]:
        if (r["method"], r["alpha_rew"]) not in keys:
            keys.append((r["method"], r["alpha_rew"]))
    for method, a in keys:
        rs = [r for r in res["runs"] if r["method"] == method and r["alpha_rew"] == a]
        f = lambda k: _mean_sd([r["final"][k] for r in rs])  # noqa: E731
        o = rs[0]["kl_optimum"]
        lines.append(f"| {method} | {a:g} | {f('reward')} | {f('entropy')} | {f('modes')} | {f('near')} | "
                     f"{f('sw_ref')} | {f('sw_opt')} | {o['reward']:.3f} / {o['entropy']:.3f} | "
                     f"{sum(r['cpu_s'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines)


def table_multistep(res: dict) -> str:
    s = res["start"]
    lines = [f"Base DDPM eps-model ({res['base_train_cpu_s']:.1f} CPU s to train), 10-step eta=1 chain: reward "
             f"{s['reward']:.3f}, mode entropy {s['entropy']:.3f}, modes {s['modes']}/8", "",
             f"| method | steps | CPU s | reward start -> end | reward gain per CPU s | CPU s to reward {TARGET_B} | "
             "mode entropy | modes | near a mode |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        hit = "not reached" if r["cpu_s_to_target"] is None else f"{r['cpu_s_to_target']:.2f}"
        lines.append(f"| {r['method']} | {r['steps']} | {r['cpu_s']:.1f} | {r['reward_start']:.3f} -> {r['reward_end']:.3f} | "
                     f"{r['gain_per_cpu_s']:.3f} | {hit} | {r['entropy_end']:.3f} | {r['modes_end']} | "
                     f"{r['near_end']:.3f} |")
    return "\n".join(lines)


def plot(res_a: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in res_a["runs"]:
        if r["seed"] != 0:
            continue
        h = r["history"]
        style = "-o" if r["method"].startswith("DI++") else "--s"
        ax[0].plot([x["reward"] for x in h], [x["entropy"] for x in h], style, ms=3,
                   label=f"{r['method'].split()[0]} a={r['alpha_rew']:g}")
        ax[1].plot([x["step"] for x in h], [x["reward"] for x in h], style, ms=3)
    ax[0].set_xlabel("mean reward")
    ax[0].set_ylabel("mode entropy / log 8")
    ax[0].legend(fontsize=7, ncol=2)
    ax[1].set_xlabel("alignment step")
    ax[1].set_ylabel("mean reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and scales (smoke run)")
    ap.add_argument("--parts", default="AB", help="which parts to run: A (one-step), B (multi-step)")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    ap.add_argument("--plot", default=None, help="write the reward/diversity figure of part A to this PNG")
    args = ap.parse_args(argv)
    out = {}
    with cpu_threads(1):
        if "A" in args.parts:
            out["one_step"] = part_one_step(args.quick)
            print(table_one_step(out["one_step"]), "\n", flush=True)
            if args.plot:
                plot(out["one_step"], args.plot)
        if "B" in args.parts:
            out["multistep"] = part_multistep(args.quick)
            print(table_multistep(out["multistep"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
