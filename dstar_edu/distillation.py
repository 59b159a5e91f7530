"""The one alternating loop of score distillation (SIM Alg. 1-2, Diff-Instruct Alg. 1, FGM Alg. 1, DMD).

Each iteration: ``fake_steps`` updates of the online ("fake") score on *detached* generator samples (the
denoising loss of ``objectives.distill.fake_score_loss``, or a custom ``fake_loss_fn``), then one generator
update with ``generator_loss_fn`` (SIM, SiD, DI, VSD, DMD, FGM, ... from ``objectives.distill``). Both use
Adam with the seeds' betas ``(0, 0.999)`` by default (SIM Table 5, Diff-Instruct). Which method runs is
decided only by ``generator_loss_fn``; this loop is the same for a 2D MLP and a diffusers UNet.

Stops with ``failures.TrainingFailure`` (a ``FloatingPointError``) naming the step, the phase and the loss
when a loss or a gradient norm is NaN/inf, before the optimiser touches the weights, and with
``failures.Diverged`` when the divergence detector sees the fake-score loss or the generator's gradient norm
explode; ``err.history`` holds the curves up to the failure.
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
from .validation import check_int, check_positive

Tensor = torch.Tensor

__all__ = ["distill", "alternate", "guarded_update", "NonFiniteError"]


def _positive_int(name: str, v, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    return check_int(name, v, lo=lo)


def _positive(name: str, v) -> float:
    return float(check_positive(name, v))


class NonFiniteError(TrainingFailure):
    """A loss or a gradient norm is NaN/inf: the update stopped before the optimiser step."""


def guarded_update(loss_fn: Callable[[], tuple[Tensor, dict]], optimizer, params: list, *, step: int, phase: str,
                   grad_clip: float | None = None, update: bool = True, zero_grad_first: bool = False,
                   backward: Callable | None = None, clip_grad_norm: Callable | None = None,
                   bad_anywhere: Callable[[bool], bool] | None = None) -> tuple[float, float, dict]:
    """One NaN-guarded (micro-)update, the only one in the package: ``loss, extra = loss_fn()``, backward,
    and when ``update``: the gradient norm (clipped to ``grad_clip``), the optimiser step and ``zero_grad``.

    A non-finite loss (or the library's own ``FloatingPointError`` from inside ``loss_fn``) or gradient norm
    raises :class:`NonFiniteError` naming ``phase`` and ``step`` *before* the optimiser touches the weights.
    The hooks make it the distributed step too: ``backward(loss)`` (``accelerator.backward``),
    ``clip_grad_norm(params, max_norm)``, ``bad_anywhere(bad) -> bool`` (an all-reduced flag, so every rank
    raises together). Returns ``(loss value, gradient norm or nan, extra)``.
    """
    bad_anywhere = bad_anywhere or (lambda bad: bad)
    loss, extra, cause = None, {}, None
    try:
        loss, extra = loss_fn()
    except FloatingPointError as e:          # the library's losses raise on NaN/inf: add the step and the phase
        cause = e
    if loss is not None and (not isinstance(loss, Tensor) or loss.numel() != 1):
        raise ValueError(f"the {phase} loss must be a scalar tensor, got {type(loss).__name__}"
                         f"{'' if not isinstance(loss, Tensor) else ' ' + str(tuple(loss.shape))}")
    value = float(loss.detach().float()) if loss is not None else float("nan")
    _check(bad_anywhere, value, f"{phase} loss", step, cause, phase=phase)
    if zero_grad_first:
        optimizer.zero_grad(set_to_none=True)
    (backward or Tensor.backward)(loss)
    norm = float("nan")
    if update:
        max_norm = grad_clip if grad_clip else math.inf
        norm = float((clip_grad_norm or torch.nn.utils.clip_grad_norm_)(params, max_norm))
        _check(bad_anywhere, norm, f"{phase} gradient norm", step, None, f" (loss {value:.4g})", phase=phase)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return value, norm, extra


def _check(bad_anywhere, value: float, what: str, step: int, cause, detail: str = "", phase=None) -> None:
    bad = not math.isfinite(value)
    if bad_anywhere(bad):
        where = f"{value}" if bad else "finite here, not finite on another process"
        because = f" ({cause})" if cause is not None else ""
        raise NonFiniteError(f"{what} is {where} at step {step}{detail}{because}: stopped before the optimiser step "
                             "(lower the learning rate, check the time range, bf16 vs fp16, the networks' outputs)",
                             step=step, phase=phase) from cause


def alternate(steps, fake_update: Callable[[int, int], dict], generator_update: Callable[[int], dict], *,
              fake_steps: int = 1, after_step: Callable[[int, dict], bool | None] | None = None) -> list[dict]:
    """The alternating loop of score distillation (SIM Alg. 1, Diff-Instruct Alg. 1, DI* Alg. 1), written once:
    for each ``step`` of ``steps`` (an iterable of step numbers), ``fake_steps`` online-score updates
    ``fake_update(step, r)`` then one ``generator_update(step)``; each returns ``{name: float}``. The fake
    values are averaged over the ``fake_steps`` updates. ``after_step(step, record)`` (EMA, logging,
    checkpoints, callbacks) returns True to stop. Returns the records ``{"step": step, **values}``.
    """
    records = []
    for step in steps:
        rec: dict = {}
        for r in range(fake_steps):
            for k, v in fake_update(step, r).items():
                rec[k] = rec.get(k, 0.0) + v / fake_steps
        rec.update(generator_update(step))
        stop = after_step is not None and after_step(step, rec)     # may add entries (timings) to the record
        records.append({"step": step, **rec})
        if stop:
            break
    return records


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
            ``p_edm(process)``) or a ``times.sample_t`` kind name for the fake phase.
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

    names = {"fake-score": loss_name(fake_loss_fn) if fake_loss_fn is not None else "fake_score_loss",
             "generator": loss_name(generator_loss_fn)}
    detectors = {"fake-score": make_detector(divergence, "loss"),
                 "generator": make_detector(divergence, "gradient norm")}

    def named(err: FloatingPointError, step: int, phase: str) -> TrainingFailure:
        """The failure with the step, the phase and the loss's name (``failures``)."""
        if isinstance(err, TrainingFailure):
            err.step = err.step if err.step is not None else step
            err.phase, err.loss = err.phase or phase, err.loss or names[phase]
            if not str(err).startswith("distillation step"):
                err.args = (f"distillation step {err.step}, phase {err.phase!r} (loss {err.loss}): {err.args[0]}",)
            return err
        return TrainingFailure(f"distillation step {step}, phase {phase!r} (loss {names[phase]}): {err}",
                               step=step, phase=phase, loss=names[phase])

    def watched(step: int, phase: str, value: float) -> None:
        if detectors[phase] is not None:
            detectors[phase].observe(step, value, phase)

    def fake_update(step: int, _r: int = 0) -> dict:
        def loss_fn():
            with torch.no_grad():      # no graph: nothing to freeze (no requires_grad toggling: FSDP-safe)
                x0 = generator_model.sample(batch_size, generator)
            if fake_loss_fn is not None:
                return fake_loss_fn(fake, x0.detach(), generator), {}
            return fake_score_loss(fake, x0, generator=generator, t_sampler=t_sampler_fake, target=fake_target,
                                   weighting=fake_weighting, cond=cond_for(batch_size)), {}
        try:
            value = guarded_update(loss_fn, opt_fake, fake_params, step=step, phase="fake-score",
                                   grad_clip=grad_clip, zero_grad_first=True)[0]
            watched(step, "fake-score", value)
        except FloatingPointError as err:
            raise named(err, step, "fake-score") from (None if isinstance(err, TrainingFailure) else err)
        hist["fake_loss"].append(value)
        return {"fake_loss": value}

    def generator_update(step: int) -> dict:
        def loss_fn():
            x0 = generator_model.sample(batch_size, generator)
            t = torch.as_tensor(t_sampler_gen(batch_size, generator))
            return generator_loss_fn(x0, teacher, fake, t.to(device=x0.device), generator=generator,
                                     cond=cond_for(batch_size)), {}
        fake.eval()
        try:   # frozen through forward and backward (a checkpointed fake recomputes with the same flags)
            with frozen(fake):
                value, norm, _ = guarded_update(loss_fn, opt_gen, gen_params, step=step, phase="generator",
                                                grad_clip=grad_clip, zero_grad_first=True)
            watched(step, "generator", norm)
        except FloatingPointError as err:
            raise named(err, step, "generator") from (None if isinstance(err, TrainingFailure) else err)
        finally:
            fake.train()
        return {"gen_loss": value, "gen_grad_norm": norm}

    hist = {"gen_loss": [], "fake_loss": [], "gen_grad_norm": [], "metrics": [], "seconds": 0.0, "ema": ema}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="distill", leave=False)
    clock = {"spent": 0.0, "start": time.perf_counter()}

    def after_step(step: int, rec: dict) -> bool:
        if ema is not None:
            ema.update()
        hist["gen_loss"].append(rec["gen_loss"])
        hist["gen_grad_norm"].append(rec["gen_grad_norm"])
        if bar is not None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(gen=f"{rec['gen_loss']:.3g}", fake=f"{hist['fake_loss'][-1]:.3g}")
        if callback is not None and ((step + 1) % callback_every == 0 or step == steps - 1):
            clock["spent"] += time.perf_counter() - clock["start"]
            out = callback(step + 1, generator_model)
            clock["start"] = time.perf_counter()
            if out is not None:
                m = {"step": step + 1, "seconds": clock["spent"], **out}
                hist["metrics"].append(m)
                return bool(m.get("stop"))
        return False

    try:
        fake.train()
        for _ in range(fake_warmup):
            fake_update(-1)
        alternate(range(steps), fake_update, generator_update, fake_steps=fake_steps, after_step=after_step)
    except TrainingFailure as err:
        err.history = hist
        raise
    finally:
        if bar is not None:
            bar.close()
        fake.eval()
    spent, t_start = clock["spent"], clock["start"]
    hist["seconds"] = spent + (time.perf_counter() - t_start)
    return hist
