"""SIM text-to-image distillation of PixArt-alpha into a one-step generator, in latent space (SIM App. B.3).

Teacher: a ``PixArtTransformer2DModel`` with its T5 text encoder, VAE and noise schedule, from a local
``PixArtAlphaPipeline`` folder (``--pretrained``, ``local_files_only=True``); prompts from a text file (one per
line; SIM used SAM-LLaVA-Caption10M). The transformer predicts eps and a learned variance; only the eps
channels are used (``DiffusersUNetPredictor(learned_variance=True)``), so ``d(x; t) = x - t F`` in EDM units (Eq. B.14).

* generator ``g_theta(z, c) = d_theta(z, t*; c)`` with sigma(t*) = 2.5, ``z ~ N(0, 2.5^2 I)`` in latent space
  (Eq. B.15): a copy of the teacher (``generators.TeacherInitGenerator`` with the prompt as condition); fake score also a copy;
* generator loss: ``sim_generator_loss`` (pseudo-Huber, denoiser space = Alg. 2 / Eq. B.13), weight 1;
  online score: ``fake_score_loss`` (x0 target, weight 1);
* both phases draw ln sigma ~ N(-2, 2^2), truncated to the schedule's [edm_sigma(1), edm_sigma(T)] =
  [0.0100, 157.4] (SIM B.3 quotes [0.01, 156.6]); Adam lr 5e-6, betas (0, 0.999); bf16; batch 1024 =
  4 GPUs x 32 x accumulation 8;
* ``--cfg_scale w > 0``: the teacher becomes the CFG-guided ``s_c + w (s_c - s_u)`` (``alignment.GuidedPredictor``,
  i.e. DI*-In without reward), with ``u`` the embedding of ``--negative_prompt``.

``--tiny`` assembles a random tiny pipeline offline (T5 tokenizer from an in-code vocabulary).

    accelerate launch scaled_runs/distill_pixart.py --config pixart_sim.yaml
    python scaled_runs/distill_pixart.py --tiny --steps 3 --batch_size 2 --mixed_precision no --output_dir runs/smoke_pixart
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
from scaled_runs.memory import checkpoint_frozen  # noqa: E402

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, process_from_scheduler  # noqa: E402
from dstar_edu.generators import TeacherInitGenerator  # noqa: E402
from dstar_edu.objectives.alignment import GuidedPredictor  # noqa: E402
from dstar_edu.objectives.distill import fake_score_loss, p_edm, sim_generator_loss  # noqa: E402
from dstar_edu.process import Process  # noqa: E402


@dataclass
class PixArtConfig(common.BaseConfig):
    """SIM distillation of PixArt-alpha (transformer + T5 + VAE) into a one-step text-to-image generator."""

    output_dir: str = opt("runs/pixart_sim", "folder for checkpoints/, samples/, metrics.jsonl, config.json")
    pretrained: str = opt("", "local PixArtAlphaPipeline folder (transformer/, text_encoder/, tokenizer/, vae/, "
                              "scheduler/)")
    prompts: str = opt("", "text file with one prompt per line (tiny mode: a built-in list)")
    batch_size: int = opt(32, "samples per device per micro-batch")
    grad_accum: int = opt(8, "micro-batches per optimiser step (SIM B.3: 4 GPUs x 32 x 8 = 1024)")
    lr_gen: float = opt(5e-6, "generator Adam learning rate (SIM B.3)")
    lr_fake: float = opt(5e-6, "online score Adam learning rate (SIM B.3)")
    mixed_precision: str = opt("bf16", "'no' (fp32) or 'bf16' autocast; fp16 is refused", ("no", "bf16", "fp16"))
    ema_halflife_kimg: float = opt(0.0, "EMA half-life in kimg (0 = no EMA; SIM B.3 does not use one)")
    sigma_star: float = opt(2.5, "EDM noise level of the generator's fixed time t* (Eq. B.15)")
    P_mean: float = opt(-2.0, "ln sigma mean of both phases' times (SIM B.3)")
    P_std: float = opt(2.0, "ln sigma std of both phases' times (SIM B.3)")
    sigma_min: float = opt(0.0, "lowest noise level drawn (0: edm_sigma(1) of the schedule)")
    huber_c: float = opt(0.0, "pseudo-Huber c (0: the library default 0.00054 sqrt(D))")
    sim_space: str = opt("x0", "SIM loss in denoiser space (Alg. 2) or score space (Eq. 3.8)", ("x0", "score"))
    cfg_scale: float = opt(0.0, "CFG-guided teacher s_c + w (s_c - s_u) (0 = plain conditional teacher)")
    negative_prompt: str = opt("", "the unconditional prompt of the guided teacher")
    max_sequence_length: int = opt(120, "T5 tokens per prompt (PixArt-alpha: 120)")
    fake_target: str = opt("x0", "online-score regression target")
    fake_weighting: str = opt("none", "online-score loss weighting (SIM B.3: constant 1)", ("none", "edm", "snr",
                                                                                            "min_snr"))

    def __post_init__(self):
        super().__post_init__()
        if not (self.sigma_star > 0 and self.P_std > 0 and self.huber_c >= 0 and self.cfg_scale >= 0
                and self.max_sequence_length > 0):
            raise ValueError("need sigma_star > 0, P_std > 0, huber_c >= 0, cfg_scale >= 0, max_sequence_length > 0")
        if not self.tiny and not self.pretrained:
            raise ValueError("pretrained='' : pass --pretrained DIR (a local PixArtAlphaPipeline folder) or --tiny")


CONFIG = PixArtConfig


# ---- building the parts -----------------------------------------------------------------------------------------
TINY_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "car", "house", "painting", "sky")


def build_tiny_pipeline(seed: int = 0, full: bool = False, device="cpu"):
    """A random tiny ``PixArtAlphaPipeline`` (transformer 16x16x4 latents, 2 layers; T5 d_model 32; VAE 32px),
    offline and seeded (the global RNG state is restored). ``full``: transformer, T5-XXL encoder and VAE at
    PixArt-alpha-512's published sizes (``configs/arch``), built on ``device``, with the same tiny tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in TINY_WORDS]
             + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -2.0)])
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=120 if full else 16)
    if full:
        from scaled_runs.plan import _arch
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            with torch.device(device):
                text_encoder = T5EncoderModel(T5Config(**_arch("t5_xxl_encoder"), pad_token_id=0, eos_token_id=1))
                vae = AutoencoderKL(**_arch("sd_vae_512"))
                transformer = PixArtTransformer2DModel(**_arch("pixart_512_transformer"))
        finally:
            torch.random.set_rng_state(state)
        return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                   scheduler=DDPMScheduler())
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, pad_token_id=0, eos_token_id=1))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=32)
        transformer = PixArtTransformer2DModel(sample_size=16, num_layers=2, num_attention_heads=3,
                                               attention_head_dim=8, in_channels=4, out_channels=8,
                                               caption_channels=32, cross_attention_dim=24, norm_num_groups=4)
    finally:
        torch.random.set_rng_state(state)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DDPMScheduler())   # PixArt's linear 1e-4..0.02 schedule


