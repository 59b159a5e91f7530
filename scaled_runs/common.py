"""Shared plumbing of the scaled runs: configs, accelerate set-up, seeding, EMA, checkpoints, NaN guard, logging,
image grids, and the one alternating (online score, then generator) update loop.

No loss math lives here (DESIGN.md: "scaled_runs imports the library; it never re-implements a loss"): every
loss a script optimises is a ``dstar_edu.objectives`` function, handed to :func:`train_alternating` as a
closure. What this module does know is how to run such a closure at scale correctly:

* gradient accumulation with ``backward`` *inside* ``accelerator.accumulate(model)`` (so DDP skips the
  all-reduce on the accumulation micro-batches and performs it on the last one; a ``backward`` outside the
  context silently skips the all-reduce under accumulation, a pain point reported for DMD2 / SiD code);
* one shared accumulation counter for two phases: each phase runs exactly ``grad_accum`` micro-batches in a
  row, so the counter is a multiple of ``grad_accum`` at each phase's end (checked: a mismatch raises);
* NaN / inf in a loss or a gradient norm stops the run *before* the optimiser step, naming the step and the
  phase, on every process at once (the flag is all-reduced), and a checkpoint is never written from a
  non-finite state;
* bf16 autocast (never fp16: its range overflows in SDXL's VAE and in score differences at small sigma).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `accelerate launch scaled_runs/x.py` puts only scaled_runs/ on the path
    sys.path.insert(0, str(_ROOT))

from dstar_edu.training import EMA  # noqa: E402

Tensor = torch.Tensor

__all__ = ["BaseConfig", "opt", "parse_config", "setup_accelerator", "release_accelerator", "weight_dtype",
           "seed_all", "step_generators", "make_ema", "ema_decay_for", "NonFiniteError", "guard_finite",
           "Saved", "save_checkpoint", "load_checkpoint", "find_checkpoint", "checkpoint_dir", "MetricLogger",
           "save_image_grid", "Phase", "train_alternating", "run_distillation", "sigma_range", "clamp_times",
           "read_prompts", "draw_prompts", "read_metrics", "is_fsdp", "WEIGHTS_NAME"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"   # diffusers' file name: a checkpoint folder loads with from_pretrained


# ---- configs -------------------------------------------------------------------------------------------------
def opt(default, help: str = "", choices=None):
    """A config field with a help string (and optional allowed values), for :func:`parse_config`."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass
