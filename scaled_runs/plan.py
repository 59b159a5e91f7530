"""Memory planner: will a scaled run fit on the GPUs you are about to rent? (no weights, no GPU needed)

    python -m scaled_runs.plan scaled_runs/configs/sdxl_distar.yaml [--gpus 8] [--gpu-memory 141] [--batch_size 1 ...]

Builds the run's real networks from their published architectures (``scaled_runs/configs/arch/*.json``, or the
``config.json`` files of a local ``pretrained`` folder when it exists) on PyTorch's ``meta`` device, and runs each
pass of the alternating loop as the scripts run it, at the configured micro-batch, resolution and precision:

* the online-score phase: the generator under ``no_grad``, the fake score with gradients;
* the generator phase: the generator, the frozen teacher / reference (twice with CFG: cond and uncond), the
  frozen fake score, and (SDXL) the VAE decode and the reward's vision tower, all holding their activations
  until the backward (gradients flow through the frozen networks to the generator).

A ``saved_tensors_hooks`` pair counts the bytes autograd keeps for the backward (views counted once, parameters
excluded). Attention is measured as a fused (flash / memory-efficient) kernel keeps it: q, k, v, the output and
the float32 log-sum-exp, not the L x L matrix. With gradient checkpointing, a checkpointed block keeps only its
inputs, and the largest block's activations are added once (its recomputation in the backward). Under bf16
mixed precision the trained networks are measured in bf16 (autocast's matmul/conv outputs; its float32
norm outputs are not modelled: an under-estimate of a few percent).

Static memory per GPU: weights (fp32 trained, bf16 frozen under bf16), Adam moments (2 x fp32, or 2 x 1 byte
with 8-bit Adam), DDP gradient buckets (one fp32 copy of the trained parameters; the gradients are views into
them with ``gradient_as_bucket_view``, else one more copy during the phase that has them), EMA. With LoRA only
the adapters are trained (the frozen base is kept in the weight dtype). With precomputed prompt embeddings the
text encoders are not loaded. Under FSDP (``fsdp: true`` in the config, or ``--strategy fsdp``) weights,
gradients, Adam moments and the EMA of the trained networks are divided by the number of GPUs, and the frozen
mirror of the online score and the all-gathered FSDP units are added (``scaled_runs/fsdp.py``).

The peak is the larger phase: static + that phase's held activations + the largest recomputed block + its
gradients. Not modelled: allocator fragmentation, cuDNN / cuBLAS workspaces, NCCL buffers, the CUDA context
(~0.5-1 GiB): keep a 10% margin (``--margin``). Calibrate against ``torch.cuda.max_memory_allocated`` with
``scaled_runs/gpu_smoke.sh`` when a GPU is available.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from dstar_edu.validation import check_choice  # noqa: E402  (after the sys.path line above)

ARCH = Path(__file__).resolve().parent / "configs" / "arch"
GiB = 2 ** 30

__all__ = ["Plan", "plan_config", "plan_run", "measure_pass", "format_table", "main"]


# ---- measuring the bytes autograd keeps ---------------------------------------------------------------------------
class _FusedSDPA(torch.autograd.Function):
    """Shape-only stand-in of a fused attention kernel: saves what flash / memory-efficient attention saves."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the planner never runs a backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedSDPA.apply(query, key, value)


class _Counter:
    def __init__(self, params):
        self.params = {id(p) for p in params}
        self.seen: set = set()
        self.keep: list = []
        self.held = 0            # bytes kept until the backward
        self.block = None        # bytes of the checkpointed block being run (None outside)
        self.max_block = 0

    def add(self, t: torch.Tensor, into_block: bool = True) -> None:
        if id(t) in self.params or isinstance(t, nn.Parameter):
            return
        base = t._base if t._base is not None else t
        if id(base) in self.seen or id(base) in self.params:
            return
        self.seen.add(id(base))
        self.keep.append(base)
        n = base.numel() * base.element_size()
        if self.block is not None and into_block:
            self.block += n
        else:
            self.held += n

    def pack(self, t):
        self.add(t)
        return t

    def checkpoint(self, fn, *args, **kwargs):
        """Stand-in of ``torch.utils.checkpoint``: the block keeps its tensor inputs; what it would save is
        counted as the block's (recomputed in the backward)."""
        for a in args:
            if isinstance(a, torch.Tensor):
                self.add(a, into_block=False)
        outer, self.block = self.block, 0
        try:
            return fn(*args, **kwargs)
        finally:
            self.max_block = max(self.max_block, self.block)
            self.block = outer


