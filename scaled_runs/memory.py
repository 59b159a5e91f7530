"""Memory tools of the scaled runs, each a config switch (issue 10, item 4):

* ``lora_rank``: LoRA adapters (``peft``) on the generator and the online score; the base weights are frozen by
  construction (``requires_grad=False`` from the start, never toggled) and kept in the weight dtype;
* ``use_8bit_adam``: bitsandbytes' 8-bit Adam (CUDA only: a clear error otherwise);
* ``checkpoint_frozen``: activation checkpointing of the frozen networks gradients flow through (diffusers'
  block-wise checkpointing of the teacher / reference UNet or transformer and of the VAE decoder; the reward
  call as one checkpointed region);
* ``gradient_as_bucket_view`` (DDP kwargs, :func:`scaled_runs.config.setup_accelerator`) and precomputed
  prompt embeddings (:mod:`scaled_runs.encode_prompts`).
"""
from __future__ import annotations

import torch
from torch import nn

from dstar_edu.validation import check_int

__all__ = ["LORA_TARGETS", "add_lora", "make_optimizer", "checkpoint_frozen", "checkpointed"]

# attention projections, feed-forward and resnet convolutions of diffusers UNets / DiTs (those present are used)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2")


def add_lora(net: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze ``net`` and add LoRA adapters of ``rank`` (``peft``'s ``inject_adapter_in_model``) on the layers
    named in :data:`LORA_TARGETS`; only the adapters are trainable. ``B`` starts at zero, so the network
    computes exactly what it did before."""
    check_int("lora_rank", rank, lo=1)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:   # pragma: no cover - peft is in the scaled extra
        raise ImportError("lora_rank > 0 needs peft: pip install 'dstar_edu[scaled]'") from e
    names = {n.rsplit(".", 1)[-1] for n, _ in net.named_modules()} | {n for n, _ in net.named_modules()}
    targets = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise ValueError(f"add_lora: {type(net).__name__} has none of the LoRA target layers {LORA_TARGETS}")
    net.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=float(alpha or rank), target_modules=targets, init_lora_weights=True)
    net = inject_adapter_in_model(cfg, net)
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)
    return net


def make_optimizer(params, lr: float, betas, use_8bit: bool, device) -> torch.optim.Optimizer:
    """Adam over the trainable ``params``: ``torch.optim.Adam``, or ``bitsandbytes.optim.Adam8bit`` (2 bytes of
    state per parameter instead of 8) when ``use_8bit`` (CUDA only)."""
    params = [p for p in params if p.requires_grad]
    if not use_8bit:
        return torch.optim.Adam(params, lr=lr, betas=betas)
    if torch.device(device).type != "cuda":
        raise ValueError(f"use_8bit_adam=True needs a CUDA GPU (bitsandbytes' 8-bit Adam), but the run is on "
                         f"{torch.device(device)}; turn it off on the CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - needs a GPU machine
        raise ImportError("use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes") from e
    return bnb.optim.Adam8bit(params, lr=lr, betas=betas)


def checkpoint_frozen(*modules) -> list[nn.Module]:
    """Turn on diffusers' block-wise gradient checkpointing of frozen networks (it applies whenever gradients
    are enabled, also in eval mode and with frozen weights: the backward to the generator recomputes each
    block). Returns the modules it was turned on for."""
    done = []
    for m in modules:
        if m is not None and hasattr(m, "enable_gradient_checkpointing") and \
                getattr(m, "_supports_gradient_checkpointing", True):
            m.enable_gradient_checkpointing()
            done.append(m)
    return done


class checkpointed(nn.Module):
    """``module`` called inside one ``torch.utils.checkpoint`` region (non-reentrant): only its inputs are kept
    for the backward, the rest is recomputed (for a frozen reward whose library does not checkpoint in eval)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.differentiable = getattr(module, "differentiable", True)

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
