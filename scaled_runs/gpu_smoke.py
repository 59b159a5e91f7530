"""One-command smoke run of the scaled scripts (``scaled_runs/gpu_smoke.sh``): a few bf16 steps of each script,
step time, peak memory against the planner's prediction, and a bf16-vs-fp32 comparison of the step-1 losses,
written to ``<out>/report.json`` and ``<out>/report.md``.

    bash scaled_runs/gpu_smoke.sh                 # one GPU: full-size SDXL and PixArt, random weights, nothing downloaded
    bash scaled_runs/gpu_smoke.sh --tiny          # CPU: the tiny networks (what the tests run)

Full size (default): ``--tiny --full_random`` builds SDXL's UNet / VAE / text encoders / CLIP-H reward and
PixArt-alpha-512's transformer / T5-XXL / VAE from ``configs/arch`` with random weights on the GPU, batch 1,
gradient checkpointing of trained and frozen networks, no checkpoints written. The planner's prediction is for
one GPU under the same settings (``scaled_runs.plan``; with ``--tiny``: of the tiny networks, every row); the
measured peak is ``torch.cuda.max_memory_allocated`` (on the CPU: the process's peak resident set size, which
includes Python and torch themselves and is not comparable with the plan).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = ["RUNS", "smoke", "main"]

# script -> (extra flags of the smoke run); each run also gets the common flags of `smoke`
RUNS = {
    "align_sdxl": ["--alpha_rew", "100", "--alpha_cfg", "7.5", "--cfg_mode", "in"],
    "distill_pixart": ["--cfg_scale", "0"],
    "distill_cifar": ["--method", "sim"],
}


def _tiny_arch(script: str, cfg) -> dict:
    """The planner's architecture overrides for ``--tiny`` networks (their own configs, every network the plan
    counts: the tiny report compares the tiny run with the tiny plan, not with full-size rows)."""
    import importlib
    mod = importlib.import_module(f"scaled_runs.{script}")
    if script == "align_sdxl":
        pipe, reward = mod.build_tiny_pipeline(cfg.output_dir, cfg.seed)
        clip = reward.model.config

        def tower(c):          # the planner passes projection_dim itself
            return {k: v for k, v in c.to_dict().items() if k != "projection_dim"}
        return {"sdxl_unet": dict(pipe.unet.config), "sdxl_vae": dict(pipe.vae.config),
                "sdxl_text_encoders": {"text_encoder": pipe.text_encoder.config.to_dict(),
                                       "text_encoder_2": pipe.text_encoder_2.config.to_dict()},
                "pickscore_clip_h": {"projection_dim": clip.projection_dim, "text_config": tower(clip.text_config),
                                     "vision_config": tower(clip.vision_config)}}
    if script == "distill_pixart":
        pipe = mod.build_tiny_pipeline(cfg.seed)
        return {"pixart_512_transformer": dict(pipe.transformer.config), "sd_vae_512": dict(pipe.vae.config),
                "t5_xxl_encoder": pipe.text_encoder.config.to_dict()}
    from dstar_edu.diffusers_interop import tiny_unet
    return {"ddpm_cifar10_unet": dict(tiny_unet(seed=cfg.seed).config)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def smoke(out, *, tiny: bool, steps: int = 3, scripts=None, progress: bool = False) -> dict:
    """Run the smoke for ``scripts`` (default: all of :data:`RUNS`; full size: SDXL and PixArt) and write the
    report; returns it."""
    import importlib

    from scaled_runs import plan as planner
    from scaled_runs.config import parse_config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not tiny
    scripts = list(scripts or (RUNS if tiny else ["align_sdxl", "distill_pixart"]))
    common = ["--tiny", "--batch_size", "1" if not tiny else "2", "--grad_accum", "1", "--checkpoint_every", "0",
              "--sample_every", "0", "--n_samples", "1", "--log_every", "1", "--ema_halflife_kimg", "0",
              "--gradient_checkpointing", "--checkpoint_frozen", "--num_threads", "1" if tiny else "0"]
    if not tiny:
        common += ["--full_random"]
    if not progress:
        common += ["--no-progress"]
    if not gpu:
        common += ["--cpu"]
    report = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "tiny": tiny, "steps": steps,
              "torch": torch.__version__, "runs": {}}
    for script in scripts:
        mod = importlib.import_module(f"scaled_runs.{script}")
        flags = common + RUNS[script]
        if script == "distill_cifar":
            flags = [f for f in flags if f != "--full_random"]
        res = {}
        for mp in ("bf16", "no"):
            n = steps if mp == "bf16" else 1
            argv = flags + ["--mixed_precision", mp, "--steps", str(n), "--output_dir", str(out / f"{script}_{mp}")]
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run = mod.main(argv)
            wall = time.perf_counter() - t0
            recs = run["records"]
            peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else recs[-1]["peak_memory_gib"])
            res[mp] = {"argv": argv, "wall_seconds": wall, "records": recs, "peak_gib": peak,
                       "step_seconds": statistics.median(r["step_seconds"] for r in recs[1:] or recs)}
            del run
        cfg = parse_config(mod.CONFIG, res["bf16"]["argv"])
        planner.ARCH_OVERRIDE.clear()
        if tiny:
            planner.ARCH_OVERRIDE.update(_tiny_arch(script, cfg))
        try:
            p = planner.plan_run(cfg, planner.SCRIPTS[script][1], 1,
                                 torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if gpu else 1e6)
        finally:
            planner.ARCH_OVERRIDE.clear()
        b, f = res["bf16"]["records"][0], res["no"]["records"][0]
        report["runs"][script] = {
            "step_seconds_bf16": res["bf16"]["step_seconds"], "wall_seconds_bf16": res["bf16"]["wall_seconds"],
            "peak_gib_bf16": res["bf16"]["peak_gib"], "peak_gib_fp32": res["no"]["peak_gib"],
            "planned_peak_gib_bf16": p.peak / 2 ** 30, "plan_to_measured": (p.peak / 2 ** 30) / res["bf16"]["peak_gib"],
            "step1_losses_bf16": {k: v for k, v in b.items() if k.endswith("_loss")},
            "step1_losses_fp32": {k: v for k, v in f.items() if k.endswith("_loss")},
            "step1_relative_difference": {k: _rel(b[k], f[k]) for k in b if k.endswith("_loss")},
            "all_finite": all(math.isfinite(r[k]) for r in res["bf16"]["records"] for k in r if k.endswith("_loss")),
        }
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    (out / "report.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"# scaled_runs smoke ({report['device']}, torch {report['torch']}, "
             f"{'tiny' if report['tiny'] else 'full size, random weights'})", "",
             "| script | step s (bf16) | peak GiB bf16 | planned GiB | plan / measured | peak GiB fp32 | "
             "step-1 rel. diff bf16 vs fp32 |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in report["runs"].items():
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in r["step1_relative_difference"].items())
        lines.append(f"| {name} | {r['step_seconds_bf16']:.3f} | {r['peak_gib_bf16']:.2f} | "
                     f"{r['planned_peak_gib_bf16']:.2f} | {r['plan_to_measured']:.2f} | {r['peak_gib_fp32']:.2f} | "
                     f"{diffs} |")
    if report["tiny"]:
        lines += ["", "CPU: peaks are the process's resident set size (Python and torch included), not comparable "
                      "with the plan."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="smoke run of the scaled scripts with a JSON + markdown report")
    parser.add_argument("--tiny", action="store_true", help="tiny networks on the CPU (no GPU needed)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/gpu_smoke")
    parser.add_argument("--scripts", nargs="*", default=None, choices=sorted(RUNS))
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA GPU here; run with --tiny for the CPU version")
    report = smoke(args.out, tiny=args.tiny, steps=args.steps, scripts=args.scripts, progress=not args.tiny)
    print((Path(args.out) / "report.md").read_text())
    return report


if __name__ == "__main__":
    main()