@contextlib.contextmanager
def _fused_attention():
    import torch.nn.functional as F
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


def measure_pass(module: nn.Module, fn, *, checkpointed: bool = False, grad: bool = True) -> tuple[int, int]:
    """``(held bytes, largest recomputed block bytes)`` of ``fn()`` (a forward through ``module`` on meta tensors).

    ``checkpointed``: diffusers' gradient checkpointing of ``module`` (its blocks keep only their inputs).
    ``grad=False``: a ``no_grad`` pass (keeps nothing)."""
    if not grad:
        return 0, 0
    counter = _Counter(module.parameters())
    toggled = []
    if checkpointed:
        for m in module.modules():
            if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func"):
                toggled.append((m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None)))
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = counter.checkpoint
            elif hasattr(m, "gradient_checkpointing"):
                toggled.append((m, m.gradient_checkpointing, None))
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = counter.checkpoint
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            fn()
    finally:
        for m, flag, func in toggled:
            m.gradient_checkpointing = flag
            if func is not None:
                m._gradient_checkpointing_func = func
    return counter.held, counter.max_block


# ---- networks from published architectures ------------------------------------------------------------------------
ARCH_OVERRIDE: dict = {}     # name -> config dict replacing configs/arch/<name>.json (gpu_smoke --tiny)


def _arch(name: str) -> dict:
    if name in ARCH_OVERRIDE:
        return {k: v for k, v in dict(ARCH_OVERRIDE[name]).items() if not k.startswith("_")}
    d = json.loads((ARCH / f"{name}.json").read_text())
    d.pop("_note", None)
    return d


def _local_or_arch(folder: str, sub: str, name: str) -> dict:
    """The ``config.json`` of ``folder/sub`` when it exists locally, else the shipped architecture ``name``."""
    if folder and name not in ARCH_OVERRIDE:
        p = Path(folder) / sub / "config.json"
        if p.is_file():
            return {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}
    return _arch(name)


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _nbytes(module: nn.Module | None, dtype_bytes: int | None = None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    ps = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in ps)


def _lora(module: nn.Module, rank: int, alpha: float) -> nn.Module:
    from scaled_runs.memory import add_lora
    return add_lora(module, rank, alpha)


@dataclass
class Plan:
    """Per-GPU bytes of one configuration (see the module docstring for what each row holds)."""

    name: str
    gpus: int
    gpu_memory_gib: float
    strategy: str
    rows: dict = field(default_factory=dict)        # static rows: name -> bytes
    phases: dict = field(default_factory=dict)      # phase -> {"activations", "recompute", "gradients"}
    margin: float = 0.10

    @property
    def static(self) -> int:
        return sum(self.rows.values())

    def phase_total(self, phase: str) -> int:
        p = self.phases[phase]
        return self.static + p["activations"] + p["recompute"] + p["gradients"]

    @property
    def peak(self) -> int:
        return max(self.phase_total(p) for p in self.phases)

    @property
    def budget(self) -> float:
        return self.gpu_memory_gib * GiB * (1 - self.margin)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_dict(self) -> dict:
        return {"name": self.name, "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory_gib,
                "strategy": self.strategy, "static_gib": {k: v / GiB for k, v in self.rows.items()},
                "phases_gib": {p: {k: v / GiB for k, v in d.items()} | {"total": self.phase_total(p) / GiB}
                               for p, d in self.phases.items()},
                "peak_gib": self.peak / GiB, "budget_gib": self.budget / GiB, "fits": self.fits}


