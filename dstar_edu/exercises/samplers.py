"""Outcome-graded sampler loops: write the whole DDIM (handbook Eq. 14) or rectified-flow Euler (Sec. 2.4.2) loop.

The data of every trial is a random Gaussian ``N(mu, s^2 I)`` (2D points or 3x32x32 images; the first trial a near
point mass, s^2 = 1e-10, for which both loops are exact, on 10-50 steps; the Gaussians on 100 or 250 steps, where
the first-order error is a few percent of the spread), whose PF-ODE flow map is known in closed form
(``samplers.consistency.GaussianFlowMap``). The student's loop is run from the same
``x_T`` on the same grid as the library sampler; it passes when its end points are at least as close to the exact
flow map as the library's first-order loop (within 1.5x of its discretisation error, which is itself
``O(1/steps)``), so any correct first-order loop passes and a wrong update cannot. Feedback names the property
that fails: how many model calls, at which times, the spread of the samples, the distance to the exact answer.
"""
from __future__ import annotations

import torch

from ..process import DDPM, RectifiedFlow
from .core import Exercise, OutcomeTrial, register

Tensor = torch.Tensor
F64 = torch.float64
#: a correct first-order loop lands within this factor of the library loop's own distance to the exact flow map
SLACK = 1.5


#: trial i uses (dim, batch, point data?): a near point mass first -- DDIM and rectified-flow Euler are exact
#: for a single data point (x0_hat is then exact at every step), so any correct loop lands on it to ~1e-9 and
#: every wrong or truncated loop misses -- then Gaussians of variance 0.05..0.3, where the first-order
#: discretisation error is the yardstick
TRIALS = ((2, 64, True), (3 * 32 * 32, 4, False), (2, 256, False))
_COVERS = "a single data point and Gaussian data, 2D points and 3x32x32 images"


def _gaussian(process, dim: int, g: torch.Generator, point: bool):
    from toy_data.mixtures import GaussianMixture
    mu = torch.randn(1, dim, generator=g, dtype=F64)
    var = 1e-10 if point else float(0.05 + 0.25 * torch.rand((), generator=g, dtype=F64))
    return GaussianMixture(mu, var, process=process)


