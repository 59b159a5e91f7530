"""The memory planner and the memory tools of the scaled runs (issue 10, items 2-3)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate", reason="scaled_runs needs accelerate")
pytest.importorskip("transformers", reason="scaled_runs needs transformers")

from scaled_runs import align_sdxl, common, distill_cifar, memory, plan  # noqa: E402

CONFIGS = Path(plan.__file__).parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


# ---- the planner's accounting against closed forms --------------------------------------------------------------
def _mlp():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_saved_bytes_closed_form():
    """Linear(8,16) -> ReLU -> Linear(16,4) on a (3, 8) fp32 input keeps x (3x8) and the ReLU output (3x16, saved
    by ReLU and the second Linear: counted once); the weights are parameters (not activations)."""
    net = _mlp()
    x = torch.empty(3, 8, device="meta", requires_grad=True)
    held, block = plan.measure_pass(net, lambda: net(x))
    assert (held, block) == (4 * (3 * 8 + 3 * 16), 0)


class _Ckpt(nn.Module):
    """A diffusers-style block: ``self._gradient_checkpointing_func(fn, x)`` when checkpointing is on."""

    def __init__(self):
        super().__init__()
        self.mlp = _mlp()
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, x):
        return self._gradient_checkpointing_func(self.mlp, x) if self.gradient_checkpointing else self.mlp(x)


def test_checkpointed_block_keeps_its_input_and_recomputes_the_rest():
    net = _Ckpt()
    x = torch.empty(3, 8, device="meta", requires_grad=True)
    assert plan.measure_pass(net, lambda: net(x), checkpointed=True) == (4 * 3 * 8, 4 * 3 * 16)
    assert plan.measure_pass(net, lambda: net(x), checkpointed=False) == (4 * (3 * 8 + 3 * 16), 0)
    assert plan.measure_pass(net, lambda: net(x), grad=False) == (0, 0)


def test_fused_attention_keeps_qkv_output_and_logsumexp():
    """Flash / memory-efficient attention keeps q, k, v, the output and a float32 log-sum-exp, not L x L."""
    import torch.nn.functional as F
    B, H, L, d = 2, 4, 1024, 64
    q, k, v = (torch.empty(B, H, L, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    held, _ = plan.measure_pass(nn.Linear(1, 1, device="meta"), lambda: F.scaled_dot_product_attention(q, k, v))
    assert held == 4 * B * H * L * d * 2 + B * H * L * 4


# ---- shipped configs on their stated hardware ---------------------------------------------------------------------
def test_shipped_configs_state_hardware_and_fit_there():
    """Every shipped config names its GPUs (target_gpus, target_gpu_memory_gib) and the planner says it fits
    there (10% margin). SDXL's UNet has 2,567,463,684 parameters (the published SDXL-base UNet) and PixArt-XL-2
    0.61B (PixArt-alpha paper: 0.6B)."""
    import yaml
    assert len(SHIPPED) >= 4
    for path in SHIPPED:
        data = yaml.safe_load(path.read_text())
        assert {"target_gpus", "target_gpu_memory_gib"} <= set(data), path.name
        p = plan.plan_config(path)
        assert p.gpus == data["target_gpus"] and p.gpu_memory_gib == data["target_gpu_memory_gib"]
        assert p.fits, (path.name, plan.format_table(p))
        if path.name == "sdxl_distar.yaml":
            assert p.rows["generator: weights (fp32)"] == 2_567_463_684 * 4
        if path.name == "pixart_sim.yaml":
            assert 0.60e9 <= p.rows["generator: weights (fp32)"] / 4 <= 0.62e9
        if path.name == "sdxl_distar_fsdp_h100.yaml":          # FSDP over 8 GPUs: 1/8 of weights, Adam, EMA, mirror
            n = 2_567_463_684
            assert p.strategy == "fsdp" and "generator: DDP gradient buckets (fp32)" not in p.rows
            assert p.rows["generator: weights (fp32, sharded)"] == n * 4 // 8
            assert p.rows["generator: Adam moments (fp32, sharded)"] == n * 8 // 8
            assert p.rows["fake score: frozen mirror for the generator loss (fp32, sharded)"] == n * 4 // 8
            assert p.phases["generator"]["gradients"] == n * 4 // 8


def test_plan_cli_prints_table(capsys, tmp_path):
    out = tmp_path / "plan.json"
    p = plan.main([str(CONFIGS / "cifar_sim.yaml"), "--gpus", "1", "--gpu-memory", "80", "--batch_size", "256",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert "| **peak**" in text and ": fits**" in text and p.gpus == 1 and out.is_file()
    assert 30 < p.peak / plan.GiB < 40          # batch 256 of the 36M-parameter UNet: ~36 GiB (README)
    with pytest.raises(ValueError, match="strategy"):
        plan.plan_run(p, None, 1, 10.0, "zero3")


# ---- memory tools ---------------------------------------------------------------------------------------------------
def test_lora_run_trains_adapters_only(tmp_path):
    """--lora_rank 4: LoRA's B starts at zero, so before training the generator equals the full-weight one;
    after a step the base weights are still the teacher's and only lora_* tensors moved."""
    from dstar_edu.diffusers_interop import tiny_unet
    argv = ["--tiny", "--steps", "1", "--batch_size", "2", "--lora_rank", "4", "--checkpoint_every", "1",
            "--sample_every", "0", "--n_samples", "1", "--ema_halflife_kimg", "0", "--output_dir",
            str(tmp_path / "run"), "--no-progress", "--num_threads", "1"]
    res = distill_cifar.main(argv)
    sd = res["generator"].denoiser.unet.state_dict()
    teacher = tiny_unet(seed=0).state_dict()
    lora = [k for k in sd if "lora_" in k]
    assert lora and all(k.replace(".base_layer", "") in teacher for k in sd if "base_layer" in k)
    for k, v in sd.items():
        if "lora_" not in k:
            assert torch.equal(v, teacher[k.replace(".base_layer", "")]), k
    assert any(float(sd[k].abs().max()) > 0 for k in lora if "lora_B" in k)
    parts = distill_cifar.build(common.parse_config(distill_cifar.CifarConfig, argv), "cpu")
    z = parts.generator.noise(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = parts.generator(z)
        memory.add_lora(parts.generator.denoiser.unet, 4)
        assert torch.equal(parts.generator(z), before)


def test_8bit_adam_refused_on_cpu():
    with pytest.raises(ValueError, match="use_8bit_adam=True needs a CUDA GPU"):
        memory.make_optimizer(nn.Linear(2, 2).parameters(), 1e-3, (0.0, 0.999), True, "cpu")


def test_checkpoint_frozen_same_gradients():
    """Checkpointing the frozen reference, VAE decoder and reward changes what is kept, not the gradient: the
    generator's gradient of the DI* loss is the same (fp32; recomputation runs the same CPU kernels)."""
    from dstar_edu.objectives.alignment import diff_instruct_star_loss
    grads = []
    for ck in (False, True):
        argv = ["--tiny", "--batch_size", "2", "--mixed_precision", "no", "--alpha_rew", "10",
                "--output_dir", "/tmp/unused_ckpt_frozen"] + (["--checkpoint_frozen"] if ck else [])
        cfg = common.parse_config(align_sdxl.SDXLConfig, argv)
        parts = align_sdxl.build(cfg, "cpu")
        assert parts.pipe.unet.is_gradient_checkpointing is ck and parts.pipe.vae.is_gradient_checkpointing is ck
        cpu, dev = common.step_generators(0, 1, "generator", 0, 0, "cpu")
        b = align_sdxl.draw_batch(parts, 2, cpu, dev, "cpu")
        x0 = parts.generator(b["z"], b["cond"])
        loss = diff_instruct_star_loss(x0, parts.reference, parts.fake, b["t"], reward=parts.reward, alpha_rew=10.0,
                                       alpha_cfg=cfg.alpha_cfg, cond=b["cond"], uncond=b["uncond"],
                                       reward_cond=b["prompts"], eps=b["eps"], batched_cfg=True)
        gen_params = [p for p in parts.generator.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, gen_params))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8 * float(a.abs().max()))