def format_table(plan: Plan) -> str:
    """A markdown table of the plan (GiB per GPU)."""
    lines = [f"### {plan.name}: {plan.gpus} GPU(s) x {plan.gpu_memory_gib:g} GiB, {plan.strategy}",
             "", "| per GPU | GiB |", "| --- | ---: |"]
    for k, v in plan.rows.items():
        lines.append(f"| {k} | {v / GiB:.2f} |")
    lines.append(f"| **static total** | **{plan.static / GiB:.2f}** |")
    for p, d in plan.phases.items():
        lines.append(f"| {p} phase: activations kept for backward | {d['activations'] / GiB:.2f} |")
        if d["recompute"]:
            lines.append(f"| {p} phase: largest recomputed block | {d['recompute'] / GiB:.2f} |")
        if d["gradients"]:
            lines.append(f"| {p} phase: gradients | {d['gradients'] / GiB:.2f} |")
        lines.append(f"| {p} phase: total | {plan.phase_total(p) / GiB:.2f} |")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"| **peak** (budget {plan.budget / GiB:.1f} = {1 - plan.margin:.0%} of {plan.gpu_memory_gib:g}) "
                 f"| **{plan.peak / GiB:.2f}: {verdict}** |")
    return "\n".join(lines)


# ---- the runs -------------------------------------------------------------------------------------------------------
def _bytes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _trained_rows(plan: Plan, cfg, nets: dict[str, nn.Module], frozen_base_bytes: int) -> int:
    """Weights, Adam, DDP buckets / FSDP shards and EMA of the trained networks; returns trainable params per
    net (the largest, for the gradients of a phase)."""
    shard = plan.gpus if plan.strategy == "fsdp" else 1
    adam = 2 if cfg.use_8bit_adam else 8
    for name, net in nets.items():
        n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in net.parameters())
        if cfg.lora_rank:
            plan.rows[f"{name}: frozen base weights"] = (n_all - n_train) * frozen_base_bytes
            plan.rows[f"{name}: LoRA weights (fp32)"] = n_train * 4
        else:
            plan.rows[f"{name}: weights (fp32{', sharded' if shard > 1 else ''})"] = n_train * 4 // shard
        kind = ("8-bit" if cfg.use_8bit_adam else "fp32") + (", sharded" if shard > 1 else "")
        plan.rows[f"{name}: Adam moments ({kind})"] = n_train * adam // shard
        if plan.strategy == "ddp" and plan.gpus > 1:
            plan.rows[f"{name}: DDP gradient buckets (fp32)"] = n_train * 4
    if plan.strategy == "fsdp":
        _fsdp_rows(plan, nets)
    return max(sum(p.numel() for p in n.parameters() if p.requires_grad) for n in nets.values())


def _fsdp_rows(plan: Plan, nets: dict[str, nn.Module]) -> None:
    """FSDP's extra memory (``scaled_runs/fsdp.py``): the frozen mirror of the online score (sharded fp32) and the
    all-gathered units: the root units of the networks the generator phase runs (generator and mirror; their roots
    stay unsharded from forward to backward), two blocks of the largest unit (the one running and the prefetched
    next), and the unsharded gradients of the root and one block before their reduce-scatter, all fp32."""
    from scaled_runs.fsdp import fsdp_units

    def numel(m):
        return sum(p.numel() for p in m.parameters())
    fake = nets["fake score"]
    plan.rows["fake score: frozen mirror for the generator loss (fp32, sharded)"] = numel(fake) * 4 // plan.gpus
    root = {k: numel(net) - sum(numel(u) for u in fsdp_units(net)) for k, net in nets.items()}
    block = max(numel(u) for net in nets.values() for u in [*fsdp_units(net), nn.Module()])
    plan.rows["FSDP all-gathered parameters and gradients (fp32: roots, 2 blocks; root + 1 block of gradients)"] = \
        4 * (root["generator"] + root["fake score"] + 2 * block + root["generator"] + block)


def _shard(plan: Plan) -> int:
    return plan.gpus if plan.strategy == "fsdp" else 1


def _grad_bytes(plan: Plan, cfg, n_train: int) -> int:
    if plan.strategy == "fsdp":
        return n_train * 4 // plan.gpus
    if plan.strategy == "ddp" and plan.gpus > 1 and cfg.gradient_as_bucket_view:
        return 0                      # the gradients are the buckets
    return n_train * 4


def _frozen_and_trained(plan: Plan, cfg, make, wdt) -> tuple:
    """``(frozen teacher, generator, fake score, n_train)``, each built by ``make`` on the meta device: the trained
    pair (LoRA-wrapped when ``cfg.lora_rank``) is counted in ``plan``'s rows, then cast to ``wdt`` (autocast:
    activations are measured in the run's precision)."""
    teacher = _on_meta(make).to(wdt).requires_grad_(False)
    gen, fake = _on_meta(make), _on_meta(make)
    if cfg.lora_rank:
        gen, fake = (_lora(m.to(wdt), cfg.lora_rank, cfg.lora_scale_alpha()) for m in (gen, fake))
    n_train = _trained_rows(plan, cfg, {"generator": gen, "fake score": fake}, _bytes_of(wdt))
    return teacher, gen.to(wdt), fake.to(wdt), n_train