class BaseConfig:
    """Settings every scaled run shares (scripts subclass this and add their own)."""

    output_dir: str = opt("runs/scaled", "folder for checkpoints/, samples/, metrics.jsonl, config.json")
    seed: int = opt(0, "seed of the initialisation and of every per-step random draw")
    steps: int = opt(100_000, "generator updates (each preceded by fake_steps online-score updates)")
    batch_size: int = opt(64, "samples per device per micro-batch")
    grad_accum: int = opt(1, "micro-batches accumulated per optimiser step (both phases)")
    fake_steps: int = opt(1, "online (fake) score updates per generator update")
    lr_gen: float = opt(1e-5, "generator Adam learning rate")
    lr_fake: float = opt(1e-5, "online score Adam learning rate")
    adam_beta1: float = opt(0.0, "Adam beta1 (SIM Table 5, Diff-Instruct, SiD: 0)")
    adam_beta2: float = opt(0.999, "Adam beta2")
    grad_clip: float = opt(0.0, "max global gradient norm (0 = no clipping; the norm is still checked for NaN)")
    mixed_precision: str = opt("no", "'no' (fp32) or 'bf16' autocast; fp16 is refused", ("no", "bf16", "fp16"))
    ema_halflife_kimg: float = opt(500.0, "EMA half-life in thousands of generated images (0 = no EMA)")
    ema_decay: float = opt(0.0, "fixed EMA decay per generator step; > 0 overrides ema_halflife_kimg")
    log_every: int = opt(10, "progress-bar refresh period (metrics.jsonl gets every step)")
    checkpoint_every: int = opt(1000, "steps between checkpoints (and one after the last step)")
    sample_every: int = opt(1000, "steps between PNG sample grids (0 = only after the last step)")
    n_samples: int = opt(16, "images per sample grid")
    resume: str = opt("", "checkpoint folder to resume from, or 'latest' (in output_dir)")
    tiny: bool = opt(False, "build tiny randomly initialised parts offline instead of loading pretrained ones")
    gradient_checkpointing: bool = opt(False, "activation checkpointing in the generator and fake networks")
    find_unused_parameters: bool = opt(False, "DDP find_unused_parameters (only if DDP complains)")
    num_threads: int = opt(0, "torch CPU threads (0 = leave torch's default)")
    cpu: bool = opt(False, "force the CPU even when a GPU is present")
    progress: bool = opt(True, "tqdm progress bar on the main process")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not allowed; allowed: {list(choices)}")
        if self.mixed_precision == "fp16":
            raise ValueError("mixed_precision='fp16' is refused: fp16 overflows (NaN) in SDXL's VAE and in score "
                             "differences at small sigma; use 'bf16' (or 'no' for fp32)")
        for name in ("steps", "batch_size", "grad_accum", "fake_steps", "log_every", "checkpoint_every", "n_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("sample_every", "num_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
        for name in ("lr_gen", "lr_fake"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a positive finite number")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name}={v!r} must lie in [0, 1)")
        if self.grad_clip < 0 or self.ema_halflife_kimg < 0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"need grad_clip >= 0, ema_halflife_kimg >= 0 and 0 <= ema_decay < 1, got "
                             f"{self.grad_clip}, {self.ema_halflife_kimg}, {self.ema_decay}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _cast(name: str, value, default):
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ValueError(f"{name}={value!r} must be an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name}={value!r} must be a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string")
        return value
    return value


def read_config_file(path, cls) -> dict:
    """``field: value`` pairs from a YAML (``.yaml``/``.yml``) or JSON file, checked against ``cls``'s fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r} is not a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping of field: value, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"config {path} has unknown fields {unknown}; allowed: {sorted(known)}")
    return {k: _cast(k, v, _field_default(known[k])) for k, v in data.items()}


def parse_config(cls, argv=None):
    """A ``cls`` (a :class:`BaseConfig` dataclass) from ``--config FILE`` and ``--field value`` flags (flags win)."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    parser.add_argument("--config", default=None, help="YAML or JSON file of field: value pairs (flags override it)")
    for f in dataclasses.fields(cls):
        default = _field_default(f)
        help_ = f"{f.metadata.get('help', '')} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), help=help_)
    ns = vars(parser.parse_args(argv))
    path = ns.pop("config", None)
    values = read_config_file(path, cls) if path else {}
    values.update(ns)
    return cls(**values)


# ---- accelerate, dtypes, seeds ---------------------------------------------------------------------------------
def setup_accelerator(cfg: BaseConfig):
    """An ``accelerate.Accelerator`` for ``cfg`` (mixed precision, accumulation, DDP kwargs); sets torch threads."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)]
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       cpu=cfg.cpu, kwargs_handlers=handlers)


def release_accelerator(accelerator) -> None:
    """End of run: free memory and, in a single-process run, reset accelerate's global state so that another
    run with other settings can start in the same Python process (the tests call ``main`` several times)."""
    try:
        accelerator.free_memory()
    except Exception:  # pragma: no cover - best effort
        pass
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def weight_dtype(cfg: BaseConfig) -> torch.dtype:
    """dtype of the *frozen* networks (teacher, text encoders, VAE, reward): bf16 under bf16 mixed precision.
    Trained networks keep fp32 master weights (accelerate autocasts their forward)."""
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (initialisation); per-step draws use :func:`step_generators`."""
    from accelerate.utils import set_seed
    set_seed(seed)


def _derived_seed(*parts) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generators(seed: int, step: int, phase: str, micro: int, rank: int, device) -> tuple[torch.Generator,
                                                                                             torch.Generator]:
    """``(cpu_rng, device_rng)`` for one micro-batch of one phase of one step on one process.

    The seeds are derived from ``(seed, rank, step, phase, micro)`` only, so a resumed run redraws exactly the
    batches of an uninterrupted one, and a test can redraw the batch of a logged loss. The CPU generator is
    for the library's time samplers (float64 draws on the CPU); the device one for noise on the device.
    """
    device = torch.device(device)
    cpu = torch.Generator().manual_seed(_derived_seed(seed, rank, step, phase, micro, "cpu"))
    dev = torch.Generator(device=device).manual_seed(_derived_seed(seed, rank, step, phase, micro, "device"))
    return cpu, dev


# ---- process helpers (noise-level ranges; no loss math) ----------------------------------------------------------
def sigma_range(process, sigma_min: float = 0.0) -> tuple[float, float]:
    """EDM noise-level range ``[lo, hi]`` a time sampler of ``process`` should be truncated to.

    Discrete DDPM teachers are trained on ``t in {1..T}``: ``[edm_sigma(1), edm_sigma(T)]`` (``[0.0100, 157.4]``
    for PixArt's linear schedule; SIM App. B.3 quotes [0.01, 156.6]). Continuous processes:
    ``[max(0.002, edm_sigma(t_min)), edm_sigma(t_max)]`` (EDM's sigma_min = 0.002). ``sigma_min > 0`` raises the
    lower end.
    """
    hi = float(process.edm_sigma(process.t_max))
    if getattr(process, "discrete", False):
        lo = float(process.edm_sigma(1.0))
    else:
        lo = max(float(process.edm_sigma(process.t_min)), 0.002)
    if sigma_min:
        lo = max(lo, float(sigma_min))
    if not 0 < lo < hi:
        raise ValueError(f"empty noise range [{lo:g}, {hi:g}] for {process} (sigma_min={sigma_min})")
    return lo, hi


def clamp_times(sampler: Callable, process, lo: float, hi: float) -> Callable:
    """``sampler`` with its times clamped to the times of EDM noise levels ``[lo, hi]`` of ``process``."""
    from dstar_edu.objectives.pretrain import t_from_edm_sigma
    t_lo = float(t_from_edm_sigma(process, lo))
    t_hi = float(t_from_edm_sigma(process, hi))

    def clamped(n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.as_tensor(sampler(n, generator)).clamp(t_lo, t_hi)
    return clamped


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

    Build it from the *unprepared* module (a plain deep copy on the same device); under FSDP the parameters
    are sharded and this EMA does not apply (turn it off with ``--ema_halflife_kimg 0``).
    """
    decay = ema_decay_for(cfg, images_per_step)
    return None if decay is None else EMA(model, decay)


# ---- NaN guard -------------------------------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    """A loss, a gradient norm or a weight is NaN/inf: the run stops before the update, no checkpoint is written."""


def guard_finite(accelerator, value, *, step: int, what: str, cause: BaseException | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and ``step`` if ``value`` is not finite on *any* process.

    The flag is summed over processes, so every rank raises together (a rank that raised alone would leave
    the others waiting in the next all-reduce). ``cause``: the library's own ``FloatingPointError``, if any.
    """
    bad = value is None or not math.isfinite(float(value))
    flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if float(flag.item()) > 0:
        where = "" if bad else " on another process"
        detail = f" ({cause})" if cause is not None else ""
        raise NonFiniteError(f"{what} is {value if bad else 'finite here, not finite'}{where} at step {step}{detail}: "
                             "the run stopped before the optimiser step and no checkpoint was written for this "
                             "step (check the learning rate, the time range, bf16 vs fp16, the networks' outputs)"
                             ) from cause


# ---- checkpoints -----------------------------------------------------------------------------------------------
def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


@dataclass
class Saved:
    """One network of a checkpoint: ``module`` (prepared or not; its state dict is gathered by accelerate),
    ``config`` (a diffusers ConfigMixin whose ``save_config`` makes the folder ``from_pretrained``-loadable),
    ``strip_prefix`` (removed from the keys, e.g. ``"transformer."`` of an adapter)."""

    module: nn.Module
    config: Any = None
    strip_prefix: str = ""


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


def save_checkpoint(accelerator, output_dir, step: int, networks: dict[str, Saved], *, losses: dict[str, float],
                    optimizers: dict | None = None, meta: dict | None = None) -> Path:
    """Write ``checkpoints/step_{step:07d}/`` with one ``<name>/diffusion_pytorch_model.safetensors`` (+
    ``config.json``) per network, ``optimizers.pt`` and ``state.json``; refuses (``NonFiniteError``) when a loss
    or a weight is not finite. Written to ``<dir>.tmp`` and renamed, so a crash never leaves a half checkpoint.
    Call on every process (FSDP gathers the weights collectively); only the main process writes.
    """
    from safetensors.torch import save_file
    bad = {k: v for k, v in losses.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteError(f"refusing to write the checkpoint of step {step}: losses {bad} are not finite")
    states = {}
    for name, spec in networks.items():
        sd = accelerator.get_state_dict(spec.module)
        p = spec.strip_prefix
        states[name] = {(k[len(p):] if p and k.startswith(p) else k): v.detach() for k, v in sd.items()}
    for name, sd in states.items():
        for k, v in sd.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise NonFiniteError(f"refusing to write the checkpoint of step {step}: {name}.{k} has non-finite "
                                     "entries")
    final = checkpoint_dir(output_dir, step)
    if accelerator.is_main_process:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, sd in states.items():
            (tmp / name).mkdir()
            save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(tmp / name / WEIGHTS_NAME),
                      metadata={"format": "pt", "step": str(step)})
            cfg_src = networks[name].config
            if cfg_src is not None and hasattr(cfg_src, "save_config"):
                cfg_src.save_config(tmp / name)
        if optimizers and not is_fsdp(accelerator):   # FSDP optimiser states are sharded: weights-only resume
            torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, **(meta or {})}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path) -> dict:
    """``{"state": state.json, "networks": {name: state dict}, "optimizers": dict | None}`` of a checkpoint."""
    from safetensors.torch import load_file
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    nets = {p.name: load_file(str(p / WEIGHTS_NAME)) for p in sorted(path.iterdir()) if (p / WEIGHTS_NAME).is_file()}
    opt_path = path / "optimizers.pt"
    optimizers = torch.load(opt_path, map_location="cpu", weights_only=True) if opt_path.is_file() else None
    return {"state": state, "networks": nets, "optimizers": optimizers}


