"""FSDP2 with 2 CPU processes over gloo (issue 10, item 4).

Library level: torch's own ``fully_shard`` and ``torch.distributed.checkpoint`` around the library's alternating loop
(``dstar_edu.distillation.distill``). Both ranks draw identical batches (one seeded generator), so FSDP's
reduce-scatter averages two identical gradients: ``(g + g) / 2 = g`` exactly in binary floating point, and the
sharded run must equal the single-process run (the DDP run with identical batches is the same average) bit for bit:
tolerance 0. The sharded checkpoint (generator, online score, EMA, Adam states) is written by each rank for its own
shard and read back into differently initialised sharded networks, again exactly.

Script level: the three scaled_runs scripts with ``--fsdp`` against the same runs under DDP, a SIGKILLed FSDP run
resumed from its DCP shards, one-process FSDP (one GPU), and the shipped FSDP configs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fsdp_worker.py"


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_fsdp2_equals_single_process_and_dcp_round_trip(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    _run([sys.executable, str(WORKER), "single", str(tmp_path)], tmp_path)
    _run(torchrun + [str(WORKER), "fsdp", str(tmp_path)], tmp_path)
    _run(torchrun + [str(WORKER), "load", str(tmp_path)], tmp_path)
    assert sorted(p.name for p in (tmp_path / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    single, fsdp, loaded = (torch.load(tmp_path / f"{m}.pt") for m in ("single", "fsdp", "load"))
    for name in ("generator", "fake", "generator_ema"):
        assert single[name].keys() == fsdp[name].keys() == loaded[name].keys()
        for k in single[name]:
            assert torch.equal(single[name][k], fsdp[name][k]), (name, k)
            assert torch.equal(fsdp[name][k], loaded[name][k]), (name, k)
    first = next(iter(single["generator"].values()))
    assert float(first.abs().max()) > 0
    for k, st in single["optim"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key], fsdp["optim"][k][key]) and torch.equal(fsdp["optim"][k][key],
                                                                               loaded["optim"][k][key]), (k, key)


# ---- the three scripts under --fsdp (2 gloo processes through torchrun) ----------------------------------------------
SCRIPTS_WORKER = ROOT / "tests" / "fsdp_scripts_worker.py"
LR, BETA2 = 1e-5, 0.999          # the scripts' default Adam settings (beta1 = 0), used by every run of the worker


def _adam_reach(steps: int) -> float:
    """Largest total move of one parameter under Adam with beta1 = 0 in ``steps`` steps: the bias-corrected step
    ``lr g / sqrt(v / (1 - beta2^t))`` with ``v >= (1 - beta2) g^2`` is at most
    ``lr sqrt((1 - beta2^t) / (1 - beta2))``."""
    return sum(LR * ((1 - BETA2 ** t) / (1 - BETA2)) ** 0.5 for t in range(1, steps + 1))


def _weights(run, step, name):
    from safetensors.torch import load_file
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / name / "diffusion_pytorch_model.safetensors"))


def _metrics(run):
    import json
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_scripts_fsdp_equal_ddp_and_resume_after_kill(tmp_path):
    """The three scripts' runs under ``--fsdp`` (generator, online score, EMA sharded; frozen mirror in the generator
    loss; DCP checkpoints) against the same runs under DDP, and a FSDP run SIGKILLed mid-step resumed from its
    sharded checkpoint.

    Tolerances. The two strategies compute the same fp32 operations on the same batches, except that gradients are
    summed in another order (FSDP reduce-scatters every micro-batch, DDP all-reduces the accumulated sum; norms are
    combined from per-shard pieces) and backward matmuls read parameters from FSDP's all-gather buffers. So:
    (a) the first forward (step 1's online-score loss) is bit-identical; (b) step 1's online-score gradient norm,
    one reordered fp32 sum per element and per norm, agrees to n u with u = 2^-24 and n <= 128 terms: 7.6e-6 (1e-5
    asserted); (c) Adam (beta1 = 0) divides each gradient element by its own size, so an element whose gradient is
    at round-off level may step the other way: every parameter stays within twice Adam's reach (``_adam_reach``) of
    its DDP value, and (d) the deviation, as a fraction of the distance the DDP run moved, stays below 5% (round-off
    left it at 0.2-1.2% in our runs; a stale mirror gave a zero generator loss, and a missing gradient sync moves
    every element differently: order 1). The
    logged losses after step 1 follow from (c): asserted within 1e-3 relative (measured <= 3e-5).
    The resumed run repeats the uninterrupted FSDP run bit for bit (same shards, same reduction order, every RNG
    restored), reading only the DCP shards (no full state is written)."""
    from dstar_edu.diffusers_interop import tiny_unet
    from scaled_runs.checkpoints import consolidate
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549"]
    proc = subprocess.run(torchrun + [str(SCRIPTS_WORKER), "runs", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr + proc.stdout, proc.stderr[-4000:]
    killed = tmp_path / "killed"
    assert [r["step"] for r in _metrics(killed)] == [1]             # died in step 2, after checkpoint 1
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_0000001"]
    proc = subprocess.run(torchrun + [str(SCRIPTS_WORKER), "resume", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    for script in ("distill_cifar", "distill_pixart", "align_sdxl"):
        md, mf = _metrics(tmp_path / f"{script}_ddp"), _metrics(tmp_path / f"{script}_fsdp")
        assert len(md) == len(mf) == (2 if script == "distill_cifar" else 1)
        assert md[0]["fake_loss"] == mf[0]["fake_loss"], script                                      # (a)
        assert abs(md[0]["fake_grad_norm"] / mf[0]["fake_grad_norm"] - 1) <= 1e-5, script           # (b)
        for a, b in zip(md, mf):
            for k in ("fake_loss", "generator_loss"):
                assert abs(a[k] - b[k]) <= 1e-3 * abs(a[k]), (script, a["step"], k, a[k], b[k])
    ddp, fsdp, n = tmp_path / "distill_cifar_ddp", tmp_path / "distill_cifar_fsdp", 2
    ck = fsdp / "checkpoints" / f"step_{n:07d}"
    assert sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(ck.rglob("*.safetensors")) and not (ck / "optimizers.pt").exists()
    consolidate(ck)
    for name in ("generator", "fake", "generator_ema"):
        wd, wf = _weights(ddp, n, name), _weights(fsdp, n, name)
        assert wd.keys() == wf.keys()
        worst = max(float((wd[k] - wf[k]).abs().max()) for k in wd)
        assert worst <= 2 * _adam_reach(n), (name, worst)                                                # (c)
        if name != "generator_ema":                                     # (d): both start from the teacher
            start = tiny_unet(seed=3).state_dict()
            moved = sum(float((wd[k] - start[k]).square().sum()) for k in wd) ** 0.5
            dev = sum(float((wd[k] - wf[k]).square().sum()) for k in wd) ** 0.5
            assert moved > 0 and dev <= 0.05 * moved, (name, dev, moved)

    # the killed run, resumed from its step-1 shards, equals the uninterrupted FSDP run bit for bit
    ref = tmp_path / "distill_cifar_fsdp"
    measured = [[{k: v for k, v in r.items() if k == "step" or k.endswith(("_loss", "_norm"))} for r in m]
                for m in (_metrics(killed), _metrics(ref))]
    assert measured[0] == measured[1] and [r["step"] for r in measured[0]] == [1, 2]
    consolidate(killed / "checkpoints" / "step_0000002")
    for name in ("generator", "fake", "generator_ema"):
        a, b = _weights(killed, 2, name), _weights(ref, 2, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_shipped_fsdp_configs():
    """The accelerate launch config is a plain 8-process multi-GPU launch (the scripts shard themselves), and the
    FSDP SDXL config is the full fine-tuning config with only fsdp, the GPU memory and the output folder changed."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    configs = ROOT / "scaled_runs" / "configs"
    acc = load_config_from_file(str(configs / "accelerate" / "fsdp_8gpu.yaml"))
    assert (acc.distributed_type.value, acc.num_processes, acc.mixed_precision) == ("MULTI_GPU", 8, "bf16")
    fsdp, ddp = (yaml.safe_load((configs / n).read_text()) for n in ("sdxl_distar_fsdp_h100.yaml", "sdxl_distar.yaml"))
    changed = {k for k in set(fsdp) | set(ddp) if fsdp.get(k) != ddp.get(k)}
    assert changed == {"fsdp", "target_gpu_memory_gib", "output_dir"} and fsdp["fsdp"] is True


def test_one_process_fsdp_checkpoint_and_refusals(tmp_path):
    """One process (one GPU): --fsdp runs in a one-process group with the same sharded code and DCP checkpoint;
    the consolidated checkpoint holds the trained weights exactly; settings FSDP does not support are refused, and
    so is resuming a sharded checkpoint without --fsdp."""
    from scaled_runs import common, distill_cifar
    from scaled_runs.checkpoints import consolidate
    out = tmp_path / "run"
    argv = ["--tiny", "--cpu", "--steps", "1", "--batch_size", "1", "--num_threads", "1", "--no-progress",
            "--sample_every", "0", "--n_samples", "1", "--ema_decay", "0.9", "--fsdp", "--output_dir", str(out)]
    res = distill_cifar.main(argv)
    assert not torch.distributed.is_initialized()                    # the one-process group is gone again
    ck = out / "checkpoints" / "step_0000001"
    assert sorted(p.name for p in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp"]
    consolidate(ck)
    trained = {k: v.to_local() for k, v in res["generator"].denoiser.unet.state_dict().items()}  # 1 rank: all
    saved = _weights(out, 1, "generator")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    from dstar_edu.diffusers_interop import tiny_unet
    assert any(not torch.equal(saved[k], v) for k, v in tiny_unet(seed=0).state_dict().items())   # it trained
    with pytest.raises(ValueError, match="fsdp"):
        distill_cifar.main([a for a in argv if a != "--fsdp"] + ["--steps", "2", "--resume", "latest"])
    with pytest.raises(ValueError, match="lora_rank"):
        distill_cifar.main(argv + ["--lora_rank", "4", "--output_dir", str(tmp_path / "lora")])
    with pytest.raises(ValueError, match="method='pd'"):
        common.parse_config(distill_cifar.CifarConfig, ["--tiny", "--fsdp", "--method", "pd"])