def plan_sdxl(cfg, gpus: int, gpu_memory: float, strategy: str) -> Plan:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig, \
        CLIPVisionModelWithProjection
    plan = Plan("align_sdxl (DI*, SDXL 1024px)", gpus, gpu_memory, strategy)
    wdt = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    act_dt = wdt
    ucfg = _local_or_arch(cfg.pretrained, "unet", "sdxl_unet")
    vcfg = _local_or_arch(cfg.pretrained, "vae", "sdxl_vae")
    reference, gen, fake, n_train = _frozen_and_trained(plan, cfg, lambda: UNet2DConditionModel(**ucfg), wdt)
    vae = _on_meta(lambda: AutoencoderKL(**vcfg)).to(wdt).requires_grad_(False)
    plan.rows["reference UNet (frozen)"] = _nbytes(reference)
    plan.rows["VAE (frozen)"] = _nbytes(vae)
    if not cfg.prompt_embeddings:
        te = _arch("sdxl_text_encoders")
        t1 = _on_meta(lambda: CLIPTextModel(CLIPTextConfig(**te["text_encoder"]))).to(wdt)
        t2 = _on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te["text_encoder_2"]))).to(wdt)
        plan.rows["text encoders (frozen)"] = _nbytes(t1) + _nbytes(t2)
    vision = None
    if cfg.alpha_rew:
        rc = _arch("pickscore_clip_h")
        vision = _on_meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
            **rc["vision_config"], projection_dim=rc["projection_dim"]))).to(wdt).requires_grad_(False)
        text = _on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **rc["text_config"], projection_dim=rc["projection_dim"]))).to(wdt)   # runs under no_grad: weights only
        plan.rows["reward CLIP-H (frozen; vision + text towers)"] = _nbytes(vision) + _nbytes(text)
    if cfg.ema_halflife_kimg > 0 or cfg.ema_decay > 0:
        plan.rows["generator EMA (fp32)"] = _nbytes(gen, 4) // _shard(plan)

    B = cfg.batch_size
    pooled_dim = ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]   # 1280
    px = cfg.resolution or ucfg["sample_size"] * 8
    side = px // 8

    def unet_call(net, batch, dt, grad_input=True):
        x = torch.empty(batch, ucfg["in_channels"], side, side, device="meta", dtype=dt, requires_grad=grad_input)
        cond = dict(encoder_hidden_states=torch.empty(batch, 77, ucfg["cross_attention_dim"], device="meta", dtype=dt),
                    added_cond_kwargs={"text_embeds": torch.empty(batch, pooled_dim, device="meta", dtype=dt),
                                       "time_ids": torch.empty(batch, 6, device="meta", dtype=dt)})
        return lambda: net(x, timestep=torch.empty(batch, device="meta"), **cond)

    ck_train, ck_frozen = cfg.gradient_checkpointing, cfg.checkpoint_frozen
    a_fake, r_fake = measure_pass(fake, unet_call(fake, B, act_dt, False), checkpointed=ck_train)
    plan.phases["fake"] = {"activations": a_fake, "recompute": r_fake, "gradients": _grad_bytes(plan, cfg, n_train)}
    acts, rec = a_fake, r_fake          # the generator's pass: same network, settings and input as the fake's
    ref_batch = 2 * B if (cfg.cfg_mode == "in" and cfg.alpha_cfg) else B   # CFG: cond + uncond (batched)
    if cfg.cfg_mode == "out" and cfg.alpha_cfg:
        ref_batch = 2 * B                                                  # the implicit CFG reward's two passes
    a, r = measure_pass(reference, unet_call(reference, ref_batch, wdt), checkpointed=ck_frozen)
    acts, rec = acts + a, max(rec, r)
    a, r = measure_pass(fake, unet_call(fake, B, act_dt), checkpointed=ck_train)   # the fake's own flag
    acts, rec = acts + a, max(rec, r)
    if vision is not None:
        lat = torch.empty(B, 4, side, side, device="meta", dtype=wdt, requires_grad=True)
        a, r = measure_pass(vae, lambda: vae.decode(lat), checkpointed=ck_frozen)
        acts, rec = acts + a, max(rec, r)
        res = rc["vision_config"].get("image_size", 224)
        img = torch.empty(B, 3, res, res, device="meta", dtype=wdt, requires_grad=True)
        a, r = measure_pass(vision, lambda: vision(pixel_values=img), checkpointed=False)
        if ck_frozen:
            rec, a = max(rec, a), 0                   # the reward call is one checkpointed region (memory.py)
        acts, rec = acts + a + B * 3 * px * px * _bytes_of(wdt), max(rec, r)   # + the decoded images
    plan.phases["generator"] = {"activations": acts, "recompute": rec, "gradients": _grad_bytes(plan, cfg, n_train)}
    return plan


