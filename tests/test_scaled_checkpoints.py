"""Checkpoints, resume and observability of the scaled runs (issue 10, items 5-6 and 8's --tiny smoke run)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="scaled_runs needs accelerate")
pytest.importorskip("transformers", reason="scaled_runs needs transformers")

from safetensors.torch import load_file  # noqa: E402

from scaled_runs import common, distill_cifar  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
W = common.WEIGHTS_NAME


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """A CIFAR teacher whose ResNet blocks have dropout 0.3: the online score trains in train mode, so every
    fake-score step draws dropout masks from the global RNG. Three steps, a checkpoint every step, at most 2
    kept, tensorboard logging."""
    from diffusers import DDPMScheduler

    from dstar_edu.diffusers_interop import tiny_unet
    root = tmp_path_factory.mktemp("ckpt")
    tiny_unet(seed=3, dropout=0.3).save_pretrained(root / "teacher" / "unet")
    DDPMScheduler().save_pretrained(root / "teacher" / "scheduler")
    argv = ["--teacher", str(root / "teacher"), "--steps", "3", "--batch_size", "2", "--checkpoint_every", "1",
            "--checkpoints_total_limit", "2", "--sample_every", "0", "--n_samples", "1", "--ema_decay", "0.9",
            "--no-progress", "--num_threads", "1", "--log_with", "tensorboard"]
    res = distill_cifar.main(argv + ["--output_dir", str(root / "a")])
    return {"root": root, "argv": argv, "res": res}


def _weights(ckpt: Path) -> dict:
    return {n: load_file(str(ckpt / n / W)) for n in ("generator", "fake", "generator_ema")}


def test_rotation_keeps_the_newest(dropout_run):
    ckpts = sorted(p.name for p in (dropout_run["root"] / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000003"]
    state = (dropout_run["root"] / "a" / "checkpoints" / "step_0000003" / "state.json").read_text()
    assert list(json.loads(state)) == sorted(json.loads(state))            # fixed key order
    assert (dropout_run["root"] / "a" / "checkpoints" / "step_0000003" / "rng_state_0.pt").is_file()


def test_resume_with_dropout_is_bit_exact_and_needs_the_rng(dropout_run):
    """Resuming from step 2 reproduces step 3 bit for bit (weights, EMA). Without the saved global RNG state
    (dropout masks of the online score) it does not: the check is not vacuous."""
    root, argv = dropout_run["root"], dropout_run["argv"]
    full = _weights(root / "a" / "checkpoints" / "step_0000003")
    for name, keep_rng in (("b", True), ("c", False)):
        out = root / name
        shutil.copytree(root / "a" / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
        if not keep_rng:
            (out / "checkpoints" / "step_0000002" / "rng_state_0.pt").unlink()
        torch.manual_seed(1234)                          # the global RNG of this process is not the run's
        distill_cifar.main(argv + ["--output_dir", str(out), "--resume", "latest"])
        resumed = _weights(out / "checkpoints" / "step_0000003")
        same = all(torch.equal(full[n][k], resumed[n][k]) for n in full for k in full[n])
        assert same is keep_rng, name


def test_resume_refuses_a_changed_config(dropout_run):
    root, argv = dropout_run["root"], dropout_run["argv"]
    out = root / "d"
    shutil.copytree(root / "a" / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
    with pytest.raises(ValueError, match=r"lr_gen: 1e-05 -> 2e-05.*only .*steps"):
        distill_cifar.main(argv + ["--output_dir", str(out), "--resume", "latest", "--lr_gen", "2e-5"])


def test_tensorboard_scalars_equal_metrics(dropout_run):
    """accelerate's tensorboard tracker got every step's losses, throughput and peak memory (single process:
    the mean over ranks is rank 0's value; tensorboard stores float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = dropout_run["root"] / "a"
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    recs = common.read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("generator_loss", "fake_loss", "images_per_second", "peak_memory_gib", "step_seconds"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        for r in recs:
            assert abs(got[r["step"]] - r[key]) <= 2 ** -23 * abs(r[key]), key   # float32 rounding
    assert all(r["peak_memory_gib"] > 0 and r["images_per_second"] > 0 for r in recs)


def test_gpu_smoke_tiny_end_to_end(tmp_path):
    """scaled_runs/gpu_smoke.sh --tiny: the SDXL and PixArt scripts (those the GPU smoke runs at full size), bf16
    and fp32, JSON + markdown report. Step-1 online-score
    losses agree within bf16's u = 2^-8 (the tolerance of tests/test_scaled_precision.py)."""
    out = tmp_path / "smoke"
    proc = subprocess.run(["bash", str(ROOT / "scaled_runs" / "gpu_smoke.sh"), "--tiny", "--steps", "1", "--out",
                           str(out), "--scripts", "align_sdxl", "distill_pixart"], capture_output=True, text=True, timeout=900,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"align_sdxl", "distill_pixart"}
    for name, r in report["runs"].items():
        assert r["all_finite"] and r["peak_gib_bf16"] > 0 and r["step_seconds_bf16"] > 0, name
        assert r["step1_relative_difference"]["fake_loss"] <= 2 ** -8, name
        # the tiny plan counts tiny networks only: every tiny part is < 2M parameters (< 0.01 GiB in fp32), while the
        # full-size text encoders / CLIP-H / T5-XXL rows alone would add >= 1.5 GiB
        assert 0 < r["planned_peak_gib_bf16"] < 0.1, (name, r["planned_peak_gib_bf16"])
    assert "| align_sdxl |" in (out / "report.md").read_text()


def test_two_process_ddp_with_tracker_and_rotation(tmp_path):
    """torchrun with 2 CPU processes (gloo DDP; `accelerate launch --cpu --num_processes 2` would start one):
    the tracker's cross-rank mean is a collective on every rank (it hung when only the main process, which holds
    the tracker, entered it); each rank writes its own RNG file; rotation keeps the newest checkpoint."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29547", str(ROOT / "scaled_runs" / "distill_cifar.py"), "--tiny", "--cpu", "--steps", "2",
                           "--batch_size", "2", "--grad_accum", "2", "--output_dir", str(out), "--no-progress",
                           "--log_with", "tensorboard", "--checkpoints_total_limit", "1", "--checkpoint_every", "1",
                           "--sample_every", "0", "--n_samples", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    names = sorted(p.name for p in (out / "checkpoints" / "step_0000002").iterdir())
    assert {"rng_state_0.pt", "rng_state_1.pt", "optimizers.pt", "state.json"} <= set(names)
    assert [r["step"] for r in common.read_metrics(out)] == [1, 2] and list(out.rglob("events.out.tfevents.*"))