class _Recorder:
    """A model callable that records the times it is called at."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t):
        self.times.append(float(torch.as_tensor(t)))
        return self.fn(x, torch.as_tensor(t, dtype=F64))


def _judge(got: Tensor, exact: Tensor, ref: Tensor, grid: Tensor, rec: _Recorder, what: str) -> str | None:
    scale = exact.abs().max().item()
    err, ref_err = (got - exact).abs().max().item(), (ref - exact).abs().max().item()
    if err <= SLACK * ref_err + 1e-9 * scale:
        return None
    n_steps = grid.numel() - 1
    calls = rec.times
    parts = [f"your end points are {err:.3g} away from the exact flow map (max over entries); a correct {what} "
             f"on this {n_steps}-step grid is {ref_err:.3g} away."]
    if len(calls) != n_steps:
        parts.append(f"Your loop called the model {len(calls)} times; a {n_steps}-step grid needs one call per step.")
    elif any(abs(a - b) > 1e-9 for a, b in zip(calls, grid[:-1].tolist())):
        parts.append(f"Your loop called the model at t = {[round(c, 4) for c in calls[:5]]}..., the grid's step "
                     f"starts are {[round(c, 4) for c in grid[:5].tolist()]}...")
    spread_got, spread_exact = got.std(0).mean().item(), exact.std(0).mean().item()
    if abs(spread_got / spread_exact - 1) > 0.05:
        parts.append(f"The spread of your samples is {spread_got / spread_exact:.3g} times the exact one "
                     "(a scale property: a coefficient of the update is off).")
    mean_off = (got.mean(0) - exact.mean(0)).abs().max().item()
    if mean_off > 0.05 * max(1.0, exact.mean(0).abs().max().item()):
        parts.append(f"The mean of your samples is off by {mean_off:.3g} (a shift: the data part of the update "
                     "is off).")
    return " ".join(parts)


def _ddim_trial(trial: int, g: torch.Generator) -> OutcomeTrial:
    from ..samplers.consistency import GaussianFlowMap
    from ..samplers.diffusion import ddim
    process = DDPM(1000)
    dim, n, point = TRIALS[trial % len(TRIALS)]
    gauss = _gaussian(process, dim, g, point)
    n_steps = ((10, 25, 50) if point else (100, 250))[int(torch.randint(0, 3 if point else 2, (), generator=g))]
    grid = torch.linspace(1000, 0, n_steps + 1, dtype=F64).round()
    x_T = torch.randn(n, dim, generator=g, dtype=F64)
    exact = GaussianFlowMap(gauss, t_end=0.0).flow(x_T, 1000.0, 0.0)
    ref = ddim(gauss, grid, x_T)
    rec = _Recorder(lambda x, t: gauss.predict("eps", x, t))
    inputs = {"x_T": x_T, "timesteps": grid, "eps_model": rec, "alpha_bar": lambda t: process.alpha_bar(t)}

    def judge(got):
        try:
            return _judge(got, exact, ref, grid, rec, "DDIM loop")
        finally:
            rec.times.clear()
    label = (f"{'2D points' if dim == 2 else '3x32x32 images (flattened)'}, batch {n}, {n_steps} DDIM steps, "
             f"{'a single data point' if point else 'Gaussian data'}")
    return OutcomeTrial(label, inputs, judge)


def _rf_trial(trial: int, g: torch.Generator) -> OutcomeTrial:
    from ..samplers.consistency import GaussianFlowMap
    from ..samplers.flow import rectified_flow_euler
    process = RectifiedFlow()
    dim, n, point = TRIALS[trial % len(TRIALS)]
    gauss = _gaussian(process, dim, g, point)
    n_steps = ((10, 25, 50) if point else (100, 250))[int(torch.randint(0, 3 if point else 2, (), generator=g))]
    grid = torch.linspace(1, 0, n_steps + 1, dtype=F64)
    x_1 = torch.randn(n, dim, generator=g, dtype=F64)
    exact = GaussianFlowMap(gauss, t_end=0.0).flow(x_1, 1.0, 0.0)
    ref = rectified_flow_euler(gauss, grid, x_1)
    rec = _Recorder(lambda x, t: gauss.predict("velocity", x, t))
    inputs = {"x_1": x_1, "timesteps": grid, "velocity_model": rec}

    def judge(got):
        try:
            return _judge(got, exact, ref, grid, rec, "Euler loop")
        finally:
            rec.times.clear()
    label = (f"{'2D points' if dim == 2 else '3x32x32 images (flattened)'}, batch {n}, {n_steps} Euler steps, "
             f"{'a single data point' if point else 'Gaussian data'}")
    return OutcomeTrial(label, inputs, judge)


# ---- catalogued mistakes (whole loops written wrong) ---------------------------------------------------------
def _ddim_loop(x_T, timesteps, eps_model, alpha_bar, *, sign=1.0, prev_from_t=False, stop_early=False):
    x = x_T
    pairs = list(zip(timesteps[:-1], timesteps[1:]))
    for i, (t, t_prev) in enumerate(pairs):
        ab, ab_prev = alpha_bar(t), alpha_bar(t if prev_from_t else t_prev)
        eps = eps_model(x, t)
        x0 = (x - sign * torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
        if stop_early and i == len(pairs) - 1:
            return x
        x = torch.sqrt(ab_prev) * x0 + torch.sqrt(1 - ab_prev) * eps
    return x


def _ddim_ddpm_mean(x_T, timesteps, eps_model, alpha_bar):
    x = x_T
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        ab, ab_prev = alpha_bar(t), alpha_bar(t_prev)
        eps = eps_model(x, t)
        x0 = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
        a = ab / ab_prev
        x = (torch.sqrt(ab_prev) * (1 - a) * x0 + torch.sqrt(a) * (1 - ab_prev) * x) / (1 - ab)
    return x


def _rf_loop(x_1, timesteps, velocity_model, *, sign=1.0, frozen=False):
    x, v = x_1, None
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        v = velocity_model(x, t) if v is None or not frozen else v
        x = x + sign * (t_next - t) * v
    return x


register(Exercise(
    name="ddim_sampler", area="samplers", source="handbook Eq. 14 with Eq. 7 (DDIM, eta = 0)",
    guards=("dstar_edu.samplers.diffusion:ddim", "dstar_edu.samplers.diffusion:ddim_step",
            "dstar_edu.samplers.diffusion:_ddim_update", "dstar_edu.samplers.diffusion:ddim_update",
            "dstar_edu.samplers.consistency:GaussianFlowMap.flow",
            "dstar_edu.samplers.common:run_loop"),
    prompt=("Write the deterministic DDIM sampler (handbook Eq. 14 with eta = 0): start from x_T and walk down the "
            "decreasing integer grid `timesteps` (it starts at T = 1000 and ends at 0, where alpha_bar = 1). At each "
            "step (t -> t_prev) call eps_model(x, t) once, estimate the clean sample with Tweedie's formula (Eq. 7) "
            "and move to t_prev keeping the same noise estimate. Return the end point x_0 (same shape as x_T)."),
    args=(("x_T", "start points, shape (batch, dim), float64"),
          ("timesteps", "1-d float64 tensor of integer times, decreasing from 1000 to 0"),
          ("eps_model", "eps_model(x, t) -> predicted noise, same shape as x (t a 0-d tensor)"),
          ("alpha_bar", "alpha_bar(t) -> 0-d tensor, the DDPM alpha_bar_t")),
    returns="the DDIM end point after len(timesteps) - 1 steps",
    reference=lambda x_T, timesteps, eps_model, alpha_bar: _ddim_loop(x_T, timesteps, eps_model, alpha_bar),
    hint=("one step: x0_hat = (x - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t), then x_prev = sqrt(ab_prev) x0_hat + "
          "sqrt(1 - ab_prev) eps_hat; loop over consecutive pairs of the grid."),
    hints=("zip(timesteps[:-1], timesteps[1:]) gives the (t, t_prev) pairs; the last pair ends at t_prev = 0.",),
    draw=_ddim_trial, graded_by="outcome", n_trials=3, covers=_COVERS,
    grading=(f"run from the same x_T on the same grid, your end points must be within {SLACK}x the library DDIM "
             "loop's distance to the exact PF-ODE flow map of the Gaussian data (closed form)."),
    return_note="a tensor shaped like x_T",
    mistakes=(
        (lambda x_T, ts, m, ab: _ddim_loop(x_T, ts, m, ab, sign=-1.0),
         "the noise is subtracted from x when estimating x0 (Eq. 7): "
         "x0_hat = (x - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)."),
        (lambda x_T, ts, m, ab: _ddim_loop(x_T, ts, m, ab, prev_from_t=True),
         "your update uses alpha_bar at t instead of at t_prev, so x never moves to the next time."),
        (lambda x_T, ts, m, ab: _ddim_loop(x_T, ts, m, ab, stop_early=True),
         "you return before the last step (to t = 0): the loop must visit every pair of the grid."),
        (_ddim_ddpm_mean,
         "this is the DDPM posterior mean (Eq. 8) without noise, not the DDIM step: DDIM re-uses eps_hat at t_prev."),
    )))

register(Exercise(
    name="rf_euler_sampler", area="samplers", source="handbook Sec. 2.4.2 (rectified flow, Euler)",
    guards=("dstar_edu.samplers.flow:rectified_flow_euler", "dstar_edu.samplers.flow:rectified_flow_euler_step",
            "dstar_edu.samplers.consistency:GaussianFlowMap.flow", "dstar_edu.samplers.common:run_loop"),
    prompt=("Write the Euler sampler of a rectified flow (handbook Sec. 2.4.2): x_t = (1 - t) x0 + t eps moves "
            "with velocity dx_t/dt = velocity_model(x, t). Start from noise x_1 at t = 1 and take one Euler step "
            "per pair of the decreasing grid `timesteps` (from 1 to 0). Return the end point (same shape as x_1)."),
    args=(("x_1", "start points (noise), shape (batch, dim), float64"),
          ("timesteps", "1-d float64 tensor decreasing from 1 to 0"),
          ("velocity_model", "velocity_model(x, t) -> dx_t/dt, same shape as x (t a 0-d tensor)")),
    returns="the Euler end point after len(timesteps) - 1 steps",
    reference=lambda x_1, timesteps, velocity_model: _rf_loop(x_1, timesteps, velocity_model),
    hint="an Euler step is x_next = x + (t_next - t) * v(x, t): the time difference is negative here.",
    hints=("evaluate the velocity at the start of each step (x, t), not at t_next.",),
    draw=_rf_trial, graded_by="outcome", n_trials=3, covers=_COVERS,
    grading=(f"run from the same x_1 on the same grid, your end points must be within {SLACK}x the library Euler "
             "loop's distance to the exact flow map of the Gaussian data (closed form)."),
    return_note="a tensor shaped like x_1",
    mistakes=(
        (lambda x, ts, v: _rf_loop(x, ts, v, sign=-1.0),
         "the step goes the wrong way: with decreasing t, (t_next - t) is negative; do not flip its sign."),
        (lambda x, ts, v: _rf_loop(x, ts, v, frozen=True),
         "the velocity is evaluated once and re-used: evaluate it at the current (x, t) in every step (only "
         "for a single data point are the paths straight)."),
    )))