def test_batched_guidance_equals_two_passes():
    """GuidedPredictor(batched=True) runs cond and uncond as one doubled batch: equal to two calls (float64)."""
    from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet
    from dstar_edu.objectives.alignment import GuidedPredictor
    from dstar_edu.process import DDPM
    base = DiffusersUNetPredictor(tiny_unet(sample_size=8, seed=1, num_class_embeds=4).double(), DDPM(), "epsilon")
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5.0, 300.0, 990.0])
    c, u = torch.tensor([0, 1, 2]), torch.tensor([3])
    with torch.no_grad():
        two = GuidedPredictor(base, 2.5, uncond=u.expand(3))(x, t, c)
        one = GuidedPredictor(base, 2.5, uncond=u, batched=True)(x, t, c)
    assert torch.allclose(one, two, rtol=0, atol=1e-12 * float(two.abs().max()))
    with pytest.raises(ValueError, match="batched=True needs negative=None"):
        GuidedPredictor(base, 1.0, negative=base, batched=True)


def test_precomputed_prompt_embeddings_equal_online_encoding(tmp_path):
    """encode_prompts writes safetensors shards once; a run reading them (no T5 loaded) logs the same losses
    bit for bit as a run encoding online; a store written with another max_sequence_length is refused."""
    import yaml

    from scaled_runs import distill_pixart, encode_prompts
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({"tiny": True, "cfg_scale": 1.5, "prompts": "", "grad_accum": 1}))
    store = encode_prompts.main(["--config", str(cfg_file), "--out", str(tmp_path / "emb"), "--shard_size", "3"])
    assert len(list(store.glob("shard_*.safetensors"))) == 3          # 8 tiny prompts in shards of 3
    base = ["--config", str(cfg_file), "--steps", "1", "--batch_size", "2", "--mixed_precision", "no",
            "--checkpoint_every", "0", "--sample_every", "0", "--n_samples", "1", "--no-progress", "--num_threads", "1"]
    a = distill_pixart.main(base + ["--output_dir", str(tmp_path / "a")])
    b = distill_pixart.main(base + ["--output_dir", str(tmp_path / "b"), "--prompt_embeddings", str(store)])
    assert b["parts"].pipe.text_encoder is None
    for k in ("fake_loss", "generator_loss"):
        assert a["records"][0][k] == b["records"][0][k], k
    with pytest.raises(ValueError, match="max_sequence_length"):
        distill_pixart.main(base + ["--output_dir", str(tmp_path / "c"), "--prompt_embeddings", str(store),
                                    "--max_sequence_length", "8"])