def load_pipeline(cfg: PixArtConfig, text_encoder: bool = True, device="cpu"):
    """The fp32 pipeline (tiny or from ``cfg.pretrained`` offline); its tokenizer is checked (> 2 tokens).
    ``text_encoder=False``: without T5 (the run reads precomputed embeddings)."""
    if cfg.tiny:
        pipe = build_tiny_pipeline(cfg.seed, cfg.full_random, device)
        if not text_encoder:
            pipe.text_encoder = None
    else:
        from diffusers import PixArtAlphaPipeline
        kw = {} if text_encoder else {"text_encoder": None}
        pipe = PixArtAlphaPipeline.from_pretrained(cfg.pretrained, local_files_only=True, **kw)
    if text_encoder and len(pipe.tokenizer) <= 2:
        raise ValueError(f"the tokenizer of {cfg.pretrained!r} has {len(pipe.tokenizer)} tokens: it is broken "
                         "(an offline load of an uncached hub id); save the pipeline with its tokenizer first")
    return pipe


def text_parts(cfg: PixArtConfig):
    """The pipeline (with T5) and the prompts: what ``encode_prompts`` needs."""
    from types import SimpleNamespace
    pipe = load_pipeline(cfg)
    pipe.text_encoder.requires_grad_(False).eval()      # as in a run (T5 has dropout in train mode)
    return SimpleNamespace(pipe=pipe, prompts=common.read_prompts(cfg.prompts, cfg.tiny), store=None)


