"""Settings of the scaled runs: the config dataclass and its YAML/flag parser, the accelerate set-up, dtypes,
seeds, noise-level ranges and prompts (no loss math, no training loop)."""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `accelerate launch scaled_runs/x.py` puts only scaled_runs/ on the path
    sys.path.insert(0, str(_ROOT))

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import torch

from dstar_edu.validation import check_choice, check_int, check_positive, check_real

Tensor = torch.Tensor

__all__ = ["BaseConfig", "opt", "parse_config", "read_config_file", "setup_accelerator", "release_accelerator",
           "weight_dtype", "seed_all", "step_generators", "sigma_range", "read_prompts",
           "draw_prompts", "TINY_PROMPTS", "RESUME_ALLOWED_CHANGES"]


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
    checkpoint_every: int = opt(1000, "steps between checkpoints (and one after the last step; 0 = none at all)")
    sample_every: int = opt(1000, "steps between PNG sample grids (0 = only after the last step)")
    n_samples: int = opt(16, "images per sample grid")
    resume: str = opt("", "checkpoint folder to resume from, or 'latest' (in output_dir)")
    tiny: bool = opt(False, "build tiny randomly initialised parts offline instead of loading pretrained ones")
    full_random: bool = opt(False, "with --tiny: the networks at their published full size (configs/arch/*.json), "
                                   "randomly initialised on the run's device (GPU smoke runs; nothing downloaded)")
    gradient_checkpointing: bool = opt(False, "activation checkpointing in the generator and fake networks")
    find_unused_parameters: bool = opt(False, "DDP find_unused_parameters (only if DDP complains)")
    num_threads: int = opt(0, "torch CPU threads (0 = leave torch's default)")
    cpu: bool = opt(False, "force the CPU even when a GPU is present")
    progress: bool = opt(True, "tqdm progress bar on the main process")
    checkpoints_total_limit: int = opt(0, "keep only the newest N checkpoints (0 = keep all; one SDXL checkpoint "
                                          "is ~60 GB)")
    log_with: str = opt("none", "experiment tracker through accelerate (metrics averaged over processes)",
                        ("none", "tensorboard"))
    target_gpus: int = opt(1, "the hardware this config is written for: number of GPUs (scaled_runs.plan checks it)")
    target_gpu_memory_gib: float = opt(80.0, "the hardware this config is written for: memory per GPU in GiB")
    checkpoint_frozen: bool = opt(False, "activation checkpointing of the frozen networks gradients flow through "
                                         "(teacher / reference, VAE decode and reward in the generator loss)")
    lora_rank: int = opt(0, "train LoRA adapters of this rank (peft) on generator and fake score instead of all "
                            "weights (0 = full fine-tuning)")
    lora_alpha: float = opt(0.0, "LoRA alpha (0: equal to lora_rank, scale 1)")
    use_8bit_adam: bool = opt(False, "bitsandbytes' 8-bit Adam (needs a CUDA GPU and `pip install bitsandbytes`)")
    gradient_as_bucket_view: bool = opt(True, "DDP gradients are views into the all-reduce buckets (saves one copy "
                                              "of the gradients)")
    batch_cfg: bool = opt(True, "guided teachers evaluate cond and uncond in one doubled batch (one pass, not two)")
    prompt_embeddings: str = opt("", "folder of safetensors shards written by scaled_runs/encode_prompts.py "
                                     "(the text encoders are then not loaded)")
    fsdp: bool = opt(False, "shard generator, online score and EMA over the processes with torch's FSDP2 "
                            "(fully_shard); checkpoints are torch.distributed.checkpoint shards, one file per rank "
                            "(scaled_runs/fsdp.py)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                check_choice(f.name, getattr(self, f.name), choices)
        if self.mixed_precision == "fp16":
            raise ValueError("mixed_precision='fp16' is refused: fp16 overflows (NaN) in SDXL's VAE and in score "
                             "differences at small sigma; use 'bf16' (or 'no' for fp32)")
        for name in ("steps", "batch_size", "grad_accum", "fake_steps", "log_every", "n_samples"):
            v = getattr(self, name)
            check_int(name, v, lo=1)
        for name in ("sample_every", "num_threads", "checkpoint_every"):
            v = getattr(self, name)
            check_int(name, v, lo=0)
        for name in ("lr_gen", "lr_fake"):
            v = getattr(self, name)
            check_positive(name, v)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            check_real(name, v, 0, 1, hi_open=True)
        for name in ("checkpoints_total_limit", "lora_rank"):
            v = getattr(self, name)
            check_int(name, v, lo=0)
        if self.target_gpus < 1 or not self.target_gpu_memory_gib > 0 or self.lora_alpha < 0:
            raise ValueError(f"need target_gpus >= 1, target_gpu_memory_gib > 0, lora_alpha >= 0, got "
                             f"{self.target_gpus}, {self.target_gpu_memory_gib}, {self.lora_alpha}")
        if self.grad_clip < 0 or self.ema_halflife_kimg < 0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"need grad_clip >= 0, ema_halflife_kimg >= 0 and 0 <= ema_decay < 1, got "
                             f"{self.grad_clip}, {self.ema_halflife_kimg}, {self.ema_decay}")

    def lora_scale_alpha(self) -> float:
        return self.lora_alpha or float(self.lora_rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# settings a resumed run may change (everything else must equal the checkpoint's config)
RESUME_ALLOWED_CHANGES = ("steps", "resume", "log_every", "checkpoint_every", "sample_every", "n_samples", "progress",
                          "num_threads", "checkpoints_total_limit", "log_with", "output_dir", "target_gpus",
                          "target_gpu_memory_gib")


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
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters,
                                              gradient_as_bucket_view=cfg.gradient_as_bucket_view)]
    kw = {}
    if cfg.log_with != "none":
        kw = {"log_with": cfg.log_with, "project_dir": cfg.output_dir}
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       cpu=cfg.cpu, kwargs_handlers=handlers, **kw)


def release_accelerator(accelerator) -> None:
    """End of run: free memory and, in a single-process run, reset accelerate's global state so that another
    run with other settings can start in the same Python process (the tests call ``main`` several times)."""
    try:
        if accelerator.trackers:
            accelerator.end_training()
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
    from dstar_edu.times import edm_sigma_range
    p_lo, hi = edm_sigma_range(process)
    if getattr(process, "discrete", False):
        lo = float(process.edm_sigma(1.0))
    else:
        lo = max(p_lo, 0.002)
    if sigma_min:
        lo = max(lo, float(sigma_min))
    if not 0 < lo < hi:
        raise ValueError(f"empty noise range [{lo:g}, {hi:g}] for {process} (sigma_min={sigma_min})")
    return lo, hi


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
