"""Exercises on trajectory distillation (handbook Sec. 3.2.1, Eq. 21-23, 47; Wang talk PD Alg. 2; Luo talk ECT Eq. 15).

    >>> from dstar_edu import exercises
    >>> exercises.list_exercises("trajectory")
    ['pd_target', 'cd_cfg_target', 'ect_r']
    >>> exercises.check("pd_target", my_pd_target)

All three are graded by value against the library (``objectives.trajectory.pd_target``,
``objectives.pretrain.ddim_denoise`` with ``cfg_scale``, ``objectives.trajectory.ect_mapping``) on fresh random
float64 problems: 2D points and 3x32x32 images for the first two, EDM noise levels early (``r`` clamped at 0) and
late in training for ``ect_r``. While an answer is graded those library functions (and the DDIM samplers that
would do ``cd_cfg_target``'s loop) refuse to run (``Exercise.guards``).
"""
from __future__ import annotations

import torch

from ..predictors import FunctionPredictor
from ..process import DDPM, VP
from .core import Exercise, Trial, batch_label, over_dims, register

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["TRIAL_DIMS"]

TRIAL_DIMS = (2, 3072, 2)
_VP = VP()
_DDPM = DDPM(1000)


# ---- 1. the PD target x_tilde ------------------------------------------------------------------------------------
def _ref_pd_target(z_t, z_next, alpha_t, sigma_t, alpha_next, sigma_next):
    from ..objectives.trajectory import pd_target
    t = _VP.t_from_edm_sigma((sigma_t / alpha_t).reshape(-1))
    t_next = _VP.t_from_edm_sigma((sigma_next / alpha_next).reshape(-1))
    return pd_target(z_t, z_next, t, t_next, _VP)


def _draw_pd(dim: int, g: torch.Generator) -> Trial:
    B = 16 if dim == 2 else 4
    shape = (B, 2) if dim == 2 else (B, 3, 32, 32)
    t = 0.2 + 0.7 * torch.rand(B, generator=g, dtype=F64)
    t_next = t * (0.2 + 0.6 * torch.rand(B, generator=g, dtype=F64))
    a, s = _VP.coefficients(t, torch.empty(shape, dtype=F64))
    a2, s2 = _VP.coefficients(t_next, torch.empty(shape, dtype=F64))
    z_t = torch.randn(shape, generator=g, dtype=F64)
    z_next = 0.8 * z_t + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    return Trial({"z_t": z_t, "z_next": z_next, "alpha_t": a, "sigma_t": s, "alpha_next": a2, "sigma_next": s2},
                 batch_label(dim, B) + ", VP process, per-sample t > t''", times=t)


