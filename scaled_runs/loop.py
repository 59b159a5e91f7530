"""The training loop of the scaled runs around the library's one alternating loop
(``dstar_edu.distillation.alternate`` and its NaN-guarded ``guarded_update``): gradient accumulation inside
``accelerator.accumulate``, the distributed NaN stop, metrics, sample grids, and the whole run
(:func:`run_distillation`: resume, EMA, optimisers, ``accelerator.prepare``, checkpoints).

No loss math lives here (DESIGN.md: "scaled_runs imports the library; it never re-implements a loss"): every
loss a script optimises is a ``dstar_edu.objectives`` function, handed over as a closure. What this module knows
is how to run such a closure at scale:

* ``backward`` *inside* ``accelerator.accumulate(model)`` (DDP all-reduces only on the last micro-batch; a
  ``backward`` outside the context silently skips the all-reduce under accumulation);
* one shared accumulation counter for two phases: each phase runs exactly ``grad_accum`` micro-batches in a
  row (checked: a phase ending without an optimiser step raises);
* NaN / inf in a loss or a gradient norm stops the run before the optimiser step on every process at once;
* bf16 autocast (never fp16: its range overflows in SDXL's VAE and in score differences at small sigma).
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `accelerate launch scaled_runs/x.py` puts only scaled_runs/ on the path
    sys.path.insert(0, str(_ROOT))

import contextlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dstar_edu.distillation import NonFiniteError, alternate, guarded_update  # noqa: E402
from dstar_edu.objectives.distill import frozen  # noqa: E402
from dstar_edu.training import EMA  # noqa: E402
from scaled_runs.checkpoints import (Saved, check_resume_config, find_checkpoint,  # noqa: E402
                                     load_checkpoint, load_rng_state, load_sharded, make_ema,
                                     save_checkpoint, set_rng_state)
from scaled_runs.config import BaseConfig  # noqa: E402

Tensor = torch.Tensor

__all__ = ["NonFiniteError", "guard_finite", "MetricLogger", "read_metrics", "save_image_grid", "Phase",
           "train_alternating", "run_distillation", "distillation_run", "write_config", "eval_mode"]


# ---- NaN guard -------------------------------------------------------------------------------------------------
def any_rank(accelerator) -> Callable[[bool], bool]:
    """``bad -> True if bad on any process``: the all-reduced flag of ``guarded_update`` (a rank that raised
    alone would leave the others waiting in the next collective)."""
    def bad_anywhere(bad: bool) -> bool:
        flag = torch.tensor([1.0 if bad else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return float(flag.item()) > 0
    return bad_anywhere


def guard_finite(accelerator, value, *, step: int, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and ``step`` if ``value`` is not finite on any process."""
    bad = value is None or not math.isfinite(float(value))
    if any_rank(accelerator)(bad):
        raise NonFiniteError(f"{what} is {value if bad else 'finite here, not finite on another process'} at step "
                             f"{step}: the run stopped and nothing was written for this step")


# ---- logging and images ------------------------------------------------------------------------------------------
class MetricLogger:
    """Every step's values as one JSON line in ``output_dir/metrics.jsonl`` and a tqdm bar, on the main process."""

    def __init__(self, accelerator, output_dir, total: int, initial: int = 0, desc: str = "train",
                 every: int = 10, progress: bool = True, track: bool = False):
        self.accelerator, self.track = accelerator, track
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        self.every = every
        self.t0 = time.perf_counter()
        self.bar = None
        if self.main and progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        """Write rank 0's values to metrics.jsonl; the tracker (``log_with``) gets the means over processes.
        Called on every process (the mean is a collective)."""
        if self.track:                 # on every process (trackers exist on the main one only): a collective
            names = sorted(k for k, v in values.items() if isinstance(v, (int, float)))
            vec = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                vec = self.accelerator.reduce(vec, reduction="mean")
            self.accelerator.log(dict(zip(names, vec.tolist())), step=step)
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
    eval_modules: tuple = ()      # held in eval mode through forward *and* backward (checkpoint recomputation)
    frozen_modules: tuple = ()    # parameters frozen through forward *and* backward (same reason)


