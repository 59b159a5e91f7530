"""Exact times in any precision (issue 10, item 1): every diffusers network of the scaled runs receives its
timestep by keyword, in float32 and equal to the float32 rounding of the float64 model time, also when the
network itself is bf16; and the scripts' loss paths in bf16 agree with fp32 within bf16 round-off."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="scaled_runs needs accelerate")
pytest.importorskip("transformers", reason="scaled_runs needs transformers")

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet  # noqa: E402
from dstar_edu.objectives.alignment import GuidedPredictor, diff_instruct_star_loss  # noqa: E402
from dstar_edu.objectives.distill import fake_score_loss, sim_generator_loss  # noqa: E402
from dstar_edu.process import DDPM  # noqa: E402
from scaled_runs import align_sdxl, common, distill_cifar, distill_pixart  # noqa: E402

BF16_U = 2.0 ** -8      # bf16 keeps 8 significant bits: relative spacing 2^-7, round-to-nearest error <= 2^-8


class TimestepSpy:
    """Forward pre-hooks on every ``DiffusersUNetPredictor`` and on its network: the predictor hook records the
    float64 model time ``timestep_fn(t)``; the network hook checks the timestep it receives against it."""

    def __init__(self, predictors):
        self.calls, self.errors, self.handles, self.pending = 0, [], [], []
        for p in predictors:
            self.handles.append(p.register_forward_pre_hook(self._pred_hook, with_kwargs=True))
            self.handles.append(p.unet.register_forward_pre_hook(self._net_hook, with_kwargs=True))

    def _pred_hook(self, module, args, kwargs):
        t = torch.as_tensor(args[1], dtype=torch.float64)
        t = t.expand(args[0].shape[0]) if t.ndim == 0 else t
        self.pending.append(module.timestep_fn(t))

    def _net_hook(self, module, args, kwargs):
        self.calls += 1
        expected = self.pending.pop()
        if "timestep" not in kwargs:
            self.errors.append(f"{type(module).__name__}: timestep passed positionally")
            return
        ts = kwargs["timestep"]
        if ts.dtype not in (torch.float32, torch.float64):
            self.errors.append(f"{type(module).__name__}: timestep dtype {ts.dtype}")
        elif not torch.equal(ts.double(), expected.to(ts.dtype).double()):
            self.errors.append(f"{type(module).__name__}: got {ts.tolist()}, exact {expected.tolist()}")

    def close(self):
        for h in self.handles:
            h.remove()


def test_bf16_network_receives_exact_integer_steps():
    """DDPM times 400 and 999 are diffusers steps 399 and 998; in bf16 they would be 400 and 1000 (outside
    0..999). The bf16 UNet receives 399.0 and 998.0 in float32; its output equals the fp32 UNet's within bf16
    round-off of the activations, while feeding the bf16-rounded steps changes the time embedding."""
    assert torch.tensor([399.0, 998.0]).bfloat16().float().tolist() == [400.0, 1000.0]   # the bug it guards
    net = tiny_unet(seed=2)
    pred = DiffusersUNetPredictor(net.to(torch.bfloat16), DDPM(), "epsilon")
    spy = TimestepSpy([pred])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pred(x, torch.tensor([400.0, 999.0]))
    spy.close()
    assert spy.calls == 1 and spy.errors == []
    got = []
    pred.unet.register_forward_pre_hook(lambda m, a, k: got.append(k["timestep"]), with_kwargs=True)
    pred(x, torch.tensor([400.0, 999.0]))
    assert got[0].dtype == torch.float32 and got[0].tolist() == [399.0, 998.0]


def test_learned_variance_channels():
    """PixArt predicts 2C channels (eps, learned variance): learned_variance=True keeps the first C, which equal
    the network's own output; without it the 2C output is refused with a hint."""
    pipe = distill_pixart.build_tiny_pipeline(0)
    tr = pipe.transformer.eval()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))}
    pred = DiffusersUNetPredictor(tr, DDPM(), "epsilon", learned_variance=True)
    with torch.no_grad():
        out = pred(x, torch.tensor([10.0, 700.0]), cond)
        raw = tr(x, timestep=torch.tensor([9.0, 699.0]), encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert raw.shape[1] == 8 and torch.equal(out, raw[:, :4])
    with pytest.raises(ValueError, match="learned_variance=True"):
        DiffusersUNetPredictor(tr, DDPM(), "epsilon")(x, torch.tensor([10.0, 700.0]), cond)


def _predictors(parts):
    teacher = getattr(parts, "teacher", None) or parts.reference
    return [teacher, parts.generator.denoiser, parts.fake]


PERTURB = 0.05


def _perturb(net, seed, scale=PERTURB):
    """Move the online score away from the teacher (relative ``scale`` per weight), so that the generator loss
    is not a difference of two equal networks (pure round-off)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


def _losses(name, dtype, spy_errors):
    """Fake and generator loss of the script ``name`` on its step-1 batch, with frozen networks in ``dtype`` and
    bf16 autocast when ``dtype`` is bf16 (the scripts' mixed-precision path); timesteps checked by a spy."""
    mp = "bf16" if dtype == torch.bfloat16 else "no"
    base = ["--tiny", "--batch_size", "2", "--mixed_precision", mp, "--output_dir", "/tmp/unused_precision"]
    if name == "cifar":
        cfg = common.parse_config(distill_cifar.CifarConfig, base)
        parts = distill_cifar.build(cfg, "cpu", dtype)
    elif name == "pixart":
        cfg = common.parse_config(distill_pixart.PixArtConfig, base + ["--cfg_scale", "2.0"])
        parts = distill_pixart.build(cfg, "cpu", dtype)
    else:
        cfg = common.parse_config(align_sdxl.SDXLConfig, base + ["--alpha_rew", "10"])
        parts = align_sdxl.build(cfg, "cpu", dtype)
    _perturb(parts.fake_net, 7)
    spy = TimestepSpy(_predictors(parts))
    cpu, dev = common.step_generators(0, 1, "generator", 0, 0, "cpu")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    try:
        with ctx:
            if name == "cifar":
                z, t, eps = distill_cifar.draw_batch(parts, 2, cpu, dev, "generator")
                x0 = parts.generator(z)
                gen = distill_cifar.generator_loss(cfg, x0, parts.teacher, parts.fake, t, eps)
                fake = fake_score_loss(parts.fake, x0.detach(), t=t, eps=eps, target=cfg.fake_target,
                                       weighting=cfg.fake_weighting)
            else:
                draw = (distill_pixart.draw_batch(parts, cfg, 2, cpu, dev, "cpu") if name == "pixart"
                        else align_sdxl.draw_batch(parts, 2, cpu, dev, "cpu"))
                x0 = parts.generator(draw["z"], draw["cond"])
                if name == "pixart":
                    ref = GuidedPredictor(parts.teacher, cfg.cfg_scale, uncond=draw["uncond"])
                    gen = sim_generator_loss(x0, ref, parts.fake, draw["t"], eps=draw["eps"], distance="pseudo_huber",
                                             cond=draw["cond"], space="x0")
                else:
                    gen = diff_instruct_star_loss(x0, parts.reference, parts.fake, draw["t"], reward=parts.reward,
                                                  alpha_rew=cfg.alpha_rew, alpha_cfg=cfg.alpha_cfg, cfg="in",
                                                  cond=draw["cond"], uncond=draw["uncond"],
                                                  reward_cond=draw["prompts"], eps=draw["eps"])
                fake = fake_score_loss(parts.fake, x0.detach(), t=draw["t"], eps=draw["eps"], cond=draw["cond"],
                                       target=cfg.fake_target, weighting=cfg.fake_weighting)
    finally:
        spy.close()
    spy_errors.extend(spy.errors)
    assert spy.calls >= 4, spy.calls           # generator, teacher (twice when guided), fake
    return float(fake.detach()), float(gen.detach())


@pytest.mark.parametrize("name", ["cifar", "pixart", "sdxl"])
def test_bf16_loss_paths_match_fp32(name):
    """The scripts' loss paths with bf16 frozen networks and bf16 autocast vs fp32, on the same batch, with every
    network's timestep checked by the spy in both runs.

    Tolerances from bf16 round-off u = 2^-8 (measured in brackets, 2 cores, torch 2.13 CPU):
    * online-score loss: a mean of squared regression errors over B x D = 2 x 3072 (CIFAR) / 2 x 1024 (latents)
      entries; each carries a relative round-off of a few u with varying signs, so the mean is within u
      [3e-5 .. 9e-5];
    * generator loss: a difference of the teacher and the online score, which differ by the 5% weight
      perturbation of ``_perturb``; each network's O(u) output round-off, relative to that difference, is
      u / 0.05, twice (teacher and fake): 2u / 0.05 = 16% [0.6% .. 4.7%].
    """
    errors: list = []
    f32, g32 = _losses(name, torch.float32, errors)
    f16, g16 = _losses(name, torch.bfloat16, errors)
    assert errors == []                        # every network got its exact float32 timestep, in both precisions
    assert abs(f16 - f32) <= BF16_U * abs(f32), (f16, f32)
    assert abs(g16 - g32) <= 2 * BF16_U / PERTURB * abs(g32), (g16, g32)
