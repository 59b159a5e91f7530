"""The one alternating loop of score distillation (SIM Alg. 1-2, Diff-Instruct Alg. 1, FGM Alg. 1, DMD).

Each iteration: ``fake_steps`` updates of the online ("fake") score on *detached* generator samples (the
denoising loss of ``objectives.distill.fake_score_loss``, or a custom ``fake_loss_fn``), then one generator
update with ``generator_loss_fn`` (SIM, SiD, DI, VSD, DMD, FGM, ... from ``objectives.distill``). Both use
Adam with the seeds' betas ``(0, 0.999)`` by default (SIM Table 5, Diff-Instruct). Which method runs is
decided only by ``generator_loss_fn``; this loop is the same for a 2D MLP and a diffusers UNet.

Stops with ``FloatingPointError`` naming the step and the phase when a loss or a gradient norm is NaN/inf,
before the optimiser touches the weights.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from .failures import Diverged, TrainingFailure, loss_name, make_detector
from .objectives.distill import fake_score_loss, frozen
from .training import EMA

Tensor = torch.Tensor

__all__ = ["distill"]


def _positive_int(name: str, v, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
    return v


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name}={v!r} must be a positive finite number")
    return float(v)


def _step(opt: torch.optim.Optimizer, params: list, loss: Tensor, step: int, phase: str,
          grad_clip: float | None, watch=None) -> tuple[float, float]:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"the {phase} loss must be a scalar tensor, got "
                         f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else ' ' + str(tuple(loss.shape))}")
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingFailure(f"{phase} loss is {value} at step {step}: distillation stopped before the update "
                              "(lower the learning rate, check the time range and the networks)", step=step,
                              phase=phase)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf))
    if not math.isfinite(norm):
        raise TrainingFailure(f"{phase} gradient norm is {norm} at step {step} (loss {value:.4g}): distillation "
                              "stopped before the update", step=step, phase=phase)
    if watch is not None:                      # divergence detector: fake loss / generator gradient norm
        watch(step, phase, value, norm)
    opt.step()
    return value, norm


def _guarded(fake_update, generator_loss_fn, fake_loss_fn, divergence):
    """Wrap the two phases so any failure names the step, the phase and the loss (``failures``)."""
    gen_name = loss_name(generator_loss_fn)
    fake_name = loss_name(fake_loss_fn) if fake_loss_fn is not None else "fake_score_loss"
    names = {"fake-score": fake_name, "generator": gen_name}
    count = {"gen": 0}
    detectors = {"fake-score": make_detector(divergence, "loss"), "generator": make_detector(divergence,
                                                                                           "gradient norm")}

    def relabel(err, step, phase):
        if isinstance(err, TrainingFailure):
            err.loss = err.loss or names[phase]
            if names[phase] not in str(err):
                err.args = (f"{err.args[0]} [loss {names[phase]}]",)
            return err
        return TrainingFailure(f"distillation step {step}, phase {phase!r} (loss {names[phase]}): {err}",
                               step=step, phase=phase, loss=names[phase])

    def fake(step):
        try:
            return fake_update(step)
        except FloatingPointError as err:
            raise relabel(err, step, "fake-score") from (None if isinstance(err, TrainingFailure) else err)

    def gen_loss(*args, **kwargs):
        step = count["gen"]
        count["gen"] += 1
        try:
            return generator_loss_fn(*args, **kwargs)
        except FloatingPointError as err:
            raise relabel(err, step, "generator") from (None if isinstance(err, TrainingFailure) else err)

    def watch(step, phase, value, norm):
        det = detectors[phase]
        if det is not None:
            try:
                det.observe(step, value if phase == "fake-score" else norm, phase)
            except Diverged as err:
                raise relabel(err, step, phase)
    return fake, gen_loss, watch


def distill(generator_model: nn.Module, teacher, fake, generator_loss_fn: Callable, *, steps: int, fake_steps: int = 1,
            lr_gen: float, lr_fake: float, betas=(0.0, 0.999), batch_size: int, t_sampler_gen, t_sampler_fake,
            generator: torch.Generator | None = None, progress: bool = True, callback=None, callback_every: int = 100,
            fake_loss_fn: Callable | None = None, fake_params=None, fake_target: str | None = None,
            fake_weighting="none", fake_warmup: int = 0, ema_decay: float | None = None,
            grad_clip: float | None = None, cond_sampler: Callable | None = None, divergence=True) -> dict:
    """Alternate online-score and generator updates; returns the history.

    Args:
        generator_model: a ``dstar_edu.generators`` generator (``sample(n, generator)`` with gradient).
        teacher: the frozen pre-trained predictor (exact mixture, ``MLPPredictor``, wrapped UNet, ...).
        fake: the online predictor ``s_psi`` of the same process (e.g. a copy of the teacher network).
        generator_loss_fn: ``fn(x0, teacher, fake, t, generator=g, cond=c) -> scalar``, e.g.
            ``functools.partial(sim_generator_loss, distance="pseudo_huber", c=...)``.
        steps: generator updates; ``fake_steps``: online-score updates before each (SIM's pseudo-code: 2).
        lr_gen, lr_fake, betas: Adam settings (SIM Table 5: betas (0, 0.999)).
        batch_size: samples per update (both phases).
        t_sampler_gen, t_sampler_fake: ``(n, generator) -> (n,)`` times (e.g. ``p_sim(process)``,
            ``p_edm(process)``) or a ``pretrain.sample_t`` kind name for the fake phase.
        generator: the ``torch.Generator`` for all randomness (default seed 0).
        callback: ``callback(step, generator_model) -> dict | None`` every ``callback_every`` generator steps
            (and after the last); returned dicts are stored in ``history["metrics"]`` with ``step`` and
            ``seconds`` (wall time excluding the callbacks); returning ``{"stop": True, ...}`` ends training.
        fake_loss_fn: ``fn(fake, x0_detached, generator) -> scalar`` replacing the default
            ``fake_score_loss(fake, x0, generator=g, t_sampler=t_sampler_fake, target=fake_target,
            weighting=fake_weighting)`` (e.g. DMD's denoising + GAN discriminator loss).
        fake_params: parameters of the fake optimiser (default: ``fake``'s; add a discriminator head here).
        fake_warmup: extra online-score updates before the first generator step (fit ``s_psi`` to the initial
            generator when it does not start as a copy of the teacher).
        ema_decay: keep an EMA of the generator (``history["ema"]`` is a ``training.EMA``).
        grad_clip: max global gradient norm for both optimisers.
        cond_sampler: ``(n, generator) -> cond`` for conditional teachers (passed as ``cond=``).
        divergence: ``failures.DivergenceDetector`` on the fake-score loss and the generator's gradient norm
            (True: defaults; a dict of its keywords; None/False: off).

    Failures raise ``failures.TrainingFailure`` (``Diverged`` for the detector), a ``FloatingPointError`` whose
    message names the step, the phase and the loss, with ``err.history`` = the history so far.

    The teacher's parameters are switched to ``requires_grad=False`` (it is never updated); the generator and the
    fake score must not share parameters with it (copy it, as ``TeacherInitGenerator`` does).

    Returns:
        ``{"gen_loss": [...], "fake_loss": [...], "gen_grad_norm": [...], "metrics": [...], "seconds": float,
        "ema": EMA | None}``.
    """
    steps = _positive_int("steps", steps)
    fake_steps = _positive_int("fake_steps", fake_steps)
    fake_warmup = _positive_int("fake_warmup", fake_warmup, allow_zero=True)
    batch_size = _positive_int("batch_size", batch_size)
    callback_every = _positive_int("callback_every", callback_every)
    lr_gen, lr_fake = _positive("lr_gen", lr_gen), _positive("lr_fake", lr_fake)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1) (SIM uses (0.0, 0.999))")
    if grad_clip is not None:
        _positive("grad_clip", grad_clip)
    if not hasattr(generator_model, "sample") or not isinstance(generator_model, nn.Module):
        raise ValueError(f"generator_model must be a dstar_edu generator (an nn.Module with sample(n, generator)), "
                         f"got {type(generator_model).__name__}")
    if not callable(generator_loss_fn):
        raise ValueError(f"generator_loss_fn={generator_loss_fn!r} must be callable")
    for name, s in (("t_sampler_gen", t_sampler_gen), ("t_sampler_fake", t_sampler_fake)):
        if not (callable(s) or (name == "t_sampler_fake" and (s is None or isinstance(s, str)))):
            raise ValueError(f"{name}={s!r} must be a callable (n, generator) -> (n,) times")
    if fake is teacher:
        raise ValueError("fake is the teacher object itself: the online score must be a separate copy "
                         "(e.g. copy.deepcopy(teacher)) or the teacher would be trained")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if ema_decay is not None and not (0 <= ema_decay < 1):
        raise ValueError(f"ema_decay={ema_decay!r} must be in [0, 1) or None")

    gen_params = [p for p in generator_model.parameters() if p.requires_grad]
    if not gen_params:
        raise ValueError("the generator has no trainable parameters")
    fake_params = [p for p in (fake.parameters() if fake_params is None else fake_params) if p.requires_grad]
    if not fake_params:
        raise ValueError("the fake score has no trainable parameters (an exact predictor cannot be trained)")
    opt_gen = torch.optim.Adam(gen_params, lr=lr_gen, betas=tuple(betas))
    opt_fake = torch.optim.Adam(fake_params, lr=lr_fake, betas=tuple(betas))
    ema = EMA(generator_model, ema_decay) if ema_decay is not None else None
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False)

    def cond_for(n):
        return None if cond_sampler is None else cond_sampler(n, generator)

    def fake_update(step: int) -> float:
        with torch.no_grad(), frozen(generator_model):
            x0 = generator_model.sample(batch_size, generator)
        if fake_loss_fn is not None:
            loss = fake_loss_fn(fake, x0.detach(), generator)
        else:
            loss = fake_score_loss(fake, x0, generator=generator, t_sampler=t_sampler_fake, target=fake_target,
                                   weighting=fake_weighting, cond=cond_for(batch_size))
        return _step(opt_fake, fake_params, loss, step, "fake-score", grad_clip, watch)[0]

    fake_update, generator_loss_fn, watch = _guarded(fake_update, generator_loss_fn, fake_loss_fn, divergence)
    hist = {"gen_loss": [], "fake_loss": [], "gen_grad_norm": [], "metrics": [], "seconds": 0.0, "ema": ema}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="distill", leave=False)
    spent, t_start = 0.0, time.perf_counter()
    try:
        fake.train()
        for _ in range(fake_warmup):
            hist["fake_loss"].append(fake_update(-1))
        for step in range(steps):
            for _ in range(fake_steps):
                hist["fake_loss"].append(fake_update(step))
            fake.eval()
            x0 = generator_model.sample(batch_size, generator)
            t = torch.as_tensor(t_sampler_gen(batch_size, generator))
            with frozen(fake):
                loss = generator_loss_fn(x0, teacher, fake, t.to(device=x0.device), generator=generator,
                                         cond=cond_for(batch_size))
            value, norm = _step(opt_gen, gen_params, loss, step, "generator", grad_clip, watch)
            fake.train()
            if ema is not None:
                ema.update()
            hist["gen_loss"].append(value)
            hist["gen_grad_norm"].append(norm)
            if bar is not None:
                bar.update(1)
                if step % 25 == 0:
                    bar.set_postfix(gen=f"{value:.3g}", fake=f"{hist['fake_loss'][-1]:.3g}")
            if callback is not None and ((step + 1) % callback_every == 0 or step == steps - 1):
                spent += time.perf_counter() - t_start
                out = callback(step + 1, generator_model)
                t_start = time.perf_counter()
                if out is not None:
                    rec = {"step": step + 1, "seconds": spent, **out}
                    hist["metrics"].append(rec)
                    if rec.get("stop"):
                        break
    except TrainingFailure as err:
        err.history = hist
        raise
    finally:
        if bar is not None:
            bar.close()
        fake.eval()
    hist["seconds"] = spent + (time.perf_counter() - t_start)
    return hist