def plan_pixart(cfg, gpus: int, gpu_memory: float, strategy: str) -> Plan:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    plan = Plan("distill_pixart (SIM, PixArt-alpha 512px)", gpus, gpu_memory, strategy)
    wdt = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    tcfg = _local_or_arch(cfg.pretrained, "transformer", "pixart_512_transformer")
    teacher, gen, fake, n_train = _frozen_and_trained(plan, cfg, lambda: PixArtTransformer2DModel(**tcfg), wdt)
    plan.rows["teacher transformer (frozen)"] = _nbytes(teacher)
    vae = _on_meta(lambda: AutoencoderKL(**_local_or_arch(cfg.pretrained, "vae", "sd_vae_512"))).to(wdt)
    plan.rows["VAE (frozen, sample grids)"] = _nbytes(vae)
    if not cfg.prompt_embeddings:
        t5 = _on_meta(lambda: T5EncoderModel(T5Config(**_arch("t5_xxl_encoder")))).to(wdt)
        plan.rows["T5-XXL text encoder (frozen)"] = _nbytes(t5)
    if cfg.ema_halflife_kimg > 0 or cfg.ema_decay > 0:
        plan.rows["generator EMA (fp32)"] = _nbytes(gen, 4) // _shard(plan)
    B, side, L = cfg.batch_size, tcfg["sample_size"], cfg.max_sequence_length

    def call(net, batch, dt, grad_input=True):
        x = torch.empty(batch, tcfg["in_channels"], side, side, device="meta", dtype=dt, requires_grad=grad_input)
        c = torch.empty(batch, L, tcfg["caption_channels"], device="meta", dtype=dt)
        return lambda: net(x, encoder_hidden_states=c, timestep=torch.empty(batch, device="meta"),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None})

    ck_train, ck_frozen = cfg.gradient_checkpointing, cfg.checkpoint_frozen
    a, r = measure_pass(fake, call(fake, B, wdt, False), checkpointed=ck_train)
    plan.phases["fake"] = {"activations": a, "recompute": r, "gradients": _grad_bytes(plan, cfg, n_train)}
    acts, rec = a, r                    # the generator's pass: same network, settings and input as the fake's
    a, r = measure_pass(teacher, call(teacher, 2 * B if cfg.cfg_scale > 0 else B, wdt), checkpointed=ck_frozen)
    acts, rec = acts + a, max(rec, r)
    a, r = measure_pass(fake, call(fake, B, wdt), checkpointed=ck_train)            # the fake's own flag
    acts, rec = acts + a, max(rec, r)
    plan.phases["generator"] = {"activations": acts, "recompute": rec, "gradients": _grad_bytes(plan, cfg, n_train)}
    return plan