register(Exercise(
    name="pd_target", area="trajectory", source="Wang talk Alg. 2 (Progressive distillation); handbook Sec. 3.2.1",
    prompt=("Progressive distillation trains the student so that ONE of its DDIM steps t -> t'' lands where the "
            "teacher's TWO steps land (z_next = z_{t''}). A deterministic DDIM step with clean-sample prediction x0 "
            "is z_{t''} = alpha_{t''} x0 + sigma_{t''} (z_t - alpha_t x0) / sigma_t. Solve this for x0: that x0 is "
            "the student's regression target x_tilde. Return x_tilde (same shape as z_t)."),
    args=(("z_t", "noisy sample at the student's time t, (batch, *shape)"),
          ("z_next", "the teacher's two-step DDIM result at t'', same shape"),
          ("alpha_t", "alpha(t), broadcastable against z_t"), ("sigma_t", "sigma(t), broadcastable"),
          ("alpha_next", "alpha(t''), broadcastable"), ("sigma_next", "sigma(t''), broadcastable")),
    returns="x_tilde = (z_next - (sigma_next/sigma_t) z_t) / (alpha_next - (sigma_next/sigma_t) alpha_t)",
    reference=_ref_pd_target,
    guards=("dstar_edu.objectives.trajectory:pd_target",),
    hint=("z_next is linear in x0: collect the x0 terms of the DDIM step on one side. x0 appears twice (in the "
          "clean part and inside the noise estimate (z_t - alpha_t x0) / sigma_t)."),
    hints=("Write the DDIM step as z_next = (alpha_next - r alpha_t) x0 + r z_t with r = sigma_next / sigma_t, "
           "then isolate x0.",
           "r = sigma(t'')/sigma(t) < 1 is the share of z_t's noise that survives the step; the denominator "
           "alpha_next - r alpha_t is positive because the SNR grows from t to t''."),
    draw=over_dims(TRIAL_DIMS, _draw_pd),
    mistakes=(
        (lambda z_t, z_next, a, s, a2, s2: (z_next - (s / s2) * z_t) / (a2 - (s / s2) * a),
         "the noise ratio is upside down: it is sigma(t'')/sigma(t) (how much of z_t's noise survives the step)."),
        (lambda z_t, z_next, a, s, a2, s2: (z_next - s2 * (z_t - a * z_next) / s) / a2,
         "you plugged the teacher's output in as x0 inside the step; x0 appears twice, solve the linear equation."),
        (lambda z_t, z_next, a, s, a2, s2: (z_t - s * (z_t - a2 * z_next) / s2) / a,
         "this is Tweedie at t with a noise estimate built from z_next: the target must make the DDIM STEP exact."),
    ),
    n_trials=3, covers="2D points and 3x32x32 images, VP process",
    return_note="a torch.Tensor of the same shape as z_t"))


# ---- 2. the m-step CD target with a CFG teacher ---------------------------------------------------------------------
def _teacher(eps_cond, eps_uncond):
    def fn(x, t, cond):
        return eps_uncond(x, t) if cond is None else eps_cond(x, t)
    return FunctionPredictor(fn, _DDPM, "eps")


def _ref_cd_target(x_start, times, eps_cond, eps_uncond, w):
    from ..objectives.pretrain import ddim_denoise
    teacher = _teacher(eps_cond, eps_uncond)
    x = x_start
    for j in range(times.numel() - 1):
        t0 = times[j].expand(x.shape[0])
        t1 = times[j + 1].expand(x.shape[0])
        x = ddim_denoise(teacher, x, t0, t1, cond=torch.ones(x.shape[0], dtype=torch.long), cfg_scale=float(w),
                         uncond=None)
    return x


def _eps_net(dim: int, g: torch.Generator):
    """A smooth made-up noise predictor eps(x, t) = tanh(a x + b) (1 - t/2000) (elementwise; any shape)."""
    a = 0.5 + torch.rand(1, generator=g, dtype=F64).item()
    b = torch.randn(1, generator=g, dtype=F64).item()

    def eps(x, t):
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, *[1] * (x.ndim - 1))
        return torch.tanh(a * x + b) * (1 - tt / 2000)
    return eps


def _draw_cd(dim: int, g: torch.Generator) -> Trial:
    B = 16 if dim == 2 else 4
    shape = (B, 2) if dim == 2 else (B, 3, 32, 32)
    m = int(torch.randint(2, 4, (1,), generator=g))
    start = int(torch.randint(500, 900, (1,), generator=g))
    times = torch.tensor([start - 100 * j for j in range(m + 1)], dtype=F64)
    x = torch.randn(shape, generator=g, dtype=F64)
    w = float(1.0 + 4.0 * torch.rand(1, generator=g, dtype=F64))
    return Trial({"x_start": x, "times": times, "eps_cond": _eps_net(dim, g), "eps_uncond": _eps_net(dim, g), "w": w},
                 batch_label(dim, B) + f", DDPM(1000) times {times.tolist()}, w = {w:.3g}")


