"""Failures that say where: step, phase, loss and the history so far; and a divergence detector.

Used by both loops (``training.train`` / ``training_steps`` and ``distillation.distill``):

* ``TrainingFailure`` (a ``FloatingPointError``) is what a loop raises when a loss or a gradient norm is
  NaN/inf, or when a library loss raises on its own (e.g. ``objectives.common.reduce_loss`` finding a NaN).
  Its message names the step, the phase and the loss; ``err.history`` holds the curves collected up to
  the failure (``train``: ``{"loss": [...]}``; ``distill``: its usual history dict), so the learning
  curve up to the failure can still be plotted.
* ``Diverged`` (a ``TrainingFailure``) is raised by ``DivergenceDetector``.

Divergence rule (``DivergenceDetector``). For a positive monitored quantity ``v_k`` (a training loss, the
fake-score loss or the generator's gradient norm), keep ``m_k``, an exponential moving average of
``log v_k`` with decay 0.98 (memory ~50 observations), and ``r_k = min_{warmup <= j <= k} m_j``, the lowest
*smoothed* level reached after a warm-up. The run has diverged at step ``k`` when
``log v_k - r_k > log(factor)`` for ``patience`` consecutive observations (defaults: factor 1e3,
patience 5, warmup 20).

Why it should not fire on a healthy run: the bar is the lowest smoothed level, not the lowest single value,
so one lucky minibatch cannot lower it; minibatch losses of the library's objectives fluctuate by a factor of
a few around their smoothed level (heavy-tailed small-sigma batches: up to ~30x), three orders of magnitude
below 1e3, and an isolated spike must also persist for 5 consecutive observations. Slow legitimate drifts
(a loss rising 10x when a learning-rate warm-up ends) stay far below the factor. What it cannot tell apart:
a loss that is *meant* to grow 1000x (a curriculum that scales the weights); pass ``divergence=None`` then.
A diverging distillation's samples grow without bound, and the fake-score denoising loss grows like
their squared scale, so watching it (and the generator's gradient norm) watches the sample scale.
"""
from __future__ import annotations

import functools
import math

from .validation import check_int, check_real

__all__ = ["TrainingFailure", "Diverged", "DivergenceDetector", "loss_name", "make_detector"]


class TrainingFailure(FloatingPointError):
    """A training/distillation run stopped: ``step``, ``phase``, ``loss`` (its name) and ``history`` say where."""

    def __init__(self, message: str, *, step=None, phase=None, loss=None, history=None):
        super().__init__(message)
        self.step, self.phase, self.loss, self.history = step, phase, loss, history


class Diverged(TrainingFailure):
    """The monitored quantity exploded against its running statistics (see the module docstring)."""


def loss_name(fn) -> str:
    """A readable name of a loss callable (unwrapping ``functools.partial``)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


class DivergenceDetector:
    """``observe(step, value)`` raises ``Diverged`` when ``value`` explodes (rule in the module docstring)."""

    def __init__(self, what: str = "loss", *, factor: float = 1e3, patience: int = 5, warmup: int = 20,
                 decay: float = 0.98):
        check_real("factor", factor, 1, lo_open=True)
        for name, v in (("patience", patience), ("warmup", warmup)):
            check_int(name, v, lo=1 if name == "patience" else 0)
        check_real("decay", decay, 0, 1, lo_open=True, hi_open=True)
        self.what, self.factor, self.patience, self.warmup, self.decay = what, float(factor), patience, warmup, decay
        self.n, self.ema, self.floor, self.run = 0, None, math.inf, 0
        self.first_bad = None

    def observe(self, step: int, value: float, phase: str = "training") -> None:
        if not (math.isfinite(value) and value > 0):       # NaN/inf are the loops' own checks; <= 0 carries no scale
            return
        lv = math.log(value)
        self.ema = lv if self.ema is None else self.decay * self.ema + (1 - self.decay) * lv
        self.n += 1
        if self.n <= self.warmup:
            return
        if lv - self.floor > math.log(self.factor):
            self.run += 1
            self.first_bad = step if self.run == 1 else self.first_bad
            if self.run >= self.patience:
                raise Diverged(
                    f"diverged: {phase} {self.what} is {value:.4g} at step {step}, more than {self.factor:g}x its "
                    f"lowest running level {math.exp(self.floor):.4g} for {self.run} consecutive steps (since step "
                    f"{self.first_bad}); lower the learning rate or check the loss", step=step, phase=phase)
        else:
            self.run = 0
        self.floor = min(self.floor, self.ema)


def make_detector(divergence, what: str) -> DivergenceDetector | None:
    """``divergence``: None/False (off), True (defaults) or a dict of ``DivergenceDetector`` keywords."""
    if divergence is None or divergence is False:
        return None
    if divergence is True:
        return DivergenceDetector(what)
    if isinstance(divergence, dict):
        return DivergenceDetector(what, **divergence)
    raise ValueError(f"divergence={divergence!r} must be True, False/None or a dict of DivergenceDetector keywords "
                     "(factor, patience, warmup, decay)")
