"""Diff-Instruct* (DI*) preference alignment of a one-step SDXL generator with a CLIP-style reward (DI* Alg. 1).

Reference diffusion: SDXL (``UNet2DConditionModel`` with ``text_time`` additional embeddings, two CLIP text
encoders, VAE) from a local ``StableDiffusionXLPipeline`` folder (``--pretrained``, ``local_files_only=True``).
One-step model ``g_theta(z, c)``: the SDXL UNet at a fixed time (``generators.TeacherInitGenerator`` with a condition,
sigma* = 2.5 by default, or ``--t_star``), initialised from the reference or from ``--generator_init`` (DI*
starts from DMD2-SDXL-1step, which takes unit-variance noise at diffusers timestep 399; ours feeds ``alpha* z``,
``z ~ N(0, sigma*^2 I)``, of variance ``1 - alpha_bar(t*)`` = 0.57 at ``t* = 400``: a DMD2 init starts from a
differently scaled input). Assistant ("fake") diffusion: a copy of the reference UNet.

Per step (all losses from ``dstar_edu.objectives``):

* assistant update: ``fake_score_loss`` on detached generator latents (x0 target, weight 1);
* generator update: ``diff_instruct_star_loss`` = ``-alpha_rew r(x0, c)`` + SIM's pseudo-Huber score divergence
  to the reference (DI* Eq. 3.4/3.8), with CFG entering either as the CFG-enhanced reference
  ``s_c + alpha_cfg (s_c - s_u)`` (``--cfg_mode in``, DI*-In, the paper's best: alpha_rew = 100,
  alpha_cfg = 7.5) or as the implicit CFG reward loss (``--cfg_mode out``, DI*-Out; sign corrected, see
  ERRATA / ``align.distar_cfg_sign``). ``u`` is SDXL's zeroed empty-prompt embedding.

The reward is scored on decoded images, ``r(x0, c) = R(VAE.decode(x0 / s), c)``, with ``dstar_edu.rewards.CLIPReward``
(``logit_scale.exp() * cos``, PickScore-style) around a local ``CLIPModel`` (PickScore_v1 at scale; a tiny random
CLIP in ``--tiny``). Time distribution (the DI* paper does not state it): ln sigma ~ N(-2, 2^2) on
[edm_sigma(1), edm_sigma(T)], as in SIM's PixArt run.

    accelerate launch --config_file fsdp.yaml scaled_runs/align_sdxl.py --config sdxl_distar.yaml
    python scaled_runs/align_sdxl.py --tiny --steps 3 --batch_size 2 --mixed_precision no --output_dir runs/smoke_sdxl
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaled_runs import common  # noqa: E402
from scaled_runs.common import opt  # noqa: E402
from scaled_runs.memory import checkpoint_frozen, checkpointed  # noqa: E402

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, process_from_scheduler  # noqa: E402
from dstar_edu.generators import TeacherInitGenerator  # noqa: E402
from dstar_edu.objectives.alignment import diff_instruct_star_loss  # noqa: E402
from dstar_edu.objectives.distill import fake_score_loss, p_edm  # noqa: E402
from dstar_edu.process import Process  # noqa: E402
from dstar_edu.rewards import CLIPReward, tiny_clip_reward  # noqa: E402


@dataclass
class SDXLConfig(common.BaseConfig):
    """Diff-Instruct* alignment of a one-step SDXL generator with a CLIP-style (PickScore) reward."""

    output_dir: str = opt("runs/sdxl_distar", "folder for checkpoints/, samples/, metrics.jsonl, config.json")
    pretrained: str = opt("", "local StableDiffusionXLPipeline folder (unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, "
                              "scheduler/)")
    vae: str = opt("", "optional AutoencoderKL folder replacing the pipeline's VAE")
    generator_init: str = opt("", "optional UNet2DConditionModel folder initialising the one-step generator "
                                  "(e.g. DMD2-SDXL-1step); default: the reference UNet")
    reward_model: str = opt("", "local CLIPModel folder of the reward (PickScore_v1)")
    reward_tokenizer: str = opt("", "local tokenizer folder of the reward (default: reward_model)")
    prompts: str = opt("", "text file with one prompt per line (tiny mode: a built-in list)")
    batch_size: int = opt(4, "samples per device per micro-batch")
    n_samples: int = opt(4, "images per sample grid (1024px decodes are large)")
    lr_gen: float = opt(5e-6, "generator Adam learning rate (not stated by DI*; SIM's PixArt value)")
    lr_fake: float = opt(5e-6, "assistant Adam learning rate")
    mixed_precision: str = opt("bf16", "'no' (fp32) or 'bf16' autocast; fp16 is refused", ("no", "bf16", "fp16"))
    ema_halflife_kimg: float = opt(0.0, "EMA half-life in kimg (0 = no EMA: an fp32 SDXL copy costs 10 GB)")
    alpha_rew: float = opt(100.0, "explicit reward scale alpha_rew (DI* best: 100 with PickScore)")
    alpha_cfg: float = opt(7.5, "CFG scale alpha_cfg (DI* best: 7.5; extra guidance w of s_c + w (s_c - s_u))")
    cfg_mode: str = opt("in", "DI*-In (CFG-enhanced reference) or DI*-Out (implicit CFG reward loss)", ("in", "out"))
    sigma_star: float = opt(2.5, "EDM noise level of the generator's fixed time")
    t_star: float = opt(0.0, "the generator's fixed DDPM time t* (1..T; 0: solve edm_sigma(t*) = sigma_star)")
    input_std: float = opt(0.0, "std of the generator network's input noise (0: alpha(t*) sigma*, SIM's rule; "
                                "1.0 for a DMD2-SDXL-1step init, which takes unit-variance noise at t* = 400)")
    P_mean: float = opt(-2.0, "ln sigma mean of both phases' times")
    P_std: float = opt(2.0, "ln sigma std of both phases' times")
    sigma_min: float = opt(0.0, "lowest noise level drawn (0: edm_sigma(1) of the schedule)")
    huber_c: float = opt(0.0, "pseudo-Huber c (0: the library default 0.00054 sqrt(D))")
    resolution: int = opt(0, "image side in pixels (0: the UNet's sample_size x the VAE factor, 1024 for SDXL)")
    fake_target: str = opt("x0", "assistant regression target")
    fake_weighting: str = opt("none", "assistant loss weighting", ("none", "edm", "snr", "min_snr"))

    def __post_init__(self):
        super().__post_init__()
        if not (self.sigma_star > 0 and self.P_std > 0 and self.huber_c >= 0 and self.t_star >= 0 and self.input_std >= 0
                and self.resolution >= 0 and self.alpha_cfg >= 0):
            raise ValueError("need sigma_star > 0, P_std > 0, huber_c >= 0, t_star >= 0, resolution >= 0, "
                             "alpha_cfg >= 0")
        if not self.tiny and not self.pretrained:
            raise ValueError("pretrained='' : pass --pretrained DIR (a local StableDiffusionXLPipeline folder) or --tiny")
        if not self.tiny and self.alpha_rew != 0 and not self.reward_model:
            raise ValueError("alpha_rew != 0 needs --reward_model DIR (a local CLIPModel, e.g. PickScore_v1)")


CONFIG = SDXLConfig


# ---- building the parts -----------------------------------------------------------------------------------------
def build_tiny_pipeline(workdir, seed: int = 0, full: bool = False, device="cpu"):
    """A random tiny ``StableDiffusionXLPipeline`` (UNet 16x16x4 latents with text_time embeddings, two CLIP text
    encoders of width 32, VAE 32px) and a tiny ``CLIPReward``, offline and seeded. The byte-level tokenizer
    (written to ``workdir``) is the reward's and both text encoders'. ``full``: UNet, VAE, both text encoders and
    a CLIP-H reward at SDXL / PickScore's published sizes (``configs/arch``), built on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    reward = tiny_clip_reward(Path(workdir) / "tiny_tokenizer", seed=seed)
    tok = reward.tokenizer
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=tok.model_max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if full:
        return _full_random_pipeline(tok, reward, seed, device)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        te1 = CLIPTextModel(CLIPTextConfig(**text))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=64, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            use_linear_projection=True, norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.13025)
    finally:
        torch.random.set_rng_state(state)
    pipe = _sdxl_pipeline(vae, te1, te2, tok, unet)
    return pipe, reward