def _cd_variant(kind: str):
    def fn(x_start, times, eps_cond, eps_uncond, w):
        x = x_start
        ab = _DDPM.alpha_bars
        for j in range(times.numel() - 1):
            t0, t1 = int(times[j]), int(times[j + 1])
            e_c, e_u = eps_cond(x, times[j]), eps_uncond(x, times[j])
            renoise = None
            if kind == "w_only":
                e = e_c + w * e_u
            elif kind == "other_convention":
                e = e_u + w * (e_c - e_u)
            elif kind == "renoise_cond":
                e = e_c + w * (e_c - e_u)
                renoise = e_c
            elif kind == "one_step":
                t1 = int(times[-1])
                e = (1 + w) * e_c - w * e_u
            else:  # "plain"
                e = e_c + w * (e_c - e_u)
            x0 = (x - torch.sqrt(1 - ab[t0]) * e) / torch.sqrt(ab[t0])
            x = torch.sqrt(ab[t1]) * x0 + torch.sqrt(1 - ab[t1]) * (e if renoise is None else renoise)
            if kind == "one_step":
                return x
        return x
    return fn


register(Exercise(
    name="cd_cfg_target", area="trajectory", source="handbook Eq. 21-23 and Eq. 47 (m-step CD / LCM)",
    prompt=("The target of m-step consistency distillation with a guided teacher is x_hat_{t_n} = Denoise^m(x_{t_n+m}) "
            "(Eq. 22/47): m deterministic DDIM steps (Eq. 21 with sigma = 0) along `times` (DDPM T = 1000, "
            "decreasing), each with the classifier-free-guided noise of Eq. 23, "
            "eps_w = eps_cond + w (eps_cond - eps_uncond). eps_cond(x, t) / eps_uncond(x, t) return the teacher's "
            "noise predictions at DDPM time t. Return x after the m steps."),
    args=(("x_start", "x_{t_n+m}, (batch, *shape)"), ("times", "1-d float64 tensor t_{n+m} > ... > t_n (DDPM times)"),
          ("eps_cond", "callable (x, t) -> conditional eps"), ("eps_uncond", "callable (x, t) -> unconditional eps"),
          ("w", "guidance weight (float)")),
    returns="m DDIM steps with eps_w = (1 + w) eps_cond - w eps_uncond",
    reference=_ref_cd_target,
    guards=("dstar_edu.objectives.pretrain:ddim_denoise", "dstar_edu.samplers.diffusion:ddim_update",
            "dstar_edu.objectives.trajectory:teacher_two_steps",
            "dstar_edu.samplers.diffusion:ddim", "dstar_edu.samplers.diffusion:ddim_step",
            "dstar_edu.samplers.diffusion:_ddim_update", "dstar_edu.samplers.diffusion:dpm_solver_step"),
    hint=("One loop over consecutive pairs of `times`; in each step form the guided noise eps_w of Eq. 23, read the "
          "clean sample off it with Tweedie (Eq. 7), and re-noise that clean sample to the next time with the SAME "
          "eps_w (Eq. 21 with sigma = 0)."),
    hints=("alpha_bar_t is dstar_edu.process.DDPM(1000).alpha_bars[int(t)] (the times are DDPM steps stored as "
           "float64); call eps_cond / eps_uncond at the current time of the step.",
           "per step: x0 = (x - sqrt(1 - ab_t) eps_w) / sqrt(ab_t), then x = sqrt(ab_next) x0 + sqrt(1 - ab_next) "
           "eps_w, with eps_w = eps_cond + w (eps_cond - eps_uncond)."),
    draw=over_dims(TRIAL_DIMS, _draw_cd),
    mistakes=((_cd_variant("w_only"),
               "the guided noise is eps_cond + w (eps_cond - eps_uncond), not eps_cond + w eps_uncond."),
              (_cd_variant("other_convention"),
               "eps_uncond + w (eps_cond - eps_uncond) is the other CFG convention (w = 1: no guidance); Eq. 23 "
               "guides as eps_cond + w (eps_cond - eps_uncond) (w = 0: no guidance)."),
              (_cd_variant("renoise_cond"),
               "you re-noise with the unguided eps_cond; the DDIM step re-noises with the same guided eps_w it "
               "used for x0 (both come from the guided teacher)."),
              (_cd_variant("one_step"),
               "you jumped from t_{n+m} to t_n in ONE step: Denoise^m takes m steps along times.")),
    n_trials=3, covers="2D points and 3x32x32 images, DDPM T=1000, m = 2 or 3",
    return_note="a torch.Tensor of the same shape as x_start"))