# ---- logging and images ------------------------------------------------------------------------------------------
class MetricLogger:
    """Every step's values as one JSON line in ``output_dir/metrics.jsonl`` and a tqdm bar, on the main process."""

    def __init__(self, accelerator, output_dir, total: int, initial: int = 0, desc: str = "train",
                 every: int = 10, progress: bool = True):
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        self.every = every
        self.t0 = time.perf_counter()
        self.bar = None
        if self.main and progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.main:
            return
        rec = {"step": step, "seconds": round(time.perf_counter() - self.t0, 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            if step % self.every == 0:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float)})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(output_dir) -> list[dict]:
    """The records of ``metrics.jsonl`` (one dict per logged step)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def save_image_grid(images: Tensor, path, nrow: int | None = None) -> Path:
    """Save ``(N, C, H, W)`` images in ``[-1, 1]`` as one PNG grid (PIL); returns the path."""
    from PIL import Image
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    N, C, H, W = x.shape
    ncol = nrow or math.ceil(math.sqrt(N))
    nrows = math.ceil(N / ncol)
    grid = torch.zeros(C, nrows * H, ncol * W, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, ncol)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if C == 1 else arr).save(path)
    return path


# ---- the alternating loop ------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One side of the alternating update: ``loss_fn(step, micro) -> (scalar loss, {name: float})`` optimised by
    ``optimizer`` (prepared) over ``model`` (the prepared network whose gradients DDP syncs)."""

    name: str
    model: nn.Module
    optimizer: Any
    loss_fn: Callable[[int, int], tuple[Tensor, dict]]