@dataclass
class Parts:
    pipe: Any                                 # frozen text encoder, VAE, tokenizer (and the teacher transformer)
    teacher: DiffusersUNetPredictor           # over the teacher transformer (eps channels), frozen
    generator: TeacherInitGenerator
    fake_net: nn.Module                       # a copy of the transformer, trained
    fake: DiffusersUNetPredictor
    process: Process                          # the teacher's forward process
    t_sampler: Callable                       # both phases (SIM B.3)
    prompts: list
    latent_shape: tuple
    store: Any = None                         # PromptStore of precomputed T5 embeddings (then no T5 is loaded)


def build(cfg: PixArtConfig, device, dtype: torch.dtype = torch.float32) -> Parts:
    store = None
    if cfg.prompt_embeddings:
        from scaled_runs.encode_prompts import PromptStore
        store = PromptStore(cfg.prompt_embeddings, "distill_pixart", cfg)
    pipe = load_pipeline(cfg, text_encoder=store is None, device=device)
    process = process_from_scheduler(pipe.scheduler)
    tcfg = pipe.transformer.config
    size = tcfg.sample_size if isinstance(tcfg.sample_size, int) else tcfg.sample_size[0]
    latent_shape = (tcfg.in_channels, size, size)
    teacher_net = pipe.transformer
    teacher = DiffusersUNetPredictor(teacher_net, process, pipe.scheduler.config.get("prediction_type", "epsilon"),
                                     learned_variance=True)
    generator = TeacherInitGenerator(teacher, sigma_star=cfg.sigma_star, event_shape=latent_shape)
    fake_net = copy.deepcopy(teacher_net).requires_grad_(True).train()
    fake = teacher.with_net(fake_net)
    if cfg.checkpoint_frozen:
        checkpoint_frozen(teacher_net)        # its blocks are recomputed in the generator's backward
    for frozen in (teacher_net, pipe.text_encoder, pipe.vae):
        if frozen is None:
            continue
        frozen.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:
            frozen.to(dtype=dtype)
    generator.to(device)
    fake_net.to(device)
    lo, hi = common.sigma_range(process, cfg.sigma_min)
    t_sampler = p_edm(process, cfg.P_mean, cfg.P_std, sigma_min=lo, sigma_max=hi)
    prompts = store.prompts if store is not None else common.read_prompts(cfg.prompts, cfg.tiny)
    return Parts(pipe, teacher, generator, fake_net, fake, process, t_sampler, prompts, latent_shape, store)


def text_embeddings(parts, cfg: PixArtConfig, prompts: list[str], device, guided: bool | None = None):
    """``({"prompt_embeds", "prompt_attention_mask"}, same for the negative prompt or None)``: T5 through
    ``PixArtAlphaPipeline.encode_prompt``, or rows of the precomputed store (bit-identical)."""
    guided = cfg.cfg_scale > 0 if guided is None else guided
    if getattr(parts, "store", None) is not None:
        cond = parts.store.embeddings(prompts, device)
        return cond, (parts.store.uncond(len(prompts), device) if guided else None)
    with torch.no_grad():
        pe, pm, ne, nm = parts.pipe.encode_prompt(prompts, do_classifier_free_guidance=guided,
                                                  negative_prompt=cfg.negative_prompt, device=device,
                                                  clean_caption=False, max_sequence_length=cfg.max_sequence_length)
    cond = {"prompt_embeds": pe, "prompt_attention_mask": pm}
    return cond, ({"prompt_embeds": ne, "prompt_attention_mask": nm} if guided else None)


def encode(parts: Parts, cfg: PixArtConfig, prompts: list[str], device) -> tuple[dict, dict | None]:
    """``(cond, uncond)`` network keyword dicts for ``prompts``; ``uncond`` (the negative prompt) only when the
    teacher is guided."""
    raw, raw_u = text_embeddings(parts, cfg, prompts, device)
    pe = raw["prompt_embeds"]
    added = None
    tr = parts.pipe.transformer
    if getattr(tr, "use_additional_conditions", False):   # the 1024px model conditions on size and aspect ratio
        h = w = parts.latent_shape[1] * parts.pipe.vae_scale_factor
        B = len(prompts)
        added = {"resolution": torch.tensor([[h, w]], dtype=pe.dtype, device=device).repeat(B, 1),
                 "aspect_ratio": torch.tensor([[h / w]], dtype=pe.dtype, device=device).repeat(B, 1)}
    cond = {"encoder_hidden_states": pe, "encoder_attention_mask": raw["prompt_attention_mask"],
            "added_cond_kwargs": added}
    uncond = None
    if raw_u is not None:
        uncond = {"encoder_hidden_states": raw_u["prompt_embeds"],
                  "encoder_attention_mask": raw_u["prompt_attention_mask"], "added_cond_kwargs": added}
    return cond, uncond