# ---- 3. ECT's mapping function -------------------------------------------------------------------------------
def _ref_ect_r(t, iters, q, d):
    from ..objectives.trajectory import ect_mapping
    return ect_mapping(t, int(iters), q=float(q), d=int(d))


def _draw_ect(trial: int, g: torch.Generator) -> Trial:
    """Trial 0 is early in training (stage 0 or 1 with q = 2: r < 0 before the clamp for every t at stage 0, for
    t < ln 7 at stage 1), the others late (stages 2-11, where r > 0 mostly); iters is never a multiple of d, so
    iters / d and iters // d differ."""
    t = torch.exp(-1.1 + 2.0 * torch.randn(64, generator=g, dtype=F64))      # EDM noise levels, ECT's log-normal
    d = [1000, 2000, 500][trial % 3]
    q = [2.0, 4.0, 2.0][trial % 3]
    lo, hi = (0, 2) if trial % 3 == 0 else (2, 12)
    stage = int(torch.randint(lo, hi, (1,), generator=g))
    iters = stage * d + int(torch.randint(1, d, (1,), generator=g))
    return Trial({"t": t, "iters": iters, "q": q, "d": d}, f"iters = {iters}, q = {q}, d = {d}", times=t)


register(Exercise(
    name="ect_r", area="trajectory", source="Luo talk, ECT Alg. 1 and Eq. 15",
    prompt=("Easy Consistency Tuning compares f(x_t) with f(x_r) at a smaller noise level r = r(t, iters) that moves "
            "towards t during training (dt = t - r -> 0). Compute r from Eq. 15 of the Luo talk: the ratio r/t "
            "depends on t through n(t) and on the training stage iters // d through the shrink factor q. r may "
            "not be negative: clamp it at 0. Return r (same shape as t)."),
    args=(("t", "EDM noise levels, 1-d float64 tensor"), ("iters", "training iteration (int)"),
          ("q", "shrink factor per stage (float > 1)"), ("d", "iterations per stage (int)")),
    returns="r = max(t (1 - (1 + 8 sigmoid(-t)) / q ** (iters // d)), 0)",
    reference=_ref_ect_r,
    guards=("dstar_edu.objectives.trajectory:ect_mapping",),
    hint=("dt = t - r = t n(t) / q^a where a is the training stage: dt shrinks by the factor q once every d "
          "iterations, and r never goes below the data end 0."),
    hints=("the stage is a = iters // d (an integer: dt shrinks in steps); n(t) = 1 + 8 torch.sigmoid(-t).",
           "r = (t * (1 - n / q ** a)).clamp_min(0): early in training n / q^a > 1 and the clamp matters."),
    draw=_draw_ect,
    mistakes=((lambda t, iters, q, d: (t * (1 - (1 + 8 * torch.sigmoid(-t)) / q ** (iters / d))).clamp_min(0),
               "the stage is floor(iters / d): dt shrinks in steps, not continuously (use iters // d)."),
              (lambda t, iters, q, d: t * (1 - (1 + 8 * torch.sigmoid(-t)) / q ** (iters // d)),
               "early in training n(t)/q^a > 1 makes r negative: clamp r at 0 (the data end)."),
              (lambda t, iters, q, d: (t * (1 - (1 + 8 * torch.sigmoid(t)) / q ** (iters // d))).clamp_min(0),
               "n(t) = 1 + 8 sigmoid(-t): larger dt/t at SMALL noise levels, so the sign inside the sigmoid is "
               "minus.")),
    n_trials=3, covers="EDM noise levels t ~ log-normal, several stages",
    return_note="a torch.Tensor of the same shape as t"))