def _run_phase(accelerator, phase: Phase, step: int, first_micro: int, grad_clip: float) -> dict:
    K = accelerator.gradient_accumulation_steps
    values, extras, norm = [], {}, float("nan")
    for m in range(K):
        with accelerator.accumulate(phase.model):
            loss, extra, err = None, {}, None
            try:
                with accelerator.autocast():
                    loss, extra = phase.loss_fn(step, first_micro + m)
            except FloatingPointError as e:   # the library's losses raise on NaN/inf: add the step, stop everywhere
                err = e
            value = float(loss.detach().float()) if loss is not None else float("nan")
            guard_finite(accelerator, value, step=step, what=f"{phase.name} loss", cause=err)
            accelerator.backward(loss)          # inside accumulate(): no all-reduce until the last micro-batch
            if accelerator.sync_gradients:
                params = [p for g in phase.optimizer.param_groups for p in g["params"]]
                norm = float(accelerator.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf))
                guard_finite(accelerator, norm, step=step, what=f"{phase.name} gradient norm")
                phase.optimizer.step()
                phase.optimizer.zero_grad(set_to_none=True)
        values.append(value)
        for k, v in extra.items():
            extras.setdefault(k, []).append(float(v))
    if not accelerator.sync_gradients:
        raise RuntimeError(f"{phase.name} phase of step {step} ended without an optimiser step: accelerate's "
                           "accumulation counter is out of step (every phase must run grad_accum micro-batches)")
    out = {f"{phase.name}_loss": sum(values) / K, f"{phase.name}_grad_norm": norm}
    out.update({f"{phase.name}_{k}": sum(v) / len(v) for k, v in extras.items()})
    return out