def draw_batch(parts: Parts, cfg: PixArtConfig, n: int, cpu_rng, dev_rng, device) -> dict:
    """One micro-batch: prompts, their (cond, uncond), generator noise ``z``, times ``t`` and forward noise ``eps``."""
    prompts = common.draw_prompts(parts.prompts, n, cpu_rng)
    cond, uncond = encode(parts, cfg, prompts, device)
    z = parts.generator.noise(n, dev_rng)
    t = parts.t_sampler(n, cpu_rng).to(z.device)
    eps = torch.randn(z.shape, generator=dev_rng, dtype=z.dtype, device=z.device)
    return {"prompts": prompts, "cond": cond, "uncond": uncond, "z": z, "t": t, "eps": eps}


def reference(parts: Parts, cfg: PixArtConfig, uncond):
    """The teacher the generator is matched to: plain, or CFG-guided (``GuidedPredictor``) when cfg_scale > 0."""
    return parts.teacher if cfg.cfg_scale == 0 else GuidedPredictor(parts.teacher, cfg.cfg_scale, uncond=uncond,
                                                                           batched=cfg.batch_cfg)


def decode(parts: Parts, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the frozen VAE."""
    vae = parts.pipe.vae
    p = next(vae.parameters())
    return vae.decode((latents / vae.config.scaling_factor).to(p.dtype)).sample.to(latents.dtype)


# ---- the run -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    cfg = common.parse_config(PixArtConfig, argv)
    accelerator = common.setup_accelerator(cfg)
    try:
        return run(cfg, accelerator)
    finally:
        common.release_accelerator(accelerator)


def run(cfg: PixArtConfig, accelerator) -> dict:
    common.seed_all(cfg.seed)
    common.write_config(accelerator, cfg)
    device, rank = accelerator.device, accelerator.process_index
    parts = build(cfg, device, common.weight_dtype(cfg))
    gen = parts.generator

    def fake_loss(step: int, micro: int, fake_train):
        cpu_rng, dev_rng = common.step_generators(cfg.seed, step, "fake", micro, rank, device)
        b = draw_batch(parts, cfg, cfg.batch_size, cpu_rng, dev_rng, device)
        with torch.no_grad():
            x0 = gen(b["z"], b["cond"])
        return fake_score_loss(fake_train, x0, t=b["t"], eps=b["eps"], cond=b["cond"], target=cfg.fake_target,
                               weighting=cfg.fake_weighting), {}

    def gen_loss(step: int, micro: int, fake_eval):
        cpu_rng, dev_rng = common.step_generators(cfg.seed, step, "generator", micro, rank, device)
        b = draw_batch(parts, cfg, cfg.batch_size, cpu_rng, dev_rng, device)
        x0 = gen(b["z"], b["cond"])
        with common.eval_mode(fake_eval.unet):
            loss = sim_generator_loss(x0, reference(parts, cfg, b["uncond"]), fake_eval, b["t"], eps=b["eps"],
                                      distance="pseudo_huber", c=cfg.huber_c or None, cond=b["cond"],
                                      space=cfg.sim_space)
        return loss, {}

    sample_prompts = [parts.prompts[i % len(parts.prompts)] for i in range(cfg.n_samples)]

    def images(model, n: int):
        rng = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003)
        cond, _ = encode(parts, cfg, sample_prompts[:n], device)
        x = model(model.noise(n, rng), cond)
        return torch.cat([decode(parts, x[i:i + 4]) for i in range(0, n, 4)])   # the VAE decodes 4 at a time

    out = common.run_distillation(accelerator, cfg, generator=gen, fake_net=parts.fake_net, fake=parts.fake,
                                  fake_loss=fake_loss, gen_loss=gen_loss, images=images,
                                  meta={"method": "sim", "process": repr(parts.process)}, desc="sim-pixart")
    return {**out, "parts": parts, "config": cfg}


if __name__ == "__main__":
    main()
