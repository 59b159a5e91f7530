"""FSDP2 with 2 CPU processes over gloo (issue 10, item 4 of the brief's FSDP part): torch's own ``fully_shard``
and ``torch.distributed.checkpoint`` around the library's alternating loop (``dstar_edu.distillation.distill``).

Both ranks draw identical batches (one seeded generator), so FSDP's reduce-scatter averages two identical gradients:
``(g + g) / 2 = g`` exactly in binary floating point, and the sharded run must equal the single-process run (the
DDP run with identical batches is the same average) bit for bit: tolerance 0. The sharded checkpoint (generator,
online score, EMA, Adam states) is written by each rank for its own shard and read back into differently
initialised sharded networks, again exactly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
