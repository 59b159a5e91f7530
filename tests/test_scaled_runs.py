"""End-to-end CPU tests of ``scaled_runs/`` in ``--tiny`` mode (1-3 steps per run, in-process ``main(argv)``).

Each run is checked with numbers recomputed independently of the script's loop: the logged losses equal the
library losses on the same seeded batch (rebuilt from the checkpoints and the per-step seeds), checkpoints
round-trip bit for bit (safetensors and diffusers ``from_pretrained``), the EMA equals its closed form, a NaN
in the teacher stops the run before the update without a checkpoint, gradient accumulation makes exactly one
optimiser step per phase and step, and a resumed run reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:   # scaled_runs/ is not an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("accelerate", reason="scaled_runs needs accelerate")
pytest.importorskip("transformers", reason="scaled_runs needs transformers")

from safetensors.torch import load_file  # noqa: E402

from dstar_edu.objectives.alignment import GuidedPredictor, diff_instruct_star_loss  # noqa: E402
from dstar_edu.objectives.distill import (diff_instruct_loss, dmd_loss, fake_score_loss,  # noqa: E402
                                          sid_generator_loss, sim_generator_loss)
from scaled_runs import align_sdxl, common, distill_cifar, distill_pixart  # noqa: E402

W = common.WEIGHTS_NAME


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks on a shared 2-core machine run ~10-100x faster on one thread (less sync contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ckpt(out, step):
    return common.checkpoint_dir(out, step)


def weights(out, step, name):
    return load_file(str(ckpt(out, step) / name / W))


def logged(out, step):
    recs = common.read_metrics(out)
    return next(r for r in recs if r["step"] == step)


def assert_close_scalar(a, b, rel=1e-5):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert math.isfinite(a) and math.isfinite(b)
    assert abs(a - b) <= rel * max(1.0, abs(a), abs(b)), (a, b)


def assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


# ---- config parsing ---------------------------------------------------------------------------------------------
def test_config_file_flags_and_refusals(tmp_path):
    """YAML values are read and cast, flags override them; unknown keys, fp16 and bad values are refused."""
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlr_gen: 1.0e-4\nmethod: sid\ntiny: true\nbatch_size: 3\n")
    cfg = common.parse_config(distill_cifar.CifarConfig, ["--config", str(path), "--steps", "3"])
    assert (cfg.steps, cfg.lr_gen, cfg.method, cfg.tiny, cfg.batch_size) == (3, 1e-4, "sid", True, 3)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.sigma_star) == (0.0, 0.999, 2.5)     # SIM Table 5 defaults
    path.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="unknown fields.*stepz"):
        common.parse_config(distill_cifar.CifarConfig, ["--config", str(path), "--tiny"])
    with pytest.raises(ValueError, match="fp16"):
        common.parse_config(distill_cifar.CifarConfig, ["--tiny", "--mixed_precision", "fp16"])
    with pytest.raises(ValueError, match="teacher"):
        common.parse_config(distill_cifar.CifarConfig, [])
    with pytest.raises(ValueError, match="grad_accum"):
        common.parse_config(distill_cifar.CifarConfig, ["--tiny", "--grad_accum", "0"])


def test_save_checkpoint_refuses_non_finite_state(tmp_path):
    acc = common.setup_accelerator(common.BaseConfig(cpu=True))
    try:
        net = torch.nn.Linear(2, 2)
        with pytest.raises(common.NonFiniteError, match="step 4.*not finite"):
            common.save_checkpoint(acc, tmp_path, 4, {"g": common.Saved(net)}, losses={"generator_loss": float("nan")})
        with torch.no_grad():
            net.weight[0, 0] = float("inf")
        with pytest.raises(common.NonFiniteError, match="g.weight"):
            common.save_checkpoint(acc, tmp_path, 4, {"g": common.Saved(net)}, losses={"generator_loss": 1.0})
        assert not (tmp_path / "checkpoints").exists()
    finally:
        common.release_accelerator(acc)


# ---- CIFAR: SIM from a saved diffusers teacher folder -----------------------------------------------------------
CIFAR_SEED, D = 5, 0.9


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from diffusers import DDPMScheduler

    from dstar_edu.diffusers_interop import tiny_unet
    root = tmp_path_factory.mktemp("cifar")
    teacher_dir = root / "teacher"
    tiny_unet(seed=3).save_pretrained(teacher_dir / "unet")
    DDPMScheduler().save_pretrained(teacher_dir / "scheduler")
    out = root / "run"
    argv = ["--teacher", str(teacher_dir), "--steps", "2", "--batch_size", "2", "--checkpoint_every", "1",
            "--sample_every", "1", "--n_samples", "4", "--ema_decay", str(D), "--seed", str(CIFAR_SEED),
            "--output_dir", str(out), "--no-progress"]
    res = distill_cifar.main(argv)
    return {"argv": argv, "out": out, "res": res, "teacher": load_file(str(teacher_dir / "unet" / W))}


def test_cifar_checkpoints_round_trip(cifar):
    from diffusers import UNet2DModel
    out, res = cifar["out"], cifar["res"]
    assert res["checkpoint"] == ckpt(out, 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    assert_same_state(weights(out, 2, "generator"), res["generator"].denoiser.unet.state_dict())
    assert_same_state(weights(out, 2, "fake"), res["fake_net"].state_dict())
    assert_same_state(weights(out, 2, "generator_ema"), res["ema"].model.denoiser.unet.state_dict())
    loaded = UNet2DModel.from_pretrained(ckpt(out, 2) / "generator", local_files_only=True)
    assert_same_state(loaded.state_dict(), weights(out, 2, "generator"))
    state = json.loads((ckpt(out, 2) / "state.json").read_text())
    rec = logged(out, 2)
    assert state["losses"] == {"fake_loss": rec["fake_loss"], "generator_loss": rec["generator_loss"]}
    assert state["t_star"] == 441.0 and abs(state["sigma_star"] - 2.5) < 0.01   # linear DDPM: sigma 2.5 at t ~ 441


def test_cifar_generator_trained_teacher_untouched(cifar):
    out, res, teacher = cifar["out"], cifar["res"], cifar["teacher"]
    assert_same_state(res["teacher"].unet.state_dict(), teacher)
    for name in ("generator", "fake"):
        w = weights(out, 1, name)
        assert max(float((w[k] - teacher[k]).abs().max()) for k in w) > 1e-7, name   # one Adam step moved it
    g1, g2 = weights(out, 1, "generator"), weights(out, 2, "generator")
    assert any(not torch.equal(g1[k], g2[k]) for k in g1)


def _cifar_parts(cfg):
    return distill_cifar.build(cfg, "cpu")


def test_cifar_logged_losses_equal_library_losses(cifar):
    """Step s's logged losses = the library losses on step s's seeded batch, with the generator before its
    update (checkpoint s-1, or the teacher at s = 1) and the online score after its update (checkpoint s)."""
    out = cifar["out"]
    cfg = common.parse_config(distill_cifar.CifarConfig, cifar["argv"])
    for step in (1, 2):
        parts = _cifar_parts(cfg)
        if step > 1:
            parts.generator.denoiser.unet.load_state_dict(weights(out, step - 1, "generator"))
        gen_before = {k: v.clone() for k, v in parts.generator.denoiser.unet.state_dict().items()}
        parts.fake_net.load_state_dict(weights(out, step, "fake"))
        cpu, dev = common.step_generators(CIFAR_SEED, step, "generator", 0, 0, "cpu")
        z, t, eps = distill_cifar.draw_batch(parts, 2, cpu, dev, "generator")
        loss = sim_generator_loss(parts.generator(z), parts.teacher, parts.fake, t, eps=eps, distance="pseudo_huber",
                                  space="x0")
        assert_close_scalar(loss, logged(out, step)["generator_loss"])
        # the online-score phase: fake before its update (checkpoint s-1 or the teacher), EDM weighting, x0 target
        if step > 1:
            parts.fake_net.load_state_dict(weights(out, step - 1, "fake"))
        else:
            parts.fake_net.load_state_dict(cifar["teacher"])
        parts.generator.denoiser.unet.load_state_dict(gen_before)
        cpu, dev = common.step_generators(CIFAR_SEED, step, "fake", 0, 0, "cpu")
        z, t, eps = distill_cifar.draw_batch(parts, 2, cpu, dev, "fake")
        with torch.no_grad():
            floss = fake_score_loss(parts.fake, parts.generator(z), t=t, eps=eps, target="x0", weighting="edm")
        assert_close_scalar(floss, logged(out, step)["fake_loss"])


def test_cifar_ema_equals_closed_form(cifar):
    """theta_ema after k updates = d^k theta_0 + sum_j d^(k-j) (1 - d) theta_j, theta_0 = the teacher."""
    out, t0 = cifar["out"], cifar["teacher"]
    g1, g2 = weights(out, 1, "generator"), weights(out, 2, "generator")
    e1, e2 = weights(out, 1, "generator_ema"), weights(out, 2, "generator_ema")
    for k in t0:
        if not t0[k].is_floating_point():
            continue
        torch.testing.assert_close(e1[k], D * t0[k] + (1 - D) * g1[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e2[k], D * D * t0[k] + D * (1 - D) * g1[k] + (1 - D) * g2[k], rtol=1e-5, atol=1e-6)


def test_cifar_sample_grids_are_png_images(cifar):
    from PIL import Image
    import numpy as np
    for step in (1, 2):
        img = Image.open(cifar["out"] / "samples" / f"step_{step:07d}.png")
        assert img.mode == "RGB" and img.size == (64, 64)          # 4 samples of 32x32 as a 2x2 grid
        assert np.asarray(img).std() > 1.0


def test_cifar_nan_in_teacher_output_stops_before_the_update(tmp_path, monkeypatch):
    """The teacher returns NaN from its second call (step 2's generator loss): the run raises naming step 2,
    checkpoint 1 exists, no checkpoint 2 (and no half-written one), metrics stop at step 1."""
    orig = distill_cifar.load_teacher

    def nan_teacher(cfg):
        unet, sched = orig(cfg)
        target, calls = id(unet), {"n": 0}

        def hook(module, args, output):      # deep copies (generator, fake) carry the hook but are not `target`
            if id(module) != target:
                return None
            calls["n"] += 1
            return type(output)(sample=output.sample * float("nan")) if calls["n"] >= 2 else None
        unet.register_forward_hook(hook)
        return unet, sched

    monkeypatch.setattr(distill_cifar, "load_teacher", nan_teacher)
    out = tmp_path / "run"
    with pytest.raises(common.NonFiniteError, match=r"generator loss is nan at step 2.*sim_generator_loss"):
        distill_cifar.main(["--tiny", "--steps", "3", "--batch_size", "2", "--checkpoint_every", "1",
                            "--ema_decay", "0.5", "--output_dir", str(out), "--no-progress"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    assert [r["step"] for r in common.read_metrics(out)] == [1]
    for name in ("generator", "fake", "generator_ema"):
        assert all(bool(torch.isfinite(v).all()) for v in weights(out, 1, name).values())


def test_cifar_grad_accumulation_and_exact_resume(tmp_path):
    """grad_accum=2: one Adam step per phase per step (state 'step' == 2 after 2 steps), the logged generator
    loss is the mean of the two micro-batch library losses; resuming from checkpoint 1 reproduces checkpoint 2
    bit for bit (weights, EMA, optimiser states)."""
    base = ["--tiny", "--steps", "2", "--batch_size", "1", "--grad_accum", "2", "--ema_decay", "0.5",
            "--seed", "2", "--no-progress", "--sample_every", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    distill_cifar.main(base + ["--checkpoint_every", "1", "--output_dir", str(a)])
    opts = torch.load(ckpt(a, 2) / "optimizers.pt", weights_only=True)
    for name in ("generator", "fake"):
        assert {float(s["step"]) for s in opts[name]["state"].values()} == {2.0}

    cfg = common.parse_config(distill_cifar.CifarConfig, base + ["--output_dir", str(a)])
    parts = _cifar_parts(cfg)
    parts.generator.denoiser.unet.load_state_dict(weights(a, 1, "generator"))
    parts.fake_net.load_state_dict(weights(a, 2, "fake"))
    micro = []
    for m in range(2):
        cpu, dev = common.step_generators(2, 2, "generator", m, 0, "cpu")
        z, t, eps = distill_cifar.draw_batch(parts, 1, cpu, dev, "generator")
        micro.append(float(sim_generator_loss(parts.generator(z), parts.teacher, parts.fake, t, eps=eps,
                                              space="x0").detach()))
    assert micro[0] != micro[1]
    assert_close_scalar(sum(micro) / 2, logged(a, 2)["generator_loss"])

    distill_cifar.main(base + ["--resume", str(ckpt(a, 1)), "--output_dir", str(b)])
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_0000002"]
    for name in ("generator", "fake", "generator_ema"):
        assert_same_state(weights(b, 2, name), weights(a, 2, name))
    opts_b = torch.load(ckpt(b, 2) / "optimizers.pt", weights_only=True)
    for name in ("generator", "fake"):
        for i, s in opts[name]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, opts_b[name]["state"][i][k]), (name, i, k)


@pytest.mark.parametrize("method", ["sid", "di", "dmd"])
def test_cifar_other_methods_log_their_library_loss(tmp_path, method):
    """--method sid|di|dmd: step 1's logged generator loss = the library loss (SiD alpha 1.2 with its weighting;
    Diff-Instruct in x0 space, weight 1; DMD with DMD2's normalisation) on step 1's batch, with the generator
    at its teacher initialisation and the online score of checkpoint 1."""
    out = tmp_path / "run"
    argv = ["--tiny", "--method", method, "--steps", "1", "--batch_size", "2", "--ema_halflife_kimg", "0",
            "--sample_every", "0", "--output_dir", str(out), "--no-progress"]
    res = distill_cifar.main(argv)
    assert res["ema"] is None and not (ckpt(out, 1) / "generator_ema").exists()
    parts = _cifar_parts(common.parse_config(distill_cifar.CifarConfig, argv))
    parts.fake_net.load_state_dict(weights(out, 1, "fake"))
    cpu, dev = common.step_generators(0, 1, "generator", 0, 0, "cpu")
    z, t, eps = distill_cifar.draw_batch(parts, 2, cpu, dev, "generator")
    x0 = parts.generator(z)
    fn = {"sid": lambda: sid_generator_loss(x0, parts.teacher, parts.fake, t, eps=eps, alpha=1.2, weighting="sid"),
          "di": lambda: diff_instruct_loss(x0, parts.teacher, parts.fake, t, eps=eps, space="x0"),
          "dmd": lambda: dmd_loss(x0, parts.teacher, parts.fake, t, eps=eps, weighting="dmd")}[method]
    assert_close_scalar(fn(), logged(out, 1)["generator_loss"])


# ---- PixArt: SIM in latent space with a T5 text encoder -----------------------------------------------------------
def test_pixart_sim_tiny_run(tmp_path):
    """Two steps with a CFG-guided teacher (w = 1.5): checkpoints load as PixArtTransformer2DModel and equal the
    trained weights; the generator moved; step 2's logged loss = sim_generator_loss(pseudo-Huber, x0 space) with
    GuidedPredictor(teacher, 1.5, uncond = the empty prompt) on step 2's prompts, noise and times."""
    from diffusers import PixArtTransformer2DModel
    out = tmp_path / "run"
    argv = ["--tiny", "--steps", "2", "--batch_size", "2", "--grad_accum", "1", "--mixed_precision", "no",
            "--checkpoint_every", "1", "--sample_every", "2", "--n_samples", "2", "--cfg_scale", "1.5", "--seed", "1",
            "--output_dir", str(out), "--no-progress"]
    res = distill_pixart.main(argv)
    gen_tr = res["generator"].denoiser.unet
    assert_same_state(weights(out, 2, "generator"), gen_tr.state_dict())
    loaded = PixArtTransformer2DModel.from_pretrained(ckpt(out, 2) / "generator", local_files_only=True)
    assert_same_state(loaded.state_dict(), gen_tr.state_dict())
    teacher = res["parts"].teacher.unet.state_dict()
    g1 = weights(out, 1, "generator")
    assert max(float((g1[k] - teacher[k]).abs().max()) for k in g1) > 1e-7
    assert (out / "samples" / "step_0000002.png").is_file()

    cfg = common.parse_config(distill_pixart.PixArtConfig, argv)
    parts = distill_pixart.build(cfg, "cpu")
    assert parts.generator.t_star == 441.0                       # sigma* = 2.5 on PixArt's linear schedule
    parts.generator.denoiser.unet.load_state_dict(weights(out, 1, "generator"))
    parts.fake_net.load_state_dict(weights(out, 2, "fake"))
    cpu, dev = common.step_generators(1, 2, "generator", 0, 0, "cpu")
    b = distill_pixart.draw_batch(parts, cfg, 2, cpu, dev, "cpu")
    x0 = parts.generator(b["z"], b["cond"])
    loss = sim_generator_loss(x0, GuidedPredictor(parts.teacher, 1.5, uncond=b["uncond"]), parts.fake, b["t"],
                              eps=b["eps"], distance="pseudo_huber", cond=b["cond"], space="x0")
    assert_close_scalar(loss, logged(out, 2)["generator_loss"])


# ---- SDXL: Diff-Instruct* with a CLIP reward -----------------------------------------------------------------------
def _sdxl_recompute(out, argv, step, gen_state, fake_state, alpha_rew, alpha_cfg, mode):
    cfg = common.parse_config(align_sdxl.SDXLConfig, argv)
    parts = align_sdxl.build(cfg, "cpu")
    if gen_state is not None:
        parts.generator.denoiser.unet.load_state_dict(gen_state)
    parts.fake_net.load_state_dict(fake_state)
    cpu, dev = common.step_generators(cfg.seed, step, "generator", 0, 0, "cpu")
    b = align_sdxl.draw_batch(parts, cfg.batch_size, cpu, dev, "cpu")
    x0 = parts.generator(b["z"], b["cond"])
    return diff_instruct_star_loss(x0, parts.reference, parts.fake, b["t"], reward=parts.reward, alpha_rew=alpha_rew,
                                   alpha_cfg=alpha_cfg, cfg=mode, distance="pseudo_huber", cond=b["cond"],
                                   uncond=b["uncond"], reward_cond=b["prompts"], eps=b["eps"], return_parts=True,
                                   batched_cfg=cfg.batch_cfg)   # the run's own evaluation order (batched CFG)


def test_sdxl_distar_in_tiny_run(tmp_path):
    """DI*-In, alpha_rew = 10, alpha_cfg = 2: step 2's logged loss and its terms (divergence, -alpha_rew E r)
    equal diff_instruct_star_loss recomputed with the tiny CLIP reward on decoded images; checkpoints load as
    UNet2DConditionModel; the generator (t* = 626, sigma* = 2.5 on SDXL's schedule) moved."""
    from diffusers import UNet2DConditionModel
    out = tmp_path / "run"
    argv = ["--tiny", "--steps", "2", "--batch_size", "2", "--mixed_precision", "no", "--alpha_rew", "10",
            "--alpha_cfg", "2", "--cfg_mode", "in", "--checkpoint_every", "1", "--sample_every", "2",
            "--n_samples", "2", "--seed", "4", "--output_dir", str(out), "--no-progress"]
    res = align_sdxl.main(argv)
    assert res["generator"].t_star == 626.0
    unet = res["generator"].denoiser.unet
    assert_same_state(weights(out, 2, "generator"), unet.state_dict())
    loaded = UNet2DConditionModel.from_pretrained(ckpt(out, 2) / "generator", local_files_only=True)
    assert_same_state(loaded.state_dict(), unet.state_dict())
    ref = res["parts"].reference.unet.state_dict()
    g1 = weights(out, 1, "generator")
    assert max(float((g1[k] - ref[k]).abs().max()) for k in g1) > 1e-7
    assert (out / "samples" / "step_0000002.png").is_file()

    loss, terms = _sdxl_recompute(out, argv, 2, weights(out, 1, "generator"), weights(out, 2, "fake"), 10.0, 2.0, "in")
    rec = logged(out, 2)
    assert_close_scalar(loss, rec["generator_loss"])
    assert_close_scalar(terms["divergence"], rec["generator_divergence"])
    assert_close_scalar(terms["reward"], rec["generator_reward"])
    assert_close_scalar(-terms["reward"] / 10.0, rec["generator_reward_mean"])


def test_sdxl_distar_out_tiny_run(tmp_path):
    """DI*-Out: step 1's logged loss and its implicit-CFG term equal the library's on step 1's batch
    (generator at its reference initialisation, assistant of checkpoint 1)."""
    out = tmp_path / "run"
    argv = ["--tiny", "--steps", "1", "--batch_size", "2", "--mixed_precision", "no", "--alpha_rew", "1",
            "--alpha_cfg", "1.5", "--cfg_mode", "out", "--sample_every", "0", "--seed", "6",
            "--output_dir", str(out), "--no-progress"]
    align_sdxl.main(argv)
    loss, terms = _sdxl_recompute(out, argv, 1, None, weights(out, 1, "fake"), 1.0, 1.5, "out")
    rec = logged(out, 1)
    assert "cfg" in terms
    assert_close_scalar(loss, rec["generator_loss"])
    assert_close_scalar(terms["cfg"], rec["generator_cfg"])


@pytest.mark.parametrize("module, cls, name", [(distill_cifar, "CifarConfig", "cifar_sim.yaml"),
                                               (distill_pixart, "PixArtConfig", "pixart_sim.yaml"),
                                               (align_sdxl, "SDXLConfig", "sdxl_distar.yaml")])
def test_shipped_configs_parse_with_the_seed_settings(module, cls, name):
    cfg = common.parse_config(getattr(module, cls), ["--config", str(Path(common.__file__).parent / "configs" / name)])
    assert (cfg.adam_beta1, cfg.adam_beta2) == (0.0, 0.999)
    if name == "cifar_sim.yaml":
        assert (cfg.lr_gen, cfg.lr_fake, cfg.sigma_star, cfg.gen_P_mean, cfg.gen_P_std) == (1e-5, 1e-5, 2.5, -3.5, 2.5)
    if name == "pixart_sim.yaml":
        assert (cfg.lr_gen, cfg.batch_size * cfg.grad_accum * 4, cfg.P_mean, cfg.P_std) == (5e-6, 1024, -2.0, 2.0)
        assert cfg.mixed_precision == "bf16"
    if name == "sdxl_distar.yaml":
        assert (cfg.alpha_rew, cfg.alpha_cfg, cfg.cfg_mode, cfg.mixed_precision) == (100.0, 7.5, "in", "bf16")


def test_sdxl_loads_pipeline_reward_and_generator_init_from_local_folders(tmp_path):
    """The full-scale loading path offline: a saved SDXL pipeline (from_pretrained, local_files_only), a saved
    CLIPModel + tokenizer as the reward, and --generator_init: the generator starts from that UNet (not the
    reference) at t* = 400, and one DI* step runs with finite, logged terms."""
    pipe, reward = align_sdxl.build_tiny_pipeline(tmp_path / "work", seed=0)
    pipe.save_pretrained(tmp_path / "sdxl")
    reward.model.save_pretrained(tmp_path / "reward")
    reward.tokenizer.save_pretrained(tmp_path / "reward")
    init = pipe.unet
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.01)
    init.save_pretrained(tmp_path / "init")
    (tmp_path / "prompts.txt").write_text("a photo of the red car\n\na dog\n")
    argv = ["--pretrained", str(tmp_path / "sdxl"), "--reward_model", str(tmp_path / "reward"),
            "--generator_init", str(tmp_path / "init"), "--t_star", "400", "--prompts", str(tmp_path / "prompts.txt"),
            "--steps", "1", "--batch_size", "2", "--mixed_precision", "no", "--sample_every", "0",
            "--output_dir", str(tmp_path / "run"), "--no-progress"]
    parts = align_sdxl.build(common.parse_config(align_sdxl.SDXLConfig, argv), "cpu")
    assert parts.prompts == ["a photo of the red car", "a dog"] and parts.generator.t_star == 400.0
    assert_same_state(parts.generator.denoiser.unet.state_dict(), load_file(str(tmp_path / "init" / W)))
    ref = parts.reference.unet.state_dict()
    assert all(torch.allclose(v, ref[k] + 0.01) for k, v in parts.generator.denoiser.unet.state_dict().items()
               if v.is_floating_point())
    align_sdxl.main(argv)
    rec = logged(tmp_path / "run", 1)
    assert all(math.isfinite(rec[k]) for k in ("generator_loss", "generator_divergence", "generator_reward_mean"))