def train_alternating(accelerator, cfg: BaseConfig, *, fake: Phase, gen: Phase, ema: EMA | None, start_step: int,
                      save_fn: Callable[[int, dict], Any], sample_fn: Callable[[int], Any] | None = None,
                      desc: str = "distill") -> list[dict]:
    """SIM Alg. 1-2 / DI* Alg. 1 / Diff-Instruct Alg. 1 at scale: for each step, ``cfg.fake_steps`` online-score
    updates then one generator update (each over ``cfg.grad_accum`` micro-batches), the EMA update, logging,
    samples and checkpoints. Steps are numbered from 1; ``start_step`` steps are already done (resume).
    Returns the logged records."""
    logger = MetricLogger(accelerator, cfg.output_dir, cfg.steps, start_step, desc, cfg.log_every, cfg.progress)
    K = accelerator.gradient_accumulation_steps
    records = []
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            rec: dict = {}
            for r in range(cfg.fake_steps):
                out = _run_phase(accelerator, fake, step, r * K, cfg.grad_clip)
                for k, v in out.items():
                    rec[k] = rec.get(k, 0.0) + v / cfg.fake_steps
            rec.update(_run_phase(accelerator, gen, step, 0, cfg.grad_clip))
            if ema is not None:
                ema.update()
            logger.log(step, rec)
            records.append({"step": step, **rec})
            last = step == cfg.steps
            if sample_fn is not None and (last or (cfg.sample_every and step % cfg.sample_every == 0)):
                sample_fn(step)
            if last or step % cfg.checkpoint_every == 0:
                save_fn(step, {k: v for k, v in rec.items() if k.endswith("_loss")})
    finally:
        logger.close()
    return records


def write_config(accelerator, cfg: BaseConfig) -> None:
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))