def _run_phase(accelerator, phase: Phase, step: int, first_micro: int, grad_clip: float) -> dict:
    """``grad_accum`` micro-batches of one phase, each a ``distillation.guarded_update`` inside
    ``accelerator.accumulate`` (autocast, accelerate's backward and clipping, the all-reduced NaN flag)."""
    K = accelerator.gradient_accumulation_steps
    params = [p for g in phase.optimizer.param_groups for p in g["params"]]
    bad_anywhere = any_rank(accelerator)
    values, extras, norm = [], {}, float("nan")
    for m in range(K):
        with accelerator.accumulate(phase.model), eval_mode(*phase.eval_modules), frozen(*phase.frozen_modules):
            def loss_fn(m=m):
                with accelerator.autocast():
                    return phase.loss_fn(step, first_micro + m)
            value, n, extra = guarded_update(
                loss_fn, phase.optimizer, params, step=step, phase=phase.name, grad_clip=grad_clip,
                update=accelerator.sync_gradients, backward=accelerator.backward,
                clip_grad_norm=accelerator.clip_grad_norm_, bad_anywhere=bad_anywhere)
            if accelerator.sync_gradients:
                norm = n
        values.append(value)
        for k, v in extra.items():
            extras.setdefault(k, []).append(float(v))
    if not accelerator.sync_gradients:
        raise RuntimeError(f"{phase.name} phase of step {step} ended without an optimiser step: accelerate's "
                           "accumulation counter is out of step (every phase must run grad_accum micro-batches)")
    out = {f"{phase.name}_loss": sum(values) / K, f"{phase.name}_grad_norm": norm}
    out.update({f"{phase.name}_{k}": sum(v) / len(v) for k, v in extras.items()})
    return out