def _sdxl_pipeline(vae, te1, te2, tok, unet):
    """An SDXL pipeline around random networks, with SDXL's Euler scheduler (scaled-linear betas, trailing spacing)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="trailing")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)


def _full_random_pipeline(tok, tiny_reward, seed: int, device):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from scaled_runs.plan import _arch
    te = _arch("sdxl_text_encoders")
    rc = _arch("pickscore_clip_h")
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            te1 = CLIPTextModel(CLIPTextConfig(**te["text_encoder"], **ids))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te["text_encoder_2"], **ids))
            unet = UNet2DConditionModel(**_arch("sdxl_unet"))
            vae = AutoencoderKL(**_arch("sdxl_vae"))
            clip = CLIPModel(CLIPConfig(text_config={**rc["text_config"], **ids}, vision_config=rc["vision_config"],
                                        projection_dim=rc["projection_dim"]))
    finally:
        torch.random.set_rng_state(state)
    pipe = _sdxl_pipeline(vae, te1, te2, tok, unet)
    return pipe, CLIPReward(clip, tok)


def load_parts(cfg: SDXLConfig, text_encoders: bool = True, device="cpu"):
    """``(pipeline, reward or None, generator UNet or None)`` in fp32 on the CPU, offline. ``text_encoders=False``:
    without the two CLIP text encoders (the run reads precomputed embeddings)."""
    if cfg.tiny:
        pipe, reward = build_tiny_pipeline(cfg.output_dir, cfg.seed, cfg.full_random, device)
        if not text_encoders:
            pipe.text_encoder = pipe.text_encoder_2 = None
    else:
        from diffusers import AutoencoderKL, StableDiffusionXLPipeline
        kw = {} if text_encoders else {"text_encoder": None, "text_encoder_2": None}
        if cfg.vae:
            kw["vae"] = AutoencoderKL.from_pretrained(cfg.vae, local_files_only=True)
        pipe = StableDiffusionXLPipeline.from_pretrained(cfg.pretrained, local_files_only=True, **kw)
        reward = None
        if cfg.reward_model:
            from transformers import AutoTokenizer, CLIPModel
            model = CLIPModel.from_pretrained(cfg.reward_model, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(cfg.reward_tokenizer or cfg.reward_model, local_files_only=True)
            reward = CLIPReward(model, tok)          # checks len(tok) > 2 (broken offline tokenizers)
    for t in ((pipe.tokenizer, pipe.tokenizer_2) if text_encoders else ()):
        if len(t) <= 2:
            raise ValueError(f"a tokenizer of {cfg.pretrained!r} has {len(t)} tokens: it is broken (offline load "
                             "of an uncached hub id); save the pipeline with its tokenizers first")
    gen_unet = None
    if cfg.generator_init:
        from diffusers import UNet2DConditionModel
        root = Path(cfg.generator_init)
        sub = root / "unet" if (root / "unet" / "config.json").is_file() else root
        gen_unet = UNet2DConditionModel.from_pretrained(sub, local_files_only=True)
    return pipe, reward, gen_unet


class DecodedReward(nn.Module):
    """``r(x0, prompts) = R(VAE.decode(x0 / scaling_factor), prompts)``: the pixel reward of decoded latents,
    differentiable with respect to the latents (frozen VAE and reward)."""

    differentiable = True

    def __init__(self, vae: nn.Module, pixel_reward: nn.Module):
        super().__init__()
        self.vae, self.pixel_reward = vae, pixel_reward

    def forward(self, latents: torch.Tensor, prompts) -> torch.Tensor:
        p = next(self.vae.parameters())
        img = self.vae.decode((latents / self.vae.config.scaling_factor).to(p.dtype)).sample
        return self.pixel_reward(img.to(latents.dtype), prompts)


@dataclass
class Parts:
    pipe: Any
    reference: DiffusersUNetPredictor         # frozen SDXL UNet
    generator: TeacherInitGenerator
    fake_net: nn.Module
    fake: DiffusersUNetPredictor
    reward: DecodedReward | None
    process: Process
    t_sampler: Callable
    prompts: list
    latent_shape: tuple
    pixels: int
    store: Any = None                         # PromptStore of precomputed CLIP embeddings (no text encoders)


def text_parts(cfg: SDXLConfig):
    """The pipeline (with its text encoders) and the prompts: what ``encode_prompts`` needs."""
    from types import SimpleNamespace
    pipe, _, _ = load_parts(cfg)
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()                  # as in a run
    return SimpleNamespace(pipe=pipe, prompts=common.read_prompts(cfg.prompts, cfg.tiny), store=None)


def build(cfg: SDXLConfig, device, dtype: torch.dtype = torch.float32) -> Parts:
    store = None
    if cfg.prompt_embeddings:
        from scaled_runs.encode_prompts import PromptStore
        store = PromptStore(cfg.prompt_embeddings, "align_sdxl", cfg)
    pipe, pixel_reward, gen_unet = load_parts(cfg, text_encoders=store is None, device=device)
    process = process_from_scheduler(pipe.scheduler)
    ucfg = pipe.unet.config
    size = ucfg.sample_size if isinstance(ucfg.sample_size, int) else ucfg.sample_size[0]
    if cfg.resolution:
        if cfg.resolution % pipe.vae_scale_factor:
            raise ValueError(f"resolution={cfg.resolution} must be a multiple of the VAE factor {pipe.vae_scale_factor}")
        size = cfg.resolution // pipe.vae_scale_factor
    latent_shape = (ucfg.in_channels, size, size)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    reference = DiffusersUNetPredictor(pipe.unet, process, prediction)
    init = reference if gen_unet is None else DiffusersUNetPredictor(gen_unet, process, prediction)
    generator = TeacherInitGenerator(init, cfg.t_star or None, sigma_star=cfg.sigma_star,
                                     event_shape=latent_shape, input_std=cfg.input_std or None)
    fake_net = copy.deepcopy(pipe.unet).requires_grad_(True).train()
    fake = reference.with_net(fake_net)
    frozen = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae] + ([pixel_reward] if pixel_reward else [])
    if cfg.checkpoint_frozen:       # reference blocks and VAE decoder blocks are recomputed in the backward
        checkpoint_frozen(pipe.unet, pipe.vae)
    for m in (m for m in frozen if m is not None):
        m.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:
            m.to(dtype=dtype)
    generator.to(device)
    fake_net.to(device)
    lo, hi = common.sigma_range(process, cfg.sigma_min)
    if pixel_reward is not None and cfg.checkpoint_frozen:
        pixel_reward = checkpointed(pixel_reward)
    reward = DecodedReward(pipe.vae, pixel_reward) if pixel_reward is not None else None
    prompts = store.prompts if store is not None else common.read_prompts(cfg.prompts, cfg.tiny)
    return Parts(pipe, reference, generator, fake_net, fake, reward, process,
                 p_edm(process, cfg.P_mean, cfg.P_std, sigma_min=lo, sigma_max=hi),
                 prompts, latent_shape, size * pipe.vae_scale_factor, store)


def text_embeddings(parts, cfg, prompts: list[str], device, guided: bool = True):
    """``({"prompt_embeds", "pooled_prompt_embeds"}, same for SDXL's zeroed empty prompt)``: both CLIP encoders
    through ``StableDiffusionXLPipeline.encode_prompt``, or rows of the precomputed store (bit-identical)."""
    if getattr(parts, "store", None) is not None:
        return parts.store.embeddings(prompts, device), parts.store.uncond(len(prompts), device)
    with torch.no_grad():
        pe, ne, pooled, npooled = parts.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=True)
    return ({"prompt_embeds": pe, "pooled_prompt_embeds": pooled},
            {"prompt_embeds": ne, "pooled_prompt_embeds": npooled})


def encode(parts: Parts, prompts: list[str], device) -> tuple[dict, dict]:
    """``(cond, uncond)`` UNet keyword dicts (uncond = SDXL's zeroed empty prompt) with the size / crop
    ``time_ids`` ``(H, W, 0, 0, H, W)``."""
    raw, raw_u = text_embeddings(parts, None, prompts, device)
    pe = raw["prompt_embeds"]
    H = parts.pixels
    time_ids = torch.tensor([[H, H, 0, 0, H, H]], dtype=pe.dtype, device=device).repeat(len(prompts), 1)
    cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": raw["pooled_prompt_embeds"],
                                                              "time_ids": time_ids}}
    uncond = {"encoder_hidden_states": raw_u["prompt_embeds"],
              "added_cond_kwargs": {"text_embeds": raw_u["pooled_prompt_embeds"], "time_ids": time_ids}}
    return cond, uncond


def draw_batch(parts: Parts, n: int, cpu_rng, dev_rng, device) -> dict:
    """One micro-batch: prompts, their (cond, uncond), generator noise ``z``, times ``t`` and forward noise ``eps``."""
    prompts = common.draw_prompts(parts.prompts, n, cpu_rng)
    cond, uncond = encode(parts, prompts, device)
    z = parts.generator.noise(n, dev_rng)
    t = parts.t_sampler(n, cpu_rng).to(z.device)
    eps = torch.randn(z.shape, generator=dev_rng, dtype=z.dtype, device=z.device)
    return {"prompts": prompts, "cond": cond, "uncond": uncond, "z": z, "t": t, "eps": eps}


def decode(parts: Parts, latents: torch.Tensor) -> torch.Tensor:
    vae = parts.pipe.vae
    p = next(vae.parameters())
    return vae.decode((latents / vae.config.scaling_factor).to(p.dtype)).sample.to(latents.dtype)


# ---- the run -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    cfg = common.parse_config(SDXLConfig, argv)
    accelerator = common.setup_accelerator(cfg)
    try:
        return run(cfg, accelerator)
    finally:
        common.release_accelerator(accelerator)


def run(cfg: SDXLConfig, accelerator) -> dict:
    common.seed_all(cfg.seed)
    common.write_config(accelerator, cfg)
    device, rank = accelerator.device, accelerator.process_index
    parts = build(cfg, device, common.weight_dtype(cfg))
    gen = parts.generator

    def fake_loss(step: int, micro: int, fake_train):
        cpu_rng, dev_rng = common.step_generators(cfg.seed, step, "fake", micro, rank, device)
        b = draw_batch(parts, cfg.batch_size, cpu_rng, dev_rng, device)
        with torch.no_grad():
            x0 = gen(b["z"], b["cond"])
        return fake_score_loss(fake_train, x0, t=b["t"], eps=b["eps"], cond=b["cond"], target=cfg.fake_target,
                               weighting=cfg.fake_weighting), {}

    def gen_loss(step: int, micro: int, fake_eval):
        cpu_rng, dev_rng = common.step_generators(cfg.seed, step, "generator", micro, rank, device)
        b = draw_batch(parts, cfg.batch_size, cpu_rng, dev_rng, device)
        x0 = gen(b["z"], b["cond"])
        with common.eval_mode(fake_eval.unet):
            loss, terms = diff_instruct_star_loss(
                x0, parts.reference, fake_eval, b["t"], reward=parts.reward, alpha_rew=cfg.alpha_rew,
                alpha_cfg=cfg.alpha_cfg, cfg=cfg.cfg_mode, distance="pseudo_huber", c=cfg.huber_c or None,
                cond=b["cond"], uncond=b["uncond"], reward_cond=b["prompts"], eps=b["eps"], return_parts=True,
                batched_cfg=cfg.batch_cfg)
        if cfg.alpha_rew and parts.reward is not None:
            terms["reward_mean"] = -terms["reward"] / cfg.alpha_rew     # E r(x0, c) itself, for monitoring
        return loss, terms

    sample_prompts = [parts.prompts[i % len(parts.prompts)] for i in range(cfg.n_samples)]

    def images(model, n: int):
        rng = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003)
        cond, _ = encode(parts, sample_prompts[:n], device)
        x = model(model.noise(n, rng), cond)
        return torch.cat([decode(parts, x[i:i + 4]) for i in range(0, n, 4)])   # the VAE decodes 4 at a time

    out = common.run_distillation(accelerator, cfg, generator=gen, fake_net=parts.fake_net, fake=parts.fake,
                                  fake_loss=fake_loss, gen_loss=gen_loss, images=images,
                                  meta={"method": f"distar-{cfg.cfg_mode}", "alpha_rew": cfg.alpha_rew,
                                        "alpha_cfg": cfg.alpha_cfg, "process": repr(parts.process)},
                                  desc=f"DI*-{cfg.cfg_mode}")
    return {**out, "parts": parts, "config": cfg}


if __name__ == "__main__":
    main()
