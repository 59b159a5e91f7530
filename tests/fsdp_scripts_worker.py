"""Worker of tests/test_scaled_fsdp.py's script-level test, started with `torchrun --nproc_per_node 2` (gloo, CPU).

    runs OUT    in the same two processes (one start-up for all): each RUNS script under DDP (OUT/<script>_ddp) and
                under --fsdp (OUT/<script>_fsdp); then the CIFAR FSDP run again in OUT/killed, whose processes
                SIGKILL themselves at the start of step KILL_AT (after the checkpoint of step KILL_AT - 1)
    resume OUT  resume OUT/killed from its latest checkpoint (a fresh start: nothing but the files on disk)
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)

from scaled_runs import align_sdxl, common, distill_cifar, distill_pixart  # noqa: E402

STEPS, KILL_AT = 2, 2
COMMON = ["--tiny", "--cpu", "--batch_size", "1", "--mixed_precision", "no", "--no-progress", "--sample_every", "0",
          "--n_samples", "2"]
RUNS = {   # script -> (module, its flags); CIFAR with accumulation, EMA, clipping and checkpoints (the weights are
          # compared); PixArt and SDXL one step without checkpoints (their logged losses are compared)
    "distill_cifar": (distill_cifar, ["--steps", str(STEPS), "--grad_accum", "2", "--ema_decay", "0.9",
                                      "--grad_clip", "1e6", "--checkpoint_every", "1", "--seed", "3"]),
    "distill_pixart": (distill_pixart, ["--steps", "1", "--grad_accum", "1", "--cfg_scale", "1.5",
                                        "--checkpoint_every", "0", "--seed", "1"]),
    "align_sdxl": (align_sdxl, ["--steps", "1", "--grad_accum", "1", "--alpha_rew", "10", "--alpha_cfg", "2",
                                "--cfg_mode", "in", "--checkpoint_every", "0", "--seed", "2"]),
}


def killed_argv(out: Path) -> list[str]:
    return COMMON + RUNS["distill_cifar"][1] + ["--fsdp", "--output_dir", str(out / "killed")]


def main(mode: str, out: str) -> None:
    out = Path(out)
    if mode == "runs":
        for name, (mod, flags) in RUNS.items():
            for kind in ("ddp", "fsdp"):
                mod.main(COMMON + flags + (["--fsdp"] if kind == "fsdp" else []) +
                         ["--output_dir", str(out / f"{name}_{kind}")])
        draw = common.step_generators

        def dying(seed, step, *a, **k):   # the first random draw of step KILL_AT: no cleanup, no finally
            if step == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
            return draw(seed, step, *a, **k)
        common.step_generators = dying
        distill_cifar.main(killed_argv(out))
        raise AssertionError("the killed run went on after its SIGKILL")
    if mode == "resume":
        distill_cifar.main(killed_argv(out) + ["--resume", "latest"])
        return
    raise ValueError(f"mode={mode!r}; allowed: 'runs', 'resume'")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