def peak_memory_gib(device) -> float:
    """Peak memory of this process in GiB: ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set
    size (``ru_maxrss``) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    return kib / 2 ** 20


def train_alternating(accelerator, cfg: BaseConfig, *, fake: Phase, gen: Phase, ema: EMA | None, start_step: int,
                      save_fn: Callable[[int, dict], Any], sample_fn: Callable[[int], Any] | None = None,
                      desc: str = "distill", logger=None) -> list[dict]:
    """SIM Alg. 1-2 / DI* Alg. 1 / Diff-Instruct Alg. 1 at scale: ``dstar_edu.distillation.alternate`` over
    steps ``start_step + 1 .. cfg.steps`` with ``cfg.fake_steps`` online-score phases then one generator phase
    (each ``cfg.grad_accum`` micro-batches), then the EMA update, logging, samples and checkpoints.
    Returns the logged records."""
    logger = logger or MetricLogger(accelerator, cfg.output_dir, cfg.steps, start_step, desc, cfg.log_every,
                                    cfg.progress, track=cfg.log_with != "none")
    K = accelerator.gradient_accumulation_steps

    clock = {"t": time.perf_counter()}
    images_per_step = cfg.batch_size * K * accelerator.num_processes

    def after_step(step: int, rec: dict) -> bool:
        if ema is not None:
            ema.update()
        now = time.perf_counter()
        rec["step_seconds"], clock["t"] = now - clock["t"], now
        rec["images_per_second"] = images_per_step / rec["step_seconds"]     # generator samples, all processes
        rec["peak_memory_gib"] = peak_memory_gib(accelerator.device)
        logger.log(step, rec)
        last = step == cfg.steps
        if sample_fn is not None and (last or (cfg.sample_every and step % cfg.sample_every == 0)):
            sample_fn(step)
        if cfg.checkpoint_every and (last or step % cfg.checkpoint_every == 0):
            save_fn(step, {k: v for k, v in rec.items() if k.endswith("_loss")})
        return False

    try:
        return alternate(range(start_step + 1, cfg.steps + 1),
                         lambda step, r: _run_phase(accelerator, fake, step, r * K, cfg.grad_clip),
                         lambda step: _run_phase(accelerator, gen, step, 0, cfg.grad_clip),
                         fake_steps=cfg.fake_steps, after_step=after_step)
    finally:
        logger.close()


def write_config(accelerator, cfg: BaseConfig) -> None:
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True))
    if cfg.log_with != "none":             # accelerate's trackers (tensorboard: <output_dir>/<project>/events.*)
        accelerator.init_trackers("tensorboard", config={k: v for k, v in cfg.to_dict().items()
                                                          if isinstance(v, (int, float, str, bool))})


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
def _load_into(module: nn.Module, state: dict) -> None:
    module.load_state_dict(state)


def run_distillation(accelerator, cfg: BaseConfig, **kw) -> dict:
    """:func:`distillation_run` (its arguments), inside a process group when ``cfg.fsdp`` runs in one process."""
    from scaled_runs.fsdp import check_fsdp_launch, process_group
    check_fsdp_launch(accelerator, cfg)
    with process_group(accelerator) if cfg.fsdp else contextlib.nullcontext():
        return distillation_run(accelerator, cfg, **kw)


def distillation_run(accelerator, cfg: BaseConfig, *, generator: nn.Module, fake_net: nn.Module, fake,
                     fake_loss: Callable, gen_loss: Callable, images: Callable | None = None,
                     config_of: Callable[[nn.Module], Any] = lambda m: m,
                     meta: dict | None = None, desc: str = "distill") -> dict:
    """Resume, EMA, Adam, ``accelerator.prepare``, checkpoints, sample grids and :func:`train_alternating`, for a
    teacher-initialised ``generator`` (``generator.denoiser.unet`` is its network) and an online score ``fake``
    (a ``DiffusersUNetPredictor`` over ``fake_net``).

    ``fake_loss(step, micro, fake_train)`` and ``gen_loss(step, micro, fake_eval)`` return ``(loss, {name: float})``;
    the fake network is in eval mode and its parameters frozen during the whole generator phase (forward and
    backward: a checkpointed block is recomputed in the backward and must see the mode and the
    ``requires_grad`` flags of its forward, else torch's checkpoint refuses the different saved tensors);
    ``fake_train`` sees the fake network through its DDP wrapper (its own phase), ``fake_eval`` unwrapped (the
    generator loss, which freezes its parameters). ``images(model, n) -> (n, C, H, W)`` in ``[-1, 1]`` renders
    the sample grids (``model`` is the EMA generator if any, else the generator). ``config_of(net)`` is the
    diffusers ConfigMixin saved next to a network's weights. ``cfg.fsdp``: generator, online score and EMA are
    sharded with ``fully_shard`` and the generator loss sees the online score through a frozen mirror
    (``scaled_runs/fsdp.py``); checkpoints are ``torch.distributed.checkpoint`` shards.
    Returns ``{"records", "checkpoint", "generator", "ema", "fake_net", "optimizers"}``.
    """
    from scaled_runs.config import weight_dtype
    from scaled_runs.memory import add_lora, make_optimizer
    if cfg.lora_rank:     # frozen base in the weight dtype, fp32 adapters (in place: `fake` keeps its network)
        wdt = weight_dtype(cfg)
        generator.denoiser.unet = add_lora(generator.denoiser.unet.to(wdt), cfg.lora_rank, cfg.lora_scale_alpha())
        add_lora(fake_net.to(wdt), cfg.lora_rank, cfg.lora_scale_alpha())
        for m in (generator, fake_net):
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    ckpt, start_step = None, 0
    if cfg.resume:
        ckpt = load_checkpoint(find_checkpoint(cfg.resume, cfg.output_dir))
        if "config" in ckpt["state"]:
            check_resume_config(ckpt["state"]["config"], json.loads(json.dumps(cfg.to_dict())))
        if ckpt["sharded"] != cfg.fsdp:
            raise ValueError(f"resume: {ckpt['path']} is {'a sharded' if ckpt['sharded'] else 'an unsharded'} "
                             f"checkpoint but fsdp={cfg.fsdp}; resume it with fsdp={ckpt['sharded']}")
        if not cfg.fsdp:                           # sharded states load after sharding (below)
            _load_into(generator.denoiser.unet, ckpt["networks"]["generator"])
            _load_into(fake_net, ckpt["networks"]["fake"])
        start_step = int(ckpt["state"]["step"])
        if start_step >= cfg.steps:
            raise ValueError(f"resume: the checkpoint is at step {start_step} >= steps={cfg.steps}; raise --steps")
        if accelerator.is_main_process:          # drop records of steps after the checkpoint (a crashed run's)
            kept = [r for r in read_metrics(cfg.output_dir) if r["step"] <= start_step]
            (Path(cfg.output_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    ema = make_ema(generator, cfg, cfg.batch_size * cfg.grad_accum * accelerator.num_processes)
    if ema is not None and ckpt is not None and "generator_ema" in ckpt["networks"]:
        _load_into(ema.model.denoiser.unet, ckpt["networks"]["generator_ema"])
    if cfg.gradient_checkpointing:
        for net in (generator.denoiser.unet, fake_net):
            target = getattr(net, "transformer", net)
            if hasattr(target, "enable_gradient_checkpointing"):
                target.enable_gradient_checkpointing()

    mirror = None
    if cfg.fsdp:           # shard in place (deep copies first: FSDP modules cannot be copied)
        from scaled_runs.fsdp import device_mesh, frozen_mirror, refresh_mirror, shard
        mirror = frozen_mirror(fake_net)
        mesh = device_mesh(accelerator)
        for net in (generator.denoiser.unet, fake_net, mirror) + ((ema.model.denoiser.unet,) if ema else ()):
            shard(net, mesh)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    opt_gen = make_optimizer(generator.parameters(), cfg.lr_gen, betas, cfg.use_8bit_adam, accelerator.device)
    opt_fake = make_optimizer(fake_net.parameters(), cfg.lr_fake, betas, cfg.use_8bit_adam, accelerator.device)
    if cfg.fsdp:           # accelerate wraps the optimisers only (its DDP wrapper would replicate the shards)
        gen_net, fake_p = generator.denoiser.unet, fake_net
        opt_gen, opt_fake = accelerator.prepare(opt_gen, opt_fake)
        if ckpt is not None:                     # each rank reads the pieces of its own shards
            load_sharded(ckpt["path"] / "dcp", {"generator": gen_net, "fake": fake_p,
                                                **({"generator_ema": ema.model.denoiser.unet} if ema else {})},
                         {"generator": opt_gen.optimizer, "fake": opt_fake.optimizer})
        refresh_mirror(mirror, fake_net)
    else:
        gen_net, fake_p, opt_gen, opt_fake = accelerator.prepare(generator.denoiser.unet, fake_net, opt_gen,
                                                                 opt_fake)
        generator.denoiser.unet = gen_net        # the generator trains through the (DDP-)prepared network
        if ckpt is not None and ckpt["optimizers"] is not None:
            opt_gen.load_state_dict(ckpt["optimizers"]["generator"])
            opt_fake.load_state_dict(ckpt["optimizers"]["fake"])
    fake_train = fake.with_net(fake_p)
    # DDP: the generator loss must not run the DDP wrapper (its reducer would wait for gradients of the frozen
    # parameters), so it sees the unwrapped module with its parameters frozen for the phase. FSDP: the frozen
    # mirror, refreshed from the online score before each generator phase (no requires_grad toggling).
    fake_eval = fake if mirror is None else fake.with_net(mirror)

    def generator_loss(step: int, micro: int):
        if mirror is not None and micro == 0:
            refresh_mirror(mirror, fake_net)
        return gen_loss(step, micro, fake_eval)
    last: dict = {}

    def save(step: int, losses: dict):
        nets = {"generator": Saved(gen_net, config_of(accelerator.unwrap_model(gen_net))),
                "fake": Saved(fake_p, config_of(accelerator.unwrap_model(fake_p)))}
        if ema is not None:
            nets["generator_ema"] = Saved(ema.model.denoiser.unet, config_of(ema.model.denoiser.unet))
        info = {"t_star": getattr(generator, "t_star", None), "sigma_star": getattr(generator, "sigma_star", None),
                "ema_decay": None if ema is None else ema.decay, "config": cfg.to_dict(), **(meta or {})}
        last["checkpoint"] = save_checkpoint(accelerator, cfg.output_dir, step, nets, losses=losses,
                                             optimizers={"generator": opt_gen, "fake": opt_fake}, meta=info,
                                             total_limit=cfg.checkpoints_total_limit)

    def sample(step: int):
        model = ema.model if ema is not None else generator
        with torch.no_grad(), accelerator.autocast():   # on every process: the generator may be DDP-wrapped
            x = images(model, cfg.n_samples)
        if accelerator.is_main_process:
            save_image_grid(x, Path(cfg.output_dir) / "samples" / f"step_{step:07d}.png")

    if ckpt is not None:                         # dropout and any other draw from the global generators
        saved_rng = load_rng_state(ckpt["path"], accelerator.process_index)
        if saved_rng is not None:
            set_rng_state(saved_rng)
    fake_net.train()
    records = train_alternating(
        accelerator, cfg, fake=Phase("fake", fake_p, opt_fake, lambda s, m: fake_loss(s, m, fake_train)),
        gen=Phase("generator", gen_net, opt_gen, generator_loss, (fake_eval.unet,),
                  (fake_net,) if mirror is None else ()), ema=ema,
        start_step=start_step, save_fn=save, sample_fn=sample if images is not None else None, desc=desc)
    return {"records": records, "checkpoint": last.get("checkpoint"), "generator": generator, "ema": ema,
            "fake_net": accelerator.unwrap_model(fake_p), "optimizers": {"generator": opt_gen, "fake": opt_fake}}


