"""FSDP2 for the scaled runs (``--fsdp``): torch's own ``fully_shard`` and ``torch.distributed.checkpoint``.

Why not accelerate's FSDP plugin: accelerate 1.x switches to ``DistributedType.FSDP`` only on GPUs (on the CPU it
silently keeps gloo DDP), so its FSDP path could not run in the CPU tests. The scripts therefore shard the networks
themselves, with the same calls on the CPU (gloo) and on GPUs (NCCL), inside an ordinary multi-process accelerate
or torchrun launch; accelerate still provides the process group, autocast, accumulation and the optimiser wrapper.
A launch with accelerate's own FSDP distributed type is refused (it would shard a second time, untested).

What is sharded (each rank holds 1/N of every parameter, its gradient and its Adam moments):

* the generator's network, the online ("fake") score, the generator's EMA (built before sharding: FSDP modules
  cannot be deep-copied), and a *frozen mirror* of the online score;
* not the frozen teacher / reference, VAE, text encoders or reward (replicated, as under DDP).

Freeze by construction: the generator loss needs gradients *through* the online score to its input (SIM Thm 3.1,
SiD) but none *into* its parameters. Under DDP the scripts switch ``requires_grad`` off for that phase; FSDP2 fixes
its unsharded parameters' flags at their first all-gather, so toggling is unsafe. The generator loss instead
evaluates the mirror, a copy whose parameters never require gradients, refreshed from the trained online score
(a local copy of the shards, no communication) before every generator phase: the same values, so the same loss.

Units (:func:`fsdp_units`): the blocks of the network's ``nn.ModuleList`` s, split until none holds more than 1/16
of the parameters; the rest (embeddings, norms, heads) is the root unit.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `accelerate launch scaled_runs/x.py` puts only scaled_runs/ on the path
    sys.path.insert(0, str(_ROOT))

import contextlib
import copy

import torch
from torch import nn

__all__ = ["fsdp_units", "check_fsdp_launch", "process_group", "device_mesh", "shard", "frozen_mirror",
           "refresh_mirror", "is_sharded"]


def fsdp_units(net: nn.Module, max_fraction: float = 1 / 16) -> list[nn.Module]:
    """The modules that become their own FSDP unit (all-gathered one at a time): the elements of the network's
    ``nn.ModuleList`` s (diffusers' down / up blocks, their resnets and attentions, transformer blocks), taken from
    the outside in, splitting any element larger than ``max_fraction`` of the network into the ModuleList elements
    inside it (SDXL's 10-layer attention stacks become their transformer blocks: the largest unit is ~50M
    parameters, not 1.2B). What no unit holds (embeddings, heads, norms) is the root unit. The planner sizes the
    all-gather buffers from the same list."""
    limit = max_fraction * sum(p.numel() for p in net.parameters())

    def size(m):
        return sum(p.numel() for p in m.parameters())

    def inner_lists(m):       # the outermost ModuleLists below m
        found, stack = [], list(m.children())
        while stack:
            c = stack.pop(0)
            if isinstance(c, nn.ModuleList):
                found.append(c)
            else:
                stack.extend(c.children())
        return found

    units, todo = [], [b for lst in inner_lists(net) for b in lst]
    while todo:
        b = todo.pop(0)
        if size(b) == 0:
            continue
        inner = [x for lst in inner_lists(b) for x in lst]
        # split only into composite blocks, never into single layers (a lone Linear unit returns a view that an
        # in-place op downstream could detach from FSDP's pre-backward hook)
        if size(b) > limit and inner and all(any(True for _ in x.children()) for x in inner):
            todo.extend(inner)
        else:
            units.append(b)
    return units


def check_fsdp_launch(accelerator, cfg) -> None:
    """Refuse what the sharded path does not support, naming the setting."""
    from scaled_runs.checkpoints import is_fsdp
    if is_fsdp(accelerator):
        raise ValueError("accelerate's own FSDP distributed type is not used by scaled_runs: launch with a plain "
                         "multi-GPU config (scaled_runs/configs/accelerate_fsdp.yaml) and pass fsdp=true; the scripts "
                         "shard with torch's fully_shard themselves (the path the CPU tests run)")
    if not cfg.fsdp:
        return
    if cfg.lora_rank:
        raise ValueError(f"fsdp=true with lora_rank={cfg.lora_rank}: FSDP2 needs one dtype per unit (LoRA keeps a bf16 "
                         "base next to fp32 adapters); LoRA runs fit under DDP (sdxl_distar_lora_h100.yaml)")
    if cfg.use_8bit_adam:
        raise ValueError("fsdp=true with use_8bit_adam=true: bitsandbytes' 8-bit Adam is not tested on sharded "
                         "(DTensor) parameters; FSDP already shards the fp32 Adam moments")


@contextlib.contextmanager
def process_group(accelerator):
    """A process group for ``fully_shard`` and DCP: accelerate's (several processes), or a one-process group for a
    single-process run (destroyed on exit), so one GPU uses the same sharded code and checkpoint format."""
    import torch.distributed as dist
    created = False
    if not dist.is_initialized():
        backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def device_mesh(accelerator):
    """A 1-D mesh over every process (FSDP's data-parallel dimension)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(accelerator.device.type, (dist.get_world_size(),))


def shard(net: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` every unit of :func:`fsdp_units`, then the root (in place; returns ``net``)."""
    from torch.distributed.fsdp import fully_shard
    for unit in fsdp_units(net):
        fully_shard(unit, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(net, FSDPModule)


def frozen_mirror(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` (unsharded: call before :func:`shard`) in eval mode whose parameters never require
    gradients: the online score as the generator loss sees it."""
    return copy.deepcopy(net).requires_grad_(False).eval()


@torch.no_grad()
def refresh_mirror(mirror: nn.Module, net: nn.Module) -> None:
    """Copy ``net``'s parameters and buffers into ``mirror`` (both sharded alike: a local copy of the shards)."""
    for dst, src in zip(mirror.parameters(), net.parameters()):
        dst.copy_(src)
    for dst, src in zip(mirror.buffers(), net.buffers()):
        dst.copy_(src)
