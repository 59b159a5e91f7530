"""A small, generic training loop (the one place a loop is written; losses live in ``dstar_edu.objectives``).

``train(loss_fn, model, steps, lr)`` runs Adam(W) on ``loss_fn(step, generator)``, optionally updates an
``EMA`` copy, shows a tqdm bar and returns the loss curve. It stops with ``FloatingPointError`` naming
the step when the loss or the gradient norm is NaN/inf, before the optimiser touches the weights (so
no broken state is written). ``training_steps`` is the same loop as a Python generator that yields a
record per step, for notebooks that want to inspect or plot while training.

``train_2d`` is the notebook convenience: a 2D data set (name, sampler or exact mixture), a process,
a prediction and an objective in, ``(model, losses)`` out.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .failures import Diverged, TrainingFailure, loss_name, make_detector
from .process import Process, make_process
from .validation import check_choice, check_int, check_positive, check_probability, check_type

Tensor = torch.Tensor

__all__ = ["EMA", "StepRecord", "training_steps", "train", "train_2d", "OBJECTIVES_2D", "data_sampler", "cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int | None = 1):
    """Temporarily set torch's intra-op CPU threads (restored on exit); ``None`` leaves them alone.

    2D models are so small that intra-op threading only adds overhead, and on a shared or busy
    machine it can make each step ten times slower (measured: 17 ms vs 1 ms per step of a 64-wide MLP
    with batch 256 on 2 loaded cores), so the 2D helpers and checks run single-threaded.
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer number of threads (or None)")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class EMA:
    """Exponential moving average of a model's parameters: ``theta- <- decay theta- + (1 - decay) theta``.

    ``ema.model`` is a frozen deep copy (the consistency-model target ``theta-`` of handbook Eq. 20/25, or
    the EMA weights used for sampling); buffers are copied as they are. With ``warmup=True`` the k-th
    update (k = 0, 1, ...) uses ``min(decay, (1 + k) / (10 + k))``, so early averages do not stay anchored
    at the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        check_type("model", model, nn.Module, "an nn.Module (the model EMA averages)")
        check_probability("decay", decay)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.source = model
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for p_ema, p in zip(self.model.parameters(), self.source.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), self.source.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, warmup={self.warmup}, updates={self.num_updates})"


@dataclass
class StepRecord:
    """What ``training_steps`` yields after each optimiser step."""
    step: int
    loss: float
    grad_norm: float
    lr: float


def _params(params_or_model) -> list[nn.Parameter]:
    if isinstance(params_or_model, nn.Module):
        params = [p for p in params_or_model.parameters() if p.requires_grad]
    elif isinstance(params_or_model, Iterable):
        params = list(params_or_model)
    else:
        raise ValueError(f"params_or_model must be an nn.Module or an iterable of parameters, "
                         f"got {type(params_or_model).__name__}")
    if not params:
        raise ValueError("there are no trainable parameters (none with requires_grad=True)")
    return params


def training_steps(loss_fn: Callable[[int, torch.Generator], Tensor], params_or_model, steps: int, lr: float = 1e-3,
                   *, generator: torch.Generator | None = None, optimizer: str = "adam", betas=(0.9, 0.999),
                   weight_decay: float = 0.0, grad_clip: float | None = None, ema: EMA | None = None,
                   lr_schedule: str = "constant", warmup: int = 0, divergence=True) -> Iterator[StepRecord]:
    """The training loop as a generator: one ``StepRecord`` per optimiser step.

    ``loss_fn(step, generator)`` returns a scalar loss whose randomness comes from ``generator``.
    ``optimizer``: ``"adam"`` or ``"adamw"``; ``lr_schedule``: ``"constant"`` or ``"cosine"`` (to 0 at
    ``steps``), after ``warmup`` linear warm-up steps; ``grad_clip``: max global gradient norm.
    ``divergence``: the ``failures.DivergenceDetector`` on the loss (True: defaults; a dict of its keywords;
    None/False: off). Failures raise ``failures.TrainingFailure`` (a ``FloatingPointError``) naming the step,
    the phase and the loss.
    """
    check_int("steps", steps, lo=1)
    lr = check_positive("lr", lr)
    check_choice("optimizer", optimizer, ("adam", "adamw"))
    check_choice("lr_schedule", lr_schedule, ("constant", "cosine"))
    if grad_clip is not None:
        check_positive("grad_clip", grad_clip, finite=False)
    check_type("ema", ema, (EMA, None), "a dstar_edu.training.EMA or None")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1) (Adam's (beta1, beta2))")
    check_int("warmup", warmup, lo=0)
    params = _params(params_or_model)
    detector = make_detector(divergence, "loss")
    name = loss_name(loss_fn)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    opt = opt_cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)

    def lr_at(k: int) -> float:
        f = min(1.0, (k + 1) / warmup) if warmup else 1.0
        if lr_schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * k / steps))
        return lr * f

    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        opt.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(k, generator)
        except TrainingFailure:
            raise
        except FloatingPointError as err:            # a library loss met a NaN first: say where
            raise TrainingFailure(f"training step {k} (phase 'loss', loss_fn {name}): {err}", step=k, phase="loss",
                                  loss=name) from err
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                             f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingFailure(f"loss is {value} at step {k} (phase 'loss', loss_fn {name}): training stopped "
                                  "before the update (lower lr, check the data and the time range)", step=k,
                                  phase="loss", loss=name)
        if detector is not None:
            try:
                detector.observe(k, value, "training")
            except Diverged as err:
                err.loss = name
                raise
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf))
        if not math.isfinite(norm):
            raise TrainingFailure(f"gradient norm is {norm} at step {k} (phase 'backward', loss_fn {name}, loss "
                                  f"{value:.4g}): training stopped before the update", step=k, phase="backward",
                                  loss=name)
        opt.step()
        if ema is not None:
            ema.update()
        yield StepRecord(k, value, norm, lr_at(k))


def train(loss_fn: Callable[[int, torch.Generator], Tensor], params_or_model, steps: int, lr: float = 1e-3, *,
          generator: torch.Generator | None = None, progress: bool = True, callback=None, ema: EMA | None = None,
          desc: str = "training", **options) -> list[float]:
    """Run ``training_steps`` to the end and return the loss curve (one float per step).

    ``callback(record)`` is called after every step; returning ``True`` stops training early (e.g. a
    time-to-quality benchmark). ``progress`` shows a tqdm bar with the running loss. Other keywords
    (``optimizer``, ``betas``, ``weight_decay``, ``grad_clip``, ``lr_schedule``, ``warmup``) go to
    ``training_steps`` (``divergence=`` too). Raises ``failures.TrainingFailure`` (a ``FloatingPointError``)
    naming the step, phase and loss on a NaN/inf loss or gradient, ``failures.Diverged`` when the loss
    explodes; either carries ``err.history = {"loss": [...]}``, the curve up to the failure.
    """
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc, leave=False)
    try:
        for rec in training_steps(loss_fn, params_or_model, steps, lr, generator=generator, ema=ema, **options):
            losses.append(rec.loss)
            if bar is not None:
                bar.update(1)
                if rec.step % 25 == 0 or rec.step == steps - 1:
                    window = losses[-50:]
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4g}")
            if callback is not None and callback(rec) is True:
                break
    except TrainingFailure as err:
        err.history = {"loss": list(losses)}
        raise
    finally:
        if bar is not None:
            bar.close()
    return losses


# ---- 2D convenience -----------------------------------------------------------------------------------------
def data_sampler(data) -> Callable[[int, torch.Generator], Tensor]:
    """``(n, generator) -> (n, dim)`` float samples from a dataset name, a sampler or an exact mixture."""
    if isinstance(data, str):
        from toy_data.datasets2d import DATASETS
        check_choice("data", data, sorted(DATASETS),
                     also="a sampler (n, generator) -> tensor, or an object with .sample(n, generator=...)")
        fn = DATASETS[data]
        return lambda n, g: fn(n, generator=g)
    if hasattr(data, "sample"):
        return lambda n, g: data.sample(n, generator=g)
    if callable(data):
        return lambda n, g: data(n, g)
    raise ValueError(f"data={data!r} must be a dataset name, a sampler (n, generator) -> tensor, or have .sample")


OBJECTIVES_2D = ("denoising", "flow_matching", "trigflow")


def train_2d(data, process: Process | str = "rectified_flow", prediction: str = "velocity", *,
             objective: str | Callable = "denoising", steps: int = 2000, batch_size: int = 256, lr: float = 2e-3,
             hidden: int = 128, depth: int = 3, seed: int = 0, progress: bool = True, callback=None,
             dtype: torch.dtype = torch.float32, lr_schedule: str = "cosine", threads: int | None = 1, **loss_kw):
    """Train a small ``MLPPredictor`` on 2D data in a few seconds; returns ``(model, losses)``.

    ``data``: a dataset name of ``toy_data.datasets2d`` (``"eight_gaussians"``, ``"checkerboard"``, ...),
    a sampler ``(n, generator) -> (n, 2)`` or an exact mixture. ``process``: a Process or a name for
    ``make_process``. ``objective``: ``"denoising"`` (``denoising_loss``; pass e.g. ``target=``,
    ``weighting=``, ``t_sampler=`` as keywords), ``"flow_matching"`` (``flow_matching_loss``, rectified flow,
    ``sigma_min=``), ``"trigflow"`` (``trigflow_diffusion_loss``) or a callable
    ``objective(model, x0, generator) -> loss``. The model is returned in ``eval()`` mode.
    ``threads``: intra-op CPU threads while training (default 1, see ``cpu_threads``; None: unchanged).
    """
    from .objectives import denoising_loss, flow_matching_loss, trigflow_diffusion_loss
    from .predictors import MLPPredictor
    if isinstance(process, str):
        process = make_process(process)
    check_type("process", process, Process, "a Process or a process name")
    check_int("batch_size", batch_size, lo=1)
    sample = data_sampler(data)
    gen = torch.Generator().manual_seed(seed)
    dim = sample(2, torch.Generator().manual_seed(seed + 1)).shape[1]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        model = MLPPredictor(process, prediction, dim=dim, hidden=hidden, depth=depth).to(dtype)
    if callable(objective):
        obj = objective
    elif objective == "denoising":
        def obj(m, x0, g):
            return denoising_loss(m, x0, generator=g, **loss_kw)
    elif objective == "flow_matching":
        def obj(m, x0, g):
            return flow_matching_loss(m, x0, generator=g, **loss_kw)
    elif objective == "trigflow":
        def obj(m, x0, g):
            return trigflow_diffusion_loss(m, x0, generator=g, **loss_kw)
    else:
        check_choice("objective", objective, OBJECTIVES_2D, also="a callable objective(model, x0, generator) -> loss")
    if callable(objective) and loss_kw:
        raise ValueError(f"keywords {sorted(loss_kw)} are for the named objectives; bind them in your callable")

    def loss_fn(step, g):
        x0 = sample(batch_size, g).to(dtype)
        return obj(model, x0, g)

    model.train()
    desc = f"train_2d {objective if isinstance(objective, str) else 'custom'}"
    with cpu_threads(threads):
        losses = train(loss_fn, model, steps, lr, generator=gen, progress=progress, callback=callback,
                       lr_schedule=lr_schedule, desc=desc)
    model.eval()
    return model, losses