@contextlib.contextmanager
def eval_mode(*modules):
    """Put modules in eval mode inside the block and restore their previous modes."""
    modes = [(m, m.training) for m in modules if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.train(was)


# ---- the whole distillation run around the loop --------------------------------------------------------------------
def _load_into(module: nn.Module, state: dict, prefix: str = "") -> None:
    module.load_state_dict({prefix + k: v for k, v in state.items()})


def run_distillation(accelerator, cfg: BaseConfig, *, generator: nn.Module, fake_net: nn.Module, fake,
                     fake_loss: Callable, gen_loss: Callable, images: Callable | None = None,
                     config_of: Callable[[nn.Module], Any] = lambda m: m, strip_prefix: str = "",
                     meta: dict | None = None, desc: str = "distill") -> dict:
    """Resume, EMA, Adam, ``accelerator.prepare``, checkpoints, sample grids and :func:`train_alternating`, for a
    teacher-initialised ``generator`` (``generator.denoiser.unet`` is its network) and an online score ``fake``
    (a ``DiffusersUNetPredictor`` over ``fake_net``).

    ``fake_loss(step, micro, fake_train)`` and ``gen_loss(step, micro, fake_eval)`` return ``(loss, {name: float})``;
    ``fake_train`` sees the fake network through its DDP wrapper (its own phase), ``fake_eval`` unwrapped (the
    generator loss, which freezes its parameters). ``images(model, n) -> (n, C, H, W)`` in ``[-1, 1]`` renders
    the sample grids (``model`` is the EMA generator if any, else the generator). ``config_of(net)`` is the
    diffusers ConfigMixin saved next to a network's weights, ``strip_prefix`` the adapter prefix of its keys.
    Returns ``{"records", "checkpoint", "generator", "ema", "fake_net", "optimizers"}``.
    """
    from scaled_runs.adapters import predictor_view
    ckpt, start_step = None, 0
    if cfg.resume:
        ckpt = load_checkpoint(find_checkpoint(cfg.resume, cfg.output_dir))
        _load_into(generator.denoiser.unet, ckpt["networks"]["generator"], strip_prefix)
        _load_into(fake_net, ckpt["networks"]["fake"], strip_prefix)
        start_step = int(ckpt["state"]["step"])
        if start_step >= cfg.steps:
            raise ValueError(f"resume: the checkpoint is at step {start_step} >= steps={cfg.steps}; raise --steps")
        if accelerator.is_main_process:          # drop records of steps after the checkpoint (a crashed run's)
            kept = [r for r in read_metrics(cfg.output_dir) if r["step"] <= start_step]
            (Path(cfg.output_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    if is_fsdp(accelerator) and ema_decay_for(cfg, 1) is not None:
        raise ValueError("the EMA copies unsharded weights and cannot follow FSDP's sharded ones: pass "
                         "--ema_halflife_kimg 0 (and --ema_decay 0) under FSDP")
    ema = make_ema(generator, cfg, cfg.batch_size * cfg.grad_accum * accelerator.num_processes)
    if ema is not None and ckpt is not None and "generator_ema" in ckpt["networks"]:
        _load_into(ema.model.denoiser.unet, ckpt["networks"]["generator_ema"], strip_prefix)
    if cfg.gradient_checkpointing:
        for net in (generator.denoiser.unet, fake_net):
            target = getattr(net, "transformer", net)
            if hasattr(target, "enable_gradient_checkpointing"):
                target.enable_gradient_checkpointing()

    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_gen = torch.optim.Adam(generator.parameters(), lr=cfg.lr_gen, betas=betas)
    opt_fake = torch.optim.Adam(fake_net.parameters(), lr=cfg.lr_fake, betas=betas)
    gen_net, fake_p, opt_gen, opt_fake = accelerator.prepare(generator.denoiser.unet, fake_net, opt_gen, opt_fake)
    generator.denoiser.unet = gen_net            # the generator trains through the (DDP-)prepared network
    if ckpt is not None and ckpt["optimizers"] is not None:
        opt_gen.load_state_dict(ckpt["optimizers"]["generator"])
        opt_fake.load_state_dict(ckpt["optimizers"]["fake"])
    fake_train = predictor_view(fake, fake_p)
    # DDP: the generator loss must not run the DDP wrapper (its reducer would wait for gradients of the frozen
    # parameters), so it sees the unwrapped module. FSDP shards the parameters: only the wrapper can run them
    # (untested here: no GPU; see README).
    fake_eval = fake_train if is_fsdp(accelerator) else fake
    last: dict = {}

    def save(step: int, losses: dict):
        nets = {"generator": Saved(gen_net, config_of(accelerator.unwrap_model(gen_net)), strip_prefix),
                "fake": Saved(fake_p, config_of(accelerator.unwrap_model(fake_p)), strip_prefix)}
        if ema is not None:
            nets["generator_ema"] = Saved(ema.model.denoiser.unet, config_of(ema.model.denoiser.unet), strip_prefix)
        info = {"t_star": getattr(generator, "t_star", None), "sigma_star": getattr(generator, "sigma_star", None),
                "ema_decay": None if ema is None else ema.decay, **(meta or {})}
        last["checkpoint"] = save_checkpoint(accelerator, cfg.output_dir, step, nets, losses=losses,
                                             optimizers={"generator": opt_gen, "fake": opt_fake}, meta=info)

    def sample(step: int):
        model = ema.model if ema is not None else generator
        with torch.no_grad(), accelerator.autocast():   # on every process: the generator may be DDP-wrapped
            x = images(model, cfg.n_samples)
        if accelerator.is_main_process:
            save_image_grid(x, Path(cfg.output_dir) / "samples" / f"step_{step:07d}.png")

    fake_net.train()
    records = train_alternating(
        accelerator, cfg, fake=Phase("fake", fake_p, opt_fake, lambda s, m: fake_loss(s, m, fake_train)),
        gen=Phase("generator", gen_net, opt_gen, lambda s, m: gen_loss(s, m, fake_eval)), ema=ema,
        start_step=start_step, save_fn=save, sample_fn=sample if images is not None else None, desc=desc)
    return {"records": records, "checkpoint": last.get("checkpoint"), "generator": generator, "ema": ema,
            "fake_net": accelerator.unwrap_model(fake_p), "optimizers": {"generator": opt_gen, "fake": opt_fake}}


# ---- prompts ------------------------------------------------------------------------------------------------------
TINY_PROMPTS = ("a photo of the red car", "a painting of the blue house", "a photo of a cat", "the green sky",
                "a dog", "a red house", "a painting of a car", "the blue sky")


def read_prompts(path: str, tiny: bool = False) -> list[str]:
    """Non-empty lines of a text file (one prompt per line); ``TINY_PROMPTS`` in tiny mode without a file."""
    if not path:
        if tiny:
            return list(TINY_PROMPTS)
        raise ValueError("prompts='' : pass --prompts FILE (one prompt per line)")
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no non-empty line")
    return prompts


def draw_prompts(prompts: list[str], n: int, cpu_rng: torch.Generator) -> list[str]:
    """``n`` prompts drawn uniformly with replacement (seeded)."""
    idx = torch.randint(len(prompts), (n,), generator=cpu_rng)
    return [prompts[i] for i in idx.tolist()]