def plan_cifar(cfg, gpus: int, gpu_memory: float, strategy: str) -> Plan:
    from diffusers import UNet2DModel
    plan = Plan("distill_cifar (DDPM-CIFAR UNet, 32px)", gpus, gpu_memory, strategy)
    wdt = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    ucfg = _local_or_arch(cfg.teacher, "unet", "ddpm_cifar10_unet")
    teacher, gen, fake, n_train = _frozen_and_trained(plan, cfg, lambda: UNet2DModel(**ucfg), wdt)
    plan.rows["teacher UNet (frozen)"] = _nbytes(teacher)
    if cfg.ema_halflife_kimg > 0 or cfg.ema_decay > 0:
        plan.rows["generator EMA (fp32)"] = _nbytes(gen, 4) // _shard(plan)
    B, side = cfg.batch_size, ucfg.get("sample_size", 32)

    def call(net, dt, grad_input=True):
        x = torch.empty(B, ucfg.get("in_channels", 3), side, side, device="meta", dtype=dt, requires_grad=grad_input)
        return lambda: net(x, timestep=torch.empty(B, device="meta"))

    adt = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    a, r = measure_pass(fake, call(fake, adt, False), checkpointed=cfg.gradient_checkpointing)
    plan.phases["fake"] = {"activations": a, "recompute": r, "gradients": _grad_bytes(plan, cfg, n_train)}
    acts, rec = measure_pass(gen, call(gen, adt, False), checkpointed=cfg.gradient_checkpointing)
    for net in (teacher, fake):
        a, r = measure_pass(net, call(net, wdt if net is teacher else adt),
                            checkpointed=cfg.checkpoint_frozen if net is teacher else cfg.gradient_checkpointing)
        acts, rec = acts + a, max(rec, r)
    plan.phases["generator"] = {"activations": acts, "recompute": rec, "gradients": _grad_bytes(plan, cfg, n_train)}
    return plan


SCRIPTS = {   # config class, planner: one row per script (a new script adds one)
    "distill_cifar": ("CifarConfig", plan_cifar),
    "distill_pixart": ("PixArtConfig", plan_pixart),
    "align_sdxl": ("SDXLConfig", plan_sdxl),
}


def script_of(path) -> str:
    """The script a config file is for: its ``script:`` comment-free key, else from its fields."""
    import yaml
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "reward_model" in data or "alpha_rew" in data:
        return "align_sdxl"
    if "teacher" in data or "method" in data:
        return "distill_cifar"
    return "distill_pixart"


def plan_config(path, overrides=(), gpus: int | None = None, gpu_memory: float | None = None,
                strategy: str | None = None, margin: float = 0.10) -> Plan:
    """The plan of a shipped config file (``overrides``: ``--field value`` flags as for the script)."""
    import importlib

    from scaled_runs.config import parse_config
    script = script_of(path)
    mod = importlib.import_module(f"scaled_runs.{script}")
    cls_name, planner = SCRIPTS[script]
    cfg = parse_config(getattr(mod, cls_name), ["--config", str(path), *overrides])
    return plan_run(cfg, planner, gpus or cfg.target_gpus, gpu_memory or cfg.target_gpu_memory_gib, strategy, margin)


def plan_run(cfg, planner, gpus: int, gpu_memory: float, strategy: str | None = None, margin: float = 0.10) -> Plan:
    """The plan of ``cfg`` on ``gpus`` x ``gpu_memory`` GiB; ``strategy`` None: the config's (``fsdp`` or ddp)."""
    strategy = strategy or ("fsdp" if getattr(cfg, "fsdp", False) else "ddp")
    check_choice("strategy", strategy, ("ddp", "fsdp"))
    if gpus < 1 or not gpu_memory > 0 or not 0 <= margin < 1:
        raise ValueError(f"need gpus >= 1, gpu_memory > 0, 0 <= margin < 1; got {gpus}, {gpu_memory}, {margin}")
    plan = planner(cfg, gpus, gpu_memory, strategy)
    plan.margin = margin
    return plan


def main(argv=None) -> Plan:
    parser = argparse.ArgumentParser(description="Per-GPU memory plan of a scaled run (meta device, no weights)")
    parser.add_argument("config", help="a scaled_runs YAML config")
    parser.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: the config's target_gpus)")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB per GPU (default: the config's target_gpu_memory_gib)")
    parser.add_argument("--strategy", default=None, choices=("ddp", "fsdp"),
                        help="default: the config's (fsdp: true -> fsdp, else ddp)")
    parser.add_argument("--margin", type=float, default=0.10, help="fraction of memory kept free (default 0.10)")
    parser.add_argument("--json", default="", help="also write the plan as JSON to this file")
    args, overrides = parser.parse_known_args(argv)
    plan = plan_config(args.config, overrides, args.gpus, args.gpu_memory, args.strategy, args.margin)
    print(format_table(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=1, sort_keys=True))
    return plan


if __name__ == "__main__":
    main()
