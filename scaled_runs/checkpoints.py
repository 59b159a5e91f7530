"""Checkpoints of the scaled runs: EMA, safetensors weights loadable with diffusers' ``from_pretrained``,
optimiser and RNG states, rotation (``checkpoints_total_limit``), and the config check on resume."""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `accelerate launch scaled_runs/x.py` puts only scaled_runs/ on the path
    sys.path.insert(0, str(_ROOT))

import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dstar_edu.distillation import NonFiniteError  # noqa: E402
from dstar_edu.training import EMA  # noqa: E402
from scaled_runs.config import BaseConfig  # noqa: E402

__all__ = ["WEIGHTS_NAME", "ema_decay_for", "make_ema", "is_fsdp", "Saved", "checkpoint_dir", "find_checkpoint",
           "save_checkpoint", "load_checkpoint", "rotate_checkpoints", "rng_state", "set_rng_state", "load_rng_state",
           "check_resume_config", "save_sharded", "load_sharded", "consolidate"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"   # diffusers' file name: a checkpoint folder loads with from_pretrained


# ---- EMA -----------------------------------------------------------------------------------------------------------
def ema_decay_for(cfg: BaseConfig, images_per_step: int) -> float | None:
    """EMA decay per generator step: ``cfg.ema_decay`` if set, else ``0.5 ** (images_per_step / half-life)``
    with the half-life in images (Diff-Instruct / SiD on CIFAR: 500 kimg); ``None`` = no EMA."""
    if cfg.ema_decay > 0:
        return float(cfg.ema_decay)
    if cfg.ema_halflife_kimg > 0:
        return 0.5 ** (images_per_step / (cfg.ema_halflife_kimg * 1000.0))
    return None


def make_ema(model: nn.Module, cfg: BaseConfig, images_per_step: int) -> EMA | None:
    """The library's ``training.EMA`` of ``model`` (``theta_ema <- d theta_ema + (1 - d) theta``) or None.

    Build it from the *unprepared* module (a plain deep copy on the same device); under ``--fsdp`` the copy is then
    sharded like the generator (``loop.run_distillation``), and the update works on the local shards.
    """
    decay = ema_decay_for(cfg, images_per_step)
    return None if decay is None else EMA(model, decay)


# ---- checkpoints -----------------------------------------------------------------------------------------------
def is_fsdp(accelerator) -> bool:
    """Whether accelerate itself runs FSDP (its distributed type; refused by the scripts, which shard with
    ``--fsdp`` themselves: ``scaled_runs/fsdp.py``)."""
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


@dataclass
class Saved:
    """One network of a checkpoint: ``module`` (prepared or not; its state dict is gathered by accelerate),
    ``config`` (a diffusers ConfigMixin whose ``save_config`` makes the folder ``from_pretrained``-loadable)."""

    module: nn.Module
    config: Any = None


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def find_checkpoint(output_dir_or_path: str, output_dir: str | None = None) -> Path:
    """``'latest'`` -> the newest ``checkpoints/step_*`` of ``output_dir``; a path -> that folder (checked)."""
    if output_dir_or_path == "latest":
        root = Path(output_dir) / "checkpoints"
        found = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        if not found:
            raise ValueError(f"resume='latest' but {root} holds no checkpoint")
        return found[-1]
    path = Path(output_dir_or_path)
    if not (path / "state.json").is_file():
        raise ValueError(f"resume={output_dir_or_path!r} is not a checkpoint folder (no state.json)")
    return path


def rng_state() -> dict:
    """Every random state of this process: python, numpy, torch's CPU generator and all CUDA generators
    (dropout and any unseeded draw use these; the per-step draws are re-derived by ``step_generators``)."""
    import random

    import numpy as np
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states."""
    import random

    import numpy as np
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rotate_checkpoints(output_dir, limit: int) -> list[Path]:
    """Delete the oldest ``checkpoints/step_*`` folders so that at most ``limit`` remain (0 = keep all); returns
    the deleted folders."""
    if limit <= 0:
        return []
    found = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step_*")
                   if p.is_dir() and not p.name.endswith(".tmp"))
    gone = found[:max(0, len(found) - limit)]
    for p in gone:
        shutil.rmtree(p)
    return gone


def check_resume_config(saved: dict, current: dict, allowed=None) -> None:
    """Refuse to resume with settings that differ from the checkpoint's, except ``allowed``
    (``config.RESUME_ALLOWED_CHANGES``: steps, logging, checkpoint cadence, ...)."""
    from scaled_runs.config import RESUME_ALLOWED_CHANGES
    allowed = set(RESUME_ALLOWED_CHANGES if allowed is None else allowed)
    changed = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
               if k not in allowed and saved.get(k) != current.get(k)}
    if changed:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"resume: the config differs from the checkpoint's in {lines}; only {sorted(allowed)} may "
                         "change on resume (start a new output_dir to change anything else)")


def save_checkpoint(accelerator, output_dir, step: int, networks: dict[str, Saved], *, losses: dict[str, float],
                    optimizers: dict | None = None, meta: dict | None = None, total_limit: int = 0) -> Path:
    """Write ``checkpoints/step_{step:07d}/`` with one ``<name>/diffusion_pytorch_model.safetensors`` (+
    ``config.json``) per network, ``optimizers.pt`` and ``state.json``; refuses (``NonFiniteError``) when a loss
    or a weight is not finite. Written to ``<dir>.tmp`` and renamed, so a crash never leaves a half checkpoint.
    Every process adds ``rng_state_<rank>.pt`` (:func:`rng_state`); ``state.json`` is written with sorted keys
    (equal states give equal files); ``total_limit`` > 0 then deletes the oldest checkpoints beyond it.
    Call on every process; only the main process writes the weights. FSDP-sharded networks (``--fsdp``) are not
    gathered: every rank writes its own shard of the networks and optimisers with :func:`save_sharded` into
    ``dcp/`` (next to each network's ``config.json``); ``python -m scaled_runs.checkpoints consolidate DIR`` turns
    that into ``from_pretrained`` folders offline.
    """
    from safetensors.torch import save_file
    bad = {k: v for k, v in losses.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteError(f"refusing to write the checkpoint of step {step}: losses {bad} are not finite")
    from scaled_runs.fsdp import is_sharded
    sharded = any(is_sharded(spec.module) for spec in networks.values())
    states = {}
    for name, spec in networks.items():
        sd = spec.module.state_dict() if sharded else accelerator.get_state_dict(spec.module)
        states[name] = {k: (v.to_local() if hasattr(v, "to_local") else v).detach() for k, v in sd.items()}
    bad = [f"{name}.{k}" for name, sd in states.items() for k, v in sd.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if sharded:                                  # each rank checked its own shards: decide together
        flag = torch.tensor([float(len(bad))], device=accelerator.device)
        torch.distributed.all_reduce(flag)
        if float(flag) > 0 and not bad:
            bad = ["a shard of another process"]
    if bad:
        raise NonFiniteError(f"refusing to write the checkpoint of step {step}: {bad[0]} has non-finite entries")
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, sd in states.items():
            (tmp / name).mkdir()
            if not sharded:
                save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(tmp / name / WEIGHTS_NAME),
                          metadata={"format": "pt", "step": str(step)})
            cfg_src = networks[name].config
            if cfg_src is not None and hasattr(cfg_src, "save_config"):
                cfg_src.save_config(tmp / name)
        if optimizers and not sharded:
            torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, **(meta or {})}, indent=1,
                                                   sort_keys=True))
    accelerator.wait_for_everyone()
    if sharded:                                  # every rank writes its own shard (collective)
        save_sharded(tmp / "dcp", {k: spec.module for k, spec in networks.items()},
                     {k: getattr(o, "optimizer", o) for k, o in (optimizers or {}).items()})
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path) -> dict:
    """``{"state": state.json, "networks": {name: state dict}, "optimizers": dict | None, "sharded": bool}`` of a
    checkpoint (a sharded one holds no full state: its networks and optimisers load with :func:`load_sharded`)."""
    from safetensors.torch import load_file
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    nets = {p.name: load_file(str(p / WEIGHTS_NAME)) for p in sorted(path.iterdir()) if (p / WEIGHTS_NAME).is_file()}
    opt_path = path / "optimizers.pt"
    optimizers = torch.load(opt_path, map_location="cpu", weights_only=True) if opt_path.is_file() else None
    return {"state": state, "networks": nets, "optimizers": optimizers, "path": path,
            "sharded": (path / "dcp").is_dir()}


def load_rng_state(path, rank: int) -> dict | None:
    """This process's :func:`rng_state` from a checkpoint folder (None when absent)."""
    f = Path(path) / f"rng_state_{rank}.pt"
    return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None




# ---- sharded (FSDP2) checkpoints -------------------------------------------------------------------------------------
def save_sharded(path, models: dict, optimizers: dict | None = None) -> Path:
    """Save FSDP2-sharded ``models`` (name -> module, e.g. generator, fake, generator_ema) and ``optimizers``
    (name -> optimizer of the same-named model) with ``torch.distributed.checkpoint``: every rank writes its own
    shard (``__<rank>_0.distcp``) and no full state is gathered anywhere. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
    for k, o in (optimizers or {}).items():
        state[f"optim.{k}"] = get_optimizer_state_dict(models[k], o)
    dcp.save(state, checkpoint_id=str(path))
    return Path(path)


def load_sharded(path, models: dict, optimizers: dict | None = None) -> None:
    """Load :func:`save_sharded`'s checkpoint into already sharded ``models`` / ``optimizers`` (each rank reads
    the pieces of its own shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {f"model.{k}": get_model_state_dict(m) for k, m in models.items()}
    for k, o in (optimizers or {}).items():
        state[f"optim.{k}"] = get_optimizer_state_dict(models[k], o)
    dcp.load(state, checkpoint_id=str(path))
    for k, m in models.items():
        set_model_state_dict(m, state[f"model.{k}"])
    for k, o in (optimizers or {}).items():
        set_optimizer_state_dict(models[k], o, state[f"optim.{k}"])


def consolidate(path) -> list[Path]:
    """Turn a sharded checkpoint folder (``--fsdp``: ``dcp/`` + each network's ``config.json``) into the folders
    a DDP checkpoint has: ``<name>/diffusion_pytorch_model.safetensors`` (``from_pretrained``-loadable), and the
    optimiser states (keyed by parameter name) in ``optimizers_by_name.pt``. Offline, in one process, with the
    whole state in CPU memory. Returns the weight files."""
    import tempfile

    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = Path(path)
    if not (path / "dcp" / ".metadata").is_file():
        raise ValueError(f"path={str(path)!r} is not a sharded checkpoint folder (no dcp/.metadata)")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path / "dcp", Path(tmp) / "full.pt")
        full = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)
    written, optim = [], {}
    for key, sd in sorted(full.items()):
        kind, name = key.split(".", 1)
        if kind == "model":
            (path / name).mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path / name / WEIGHTS_NAME),
                      metadata={"format": "pt"})
            written.append(path / name / WEIGHTS_NAME)
        else:
            optim[name] = sd
    if optim:   # torch.distributed.checkpoint's parameter-name-keyed optimiser states (get_optimizer_state_dict)
        torch.save(optim, path / "optimizers_by_name.pt")
    return written


if __name__ == "__main__":
    import argparse
    _parser = argparse.ArgumentParser(description="scaled_runs checkpoint tools")
    _parser.add_argument("command", choices=["consolidate"])
    _parser.add_argument("path", help="a checkpoint folder checkpoints/step_N written with --fsdp")
    _args = _parser.parse_args()
    for _f in consolidate(_args.path):
        print(_f)
