"""Trajectory distillation (handbook Sec. 2.3, 2.4.1, 2.4.4-2.4.5, 3.2.1, 3.2.5, 3.2.6; Wang talk; Luo talk ECT).

Every function takes tensors and predictors and reuses the library's single copies of the seed formulas:
the deterministic DDIM step with optional CFG (``objectives.pretrain.ddim_denoise``, Eq. 21/23/40), the CT and
CD losses (``consistency_training_loss`` Eq. 25, ``consistency_distillation_loss`` Eq. 20-23, 46-47), the
flow-matching and denoising losses (Eq. 28-29, Wang talk Alg. 3-4), the conversions (Eq. 7, 31-33, 39) and the
samplers. What is new here is only what those do not already say:

* progressive distillation (handbook Sec. 3.2.1, Eq. 40; Wang talk "Algorithm 2 Progressive distillation"):
  the teacher's two DDIM steps, the x0 target ``x_tilde`` for which ONE student DDIM step lands exactly on the
  teacher's two-step result, the loss (both the handbook's x-space form and Salimans & Ho's x0-space form),
  guided PD (CFG teacher), and the halving schedule;
* Easy Consistency Tuning (Luo talk, ECT Alg. 1 and Eq. 15): the mapping function ``r(t, iters)``;
* Stable Consistency Tuning (Wang talk, "Ground truth of score estimation"): the self-normalised score target;
* Phased Consistency Distillation (Wang talk, PCD Alg. 1): phase edges, the phased CD loss and phased sampling;
* reflow / rectified diffusion / velocity-mapped fine-tuning (handbook Eq. 29, 35, Sec. 2.4.1, 2.4.5; Wang talk
  Alg. 3-4): ODE-coupled pairs and the losses on them, and the straightness of a flow;
* ADD (handbook Sec. 3.2.5) and the DMD2 multi-step student with backward simulation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..conversions import from_x0_eps
from ..process import Process, expand_like
from ..samplers.diffusion import ddim_update
from ..times import lognormal_edm_sigma
from ..validation import check_batch, check_choice, check_int, check_shape
from .distances import get_pair_distance, squared_norm
from .common import batch_times, check_process, draw_times, reduce_loss
from .pretrain import (consistency_distillation_loss, consistency_training_loss, ddim_denoise, denoising_loss,
                       flow_matching_loss)

Tensor = torch.Tensor

__all__ = [
    "teacher_two_steps", "pd_target", "progressive_distillation_loss", "pd_halving_schedule", "halve_timesteps",
    "ect_mapping", "ect_loss", "sct_score_target", "ct_score_target",
    "phase_edges", "phase_start", "phased_consistency_distillation_loss", "phased_sampling", "PhasedPredictor",
    "ode_pairs", "reflow_loss", "rectified_diffusion_loss", "velocity_mapped_loss", "straightness",
    "add_generator_loss", "add_discriminator_loss", "dmd2_backward_simulation",
]


def _check_timesteps_dec(timesteps, process: Process, name: str = "timesteps") -> Tensor:
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if ts.numel() < 2 or not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{name} must be a strictly decreasing grid (noise -> data) of at least 2 times, "
                         f"got {ts.tolist()[:6]}")
    process.check_t(ts)
    return ts


# ---- progressive distillation (handbook Sec. 3.2.1, Eq. 40; Wang talk Alg. 2) ------------------------------
def teacher_two_steps(teacher, x_t: Tensor, t, t_mid, t_next, cond=None, cfg_scale: float | None = None,
                      uncond=None) -> Tensor:
    """``DDIM(DDIM(x_t, t -> t_mid), t_mid -> t_next)`` with the teacher (handbook Sec. 3.2.1, ``x_tilde_{t_{i-1}}``).

    Each step is the library's deterministic DDIM step (Eq. 40 with ``sigma = 0`` = Eq. 21); with ``cfg_scale = w``
    the teacher's prediction is guided by Eq. 23 (guided PD, Meng et al.). Times are scalars or ``(batch,)``.
    """
    process = check_process(teacher, None, "teacher_two_steps")
    x_t = check_batch(x_t, "x_t")
    t, t_mid, t_next = (batch_times(process, v, x_t) for v in (t, t_mid, t_next))
    if not bool(((t > t_mid) & (t_mid > t_next)).all()):
        raise ValueError("teacher_two_steps needs t > t_mid > t_next for every sample")
    x_mid = ddim_denoise(teacher, x_t, t, t_mid, cond, cfg_scale, uncond)
    return ddim_denoise(teacher, x_mid, t_mid, t_next, cond, cfg_scale, uncond)


def pd_target(x_t: Tensor, x_next: Tensor, t, t_next, process: Process) -> Tensor:
    """The PD x0 target (Wang talk Alg. 2; Salimans & Ho 2022):
    ``x_tilde = (z_{t''} - (sigma_{t''}/sigma_t) z_t) / (alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t)``.

    It is the unique x0 prediction for which one deterministic DDIM step ``t -> t''``,
    ``alpha_{t''} x0 + sigma_{t''} (z_t - alpha_t x0) / sigma_t``, lands on ``x_next = z_{t''}`` (the teacher's
    two-step result). Needs ``sigma(t) > 0`` and a strictly larger SNR at ``t_next`` (the denominator > 0).
    """
    x_t, x_next = check_batch(x_t, "x_t"), check_batch(x_next, "x_next")
    if x_t.shape != x_next.shape:
        raise ValueError(f"x_next has shape {tuple(x_next.shape)} but x_t has shape {tuple(x_t.shape)}")
    a, s = process.coefficients(batch_times(process, t, x_t), x_t)
    a2, s2 = process.coefficients(batch_times(process, t_next, x_t), x_t)
    if bool((s == 0).any()):
        raise ValueError("pd_target needs sigma(t) > 0 (t is the noisier time of the student step)")
    r = s2 / s
    den = a2 - r * a
    if bool((den <= 0).any()):
        raise ValueError("pd_target needs SNR(t_next) > SNR(t): alpha(t'') - sigma(t'')/sigma(t) alpha(t) must be > 0")
    return (x_next - r * x_t) / den


def halve_timesteps(teacher_timesteps) -> Tensor:
    """The student grid of one PD round: every other time of the teacher's ``2N + 1`` times (Sec. 3.2.1)."""
    ts = torch.as_tensor(teacher_timesteps, dtype=torch.float64).flatten()
    if ts.numel() < 3 or (ts.numel() - 1) % 2:
        raise ValueError(f"teacher_timesteps must have 2N + 1 entries (an even number of steps, N >= 1), "
                         f"got {ts.numel()} entries")
    return ts[::2].clone()


def pd_halving_schedule(n_teacher_steps: int, n_final_steps: int = 1) -> list[int]:
    """Step counts of the PD rounds ``N, N/2, ..., n_final`` (Sec. 3.2.1: after M rounds ``ceil(N / 2^M)`` steps)."""
    for name, v in (("n_teacher_steps", n_teacher_steps), ("n_final_steps", n_final_steps)):
        check_int(name, v, lo=1)
    if n_final_steps > n_teacher_steps:
        raise ValueError(f"n_final_steps={n_final_steps} exceeds n_teacher_steps={n_teacher_steps}")
    out = [n_teacher_steps]
    while out[-1] > n_final_steps:
        out.append(math.ceil(out[-1] / 2))
    if out[-1] != n_final_steps:
        raise ValueError(f"halving {n_teacher_steps} does not reach n_final_steps={n_final_steps}; "
                         f"allowed: one of {out}")
    return out


def progressive_distillation_loss(student, teacher, x0: Tensor, teacher_timesteps, *, i=None,
                                  generator: torch.Generator | None = None, eps: Tensor | None = None,
                                  space: str = "x0", weighting: str = "snr_trunc", cond=None,
                                  cfg_scale: float | None = None, uncond=None, student_cond=None,
                                  reduction: str = "mean") -> Tensor:
    """One PD round, handbook Sec. 3.2.1 (Eq. 40) and Wang talk Alg. 2: the student's ONE DDIM step matches the
    teacher's TWO.

    ``teacher_timesteps``: the teacher's decreasing grid ``t_N > t_{N-0.5} > ... > t_0`` (``2N + 1`` entries); the
    student uses every other entry. ``i`` (1..N, drawn uniformly when None) picks ``t = t_i``; ``z_t = alpha x0 +
    sigma eps``; the teacher goes ``t -> t_{i-0.5} -> t_{i-1}`` (``teacher_two_steps``, guided when ``cfg_scale``).

    * ``space="x"`` (the handbook's form): ``||x_tilde_{t_{i-1}} - DDIM(z_t, student)||^2``;
    * ``space="x0"`` (Salimans & Ho, Wang talk): ``w(lambda_t) ||x_tilde - x0_theta(z_t)||^2`` with ``x_tilde`` from
      ``pd_target``; ``weighting="snr_trunc"``: ``w = max(alpha^2/sigma^2, 1)`` (truncated SNR), ``"snr"``, ``"none"``.
      The two forms differ exactly by the factor ``(alpha_{t''} - sigma_{t''} alpha_t / sigma_t)^2`` per sample.

    ``student_cond`` (default ``cond``) is what the student receives, e.g. a (label, w) pair for a w-conditioned
    guided-PD student. The teacher runs without gradient.
    """
    process = check_process(student, None, "progressive_distillation_loss")
    check_process(teacher, None, "progressive_distillation_loss (teacher)")
    if repr(teacher.process) != repr(process):
        raise ValueError(f"teacher.process={teacher.process} differs from student.process={process}")
    x0 = check_batch(x0, "x0", nonempty=True)
    check_choice("space", space, ("x", "x0"))  # x: handbook Sec. 3.2.1, x0: Salimans & Ho
    check_choice("weighting", weighting, ("snr_trunc", "snr", "none"))
    ts = _check_timesteps_dec(teacher_timesteps, process, "teacher_timesteps")
    student_ts = halve_timesteps(ts)
    N, B = student_ts.numel() - 1, x0.shape[0]
    if i is None:
        i = torch.randint(1, N + 1, (B,), generator=generator)
    else:
        i = torch.as_tensor(i, dtype=torch.long).expand(B)
        if int(i.min()) < 1 or int(i.max()) > N:
            raise ValueError(f"i has values in [{int(i.min())}, {int(i.max())}]; allowed 1..N={N}")
    rev = student_ts.flip(0)                                    # rev[k] = t_k (increasing)
    t = rev[i].to(x0.dtype)
    t_next = rev[i - 1].to(x0.dtype)
    t_mid = ts.flip(0)[2 * i - 1].to(x0.dtype)                 # t_{i - 0.5}
    z_t, _ = process.q_sample(x0, t, eps=eps, generator=generator)
    with torch.no_grad():
        z_next = teacher_two_steps(teacher, z_t, t, t_mid, t_next, cond, cfg_scale, uncond)
    s_cond = cond if student_cond is None else student_cond
    x0_theta = student.predict("x0", z_t, t, s_cond)
    if space == "x":
        a2, s2 = process.coefficients(t_next, z_t)
        a, s = process.coefficients(t, z_t)
        x_hat = ddim_update(x0_theta, (z_t - a * x0_theta) / s, a2, s2 * s2)  # one student DDIM step (Eq. 40, sigma = 0)
        per = squared_norm(z_next - x_hat)
    else:
        target = pd_target(z_t, z_next, t, t_next, process)
        c = process.at(t)
        snr = (c.alpha / c.sigma) ** 2
        w = snr.clamp_min(1.0) if weighting == "snr_trunc" else snr if weighting == "snr" else torch.ones_like(snr)
        per = w.to(x0.dtype) * squared_norm(target - x0_theta)
    return reduce_loss(per, reduction, "progressive_distillation_loss")


# ---- ECT (Luo talk, Alg. 1, Eq. 15) ----------------------------------------------------------------------------
def ect_mapping(t, iters: int, *, q: float = 2.0, d: int = 1000, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's mapping function (Luo talk Eq. 15): ``r/t = 1 - n(t) / q^floor(iters/d)``, ``r = max(r, 0)``.

    ``t`` and ``r`` are EDM noise levels (the talk's ``x_t = x0 + t eps``). ``n(t) = 1 + k sigmoid(-b t)``
    (Geng et al.'s choice, ``k = 8, b = 1``; the talk leaves ``n`` open). ``dt = t - r = t n(t) / q^a`` shrinks
    geometrically (factor ``q`` every ``d`` iterations) towards 0: the continuous-time CT limit.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    if bool((t < 0).any()) or bool(torch.isnan(t).any()):
        raise ValueError("t must be non-negative EDM noise levels")
    check_int("iters", iters, lo=0)  # training iteration
    if not q > 1:
        raise ValueError(f"q={q!r} must be > 1 (dt shrinks by q every d iterations)")
    check_int("d", d, lo=1)  # iterations per stage
    n = 1.0 + k * torch.sigmoid(-b * t)
    r = t * (1.0 - n / q ** (iters // d))
    return r.clamp_min(0.0)


def ect_loss(model, x0: Tensor, iters: int, *, generator: torch.Generator | None = None, t=None,
             eps: Tensor | None = None, P_mean: float = -1.1, P_std: float = 2.0, q: float = 2.0, d: int = 1000,
             distance="pseudo_huber", c: float | None = None, weighting: str = "inv_dt", cond=None,
             parameterization: str = "cm_f", r_min: float = 0.002, reduction: str = "mean") -> Tensor:
    """Easy Consistency Tuning loss (Luo talk, ECT Alg. 1): ``w(t) d(f_theta(x_t, t), f_sg(theta)(x_r, r))``.

    The EDM level ``t`` is log-normal (``ln t ~ N(P_mean, P_std^2)``, clamped to the process's range) unless given,
    ``r = ect_mapping(t, iters)``, both mapped to the model's process time; ``x_t`` and ``x_r`` share ``x0, eps``.
    This IS ``consistency_training_loss`` (Eq. 25) on the pair ``(r, t)`` with the target network = the online
    network under stop-gradient. ``weighting="inv_dt"``: ``w = 1 / (t - r)`` in EDM units; ``"none"``: 1.
    ``c`` defaults to ``0.03 sqrt(D)`` for the pseudo-Huber distance (Song & Dhariwal's scaling). ``r`` is clamped
    at ``r_min`` (EDM level; the consistency boundary epsilon = 0.002 of Eq. 19, where ``f`` is the identity: the
    talk's ``r = 0``, moved to where the cm_f parameterisation is defined), and ``t`` at ``2 r_min``.
    """
    process = check_process(model, None, "ect_loss")
    x0 = check_batch(x0, "x0", nonempty=True)
    check_choice("weighting", weighting, ("inv_dt", "none"))
    r_min = max(float(r_min), process.edm_sigma(process.t_min).item())
    lo, hi = 2 * r_min, process.edm_sigma(process.t_max).item()
    if t is None:
        s = lognormal_edm_sigma(x0.shape[0], P_mean, P_std, generator)
        s = s.clamp(lo, hi)
    else:
        s = torch.as_tensor(t, dtype=torch.float64).expand(x0.shape[0]).clone()
    r = ect_mapping(s, iters, q=q, d=d).clamp_min(r_min)
    t_hi = process.t_from_edm_sigma(s).to(x0.dtype)
    t_lo = process.t_from_edm_sigma(r).to(x0.dtype)
    # in float32 a late-stage r can round onto t: use the next representable time below t instead
    t_lo = torch.where(t_lo < t_hi, t_lo, torch.nextafter(t_hi, torch.full_like(t_hi, -math.inf)))
    if distance == "pseudo_huber" and c is None:
        c = 0.03 * math.sqrt(x0[0].numel())
    w = None
    if weighting == "inv_dt":
        inv = (1.0 / (s - r)).to(x0.dtype)

        def w(t_lo_, t_hi_):  # noqa: ARG001 - the weight is fixed by (s, r) for this batch
            return inv
    return consistency_training_loss(model, model, x0, t_pair=(t_lo, t_hi), eps=eps, generator=generator,
                                     distance=distance, c=c, weighting=w, parameterization=parameterization,
                                     cond=cond, reduction=reduction)


# ---- SCT (Wang talk, "Ground truth of score estimation: Stable Consistency Tuning") -----------------------------
def ct_score_target(x_t: Tensor, x0: Tensor, t, process: Process) -> Tensor:
    """CT's single-sample score estimate ``grad log p(x_t | x0) = -(x_t - alpha x0) / sigma^2`` (Luo talk Eq. 7)."""
    a, s = process.coefficients(batch_times(process, t, x_t), x_t)
    return -(x_t - a * x0) / (s * s)


def sct_score_target(x_t: Tensor, t, process: Process, reference: Tensor, *, include_self: Tensor | None = None
                     ) -> Tensor:
    """SCT's variance-reduced score target (Wang talk, last line of the SCT derivation, corrected normalisation):

        s_hat(x_t) = sum_i w_i grad log p(x_t | x0^(i)),   w_i = p(x_t | x0^(i)) / sum_j p(x_t | x0^(j))

    over a reference batch ``{x0^(i)}`` of data (``reference``, shape ``(n, *shape)``, shared by all ``x_t``; for the
    class-conditional form pass the batch of the same class). Self-normalised importance sampling: consistent, and
    with ``reference`` containing the ``x0`` that produced ``x_t`` (``include_self``: that ``(batch, *shape)`` x0 is
    added as one more reference point per sample) the target never degenerates. The slide prints a further factor
    ``1/n`` in front of the self-normalised sum (erratum ``distill.traj.sct_normalisation``).
    """
    x_t = check_batch(x_t, "x_t")
    reference = check_batch(reference, "reference", nonempty=True)
    if reference.shape[1:] != x_t.shape[1:]:
        raise ValueError(f"reference has shape {tuple(reference.shape)}; its points must have x_t's shape "
                         f"{tuple(x_t.shape[1:])}")
    tt = batch_times(process, t, x_t)
    c = process.at(tt, dtype=x_t.dtype)
    a, s = c.alpha, c.sigma
    B = x_t.shape[0]
    X = x_t.reshape(B, -1)
    R = reference.reshape(reference.shape[0], -1).to(x_t.dtype)
    cand = R[None].expand(B, -1, -1)
    if include_self is not None:
        if include_self.shape != x_t.shape:
            raise ValueError(f"include_self has shape {tuple(include_self.shape)}; it must match x_t {tuple(x_t.shape)}")
        cand = torch.cat([cand, include_self.reshape(B, 1, -1).to(x_t.dtype)], 1)
    diff = X[:, None, :] - a[:, None, None] * cand                  # (B, n, D)
    logp = -0.5 * (diff * diff).sum(-1) / (s[:, None] ** 2)
    w = torch.softmax(logp, -1)                                       # self-normalised weights
    score = -(w[:, :, None] * diff).sum(1) / (s[:, None] ** 2)
    return score.reshape(x_t.shape)


# ---- PCD (Wang talk, Algorithm 1 Phased Consistency Distillation) -----------------------------------------------
def phase_edges(t_grid, n_phases: int) -> Tensor:
    """Edge times ``s_0 = t_0 < s_1 < ... < s_M = t_N`` taken from the increasing grid ``t_grid`` (PCD Alg. 1 input):
    ``M = n_phases`` phases of (as) equal (as possible) numbers of grid intervals."""
    g = torch.as_tensor(t_grid, dtype=torch.float64).flatten()
    if g.numel() < 2 or not bool((g[1:] > g[:-1]).all()):
        raise ValueError("t_grid must be strictly increasing with at least 2 times")
    N = g.numel() - 1
    check_int("n_phases", n_phases, lo=1, hi=N, hi_name="N")  # number of grid intervals
    idx = torch.round(torch.linspace(0, N, n_phases + 1, dtype=torch.float64)).long()
    return g[idx]


def phase_start(t, edges: Tensor) -> Tensor:
    """``s_m`` with ``s_m < t <= s_{m+1}`` (the lower edge of the phase that contains ``t``; ``t = s_0`` maps to s_0)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    e = torch.as_tensor(edges, dtype=torch.float64)
    m = (torch.searchsorted(e, t, right=False) - 1).clamp(0, e.numel() - 2)
    return e[m]


def phased_consistency_distillation_loss(model, ema_model, teacher, x0: Tensor, t_grid, n_phases: int,
                                         m: int = 1, cfg_scale: float | None = None, *, n=None,
                                         generator: torch.Generator | None = None, eps: Tensor | None = None,
                                         distance="l2", c: float | None = None, cond=None, uncond=None,
                                         denoise=None, reduction: str = "mean") -> Tensor:
    """PCD (Wang talk, Algorithm 1): consistency distillation WITHIN each phase ``[s_m, s_{m+1}]``.

    The phased consistency function ``f^m(x_t, t)`` maps ``x_t`` to the ODE solution at the phase's lower edge
    ``s_m``: ``model(x_t, t, cond)`` is called with ``cond = (cond, s_m)`` packed as a dict
    ``{"cond": cond, "s": s_m}`` when the model declares ``phased = True``; otherwise ``model.predict("x0")`` is
    read as the ODE end point at ``s_m`` by the caller's convention. The target is ``f^m_{theta-}(x_hat_{t_n}, t_n)``
    with ``x_hat = Denoise^k`` (``k = m`` teacher DDIM steps, Eq. 22, CFG by Eq. 23 = the slide's
    ``(1 + w) Psi(c) - w Psi(0)`` for the deterministic DDIM solver), where ``t_{n+m}`` and ``t_n`` lie in the same
    phase (n is drawn among such indices). The adversarial ReLU term of the slide is not included.
    """
    process = check_process(model, None, "phased_consistency_distillation_loss")
    x0 = check_batch(x0, "x0", nonempty=True)
    g = torch.as_tensor(t_grid, dtype=torch.float64).flatten()
    edges = phase_edges(g, n_phases)
    N, B = g.numel() - 1, x0.shape[0]
    valid = [j for j in range(0, N - m + 1) if float(phase_start(g[j + m], edges)) <= float(g[j])]
    if not valid:
        raise ValueError(f"no pair (t_n, t_n+m) with m={m} fits inside one phase; use fewer phases or smaller m")
    if n is None:
        n = torch.as_tensor(valid)[torch.randint(0, len(valid), (B,), generator=generator)]
    else:
        n = torch.as_tensor(n, dtype=torch.long).expand(B)
        bad = set(n.tolist()) - set(valid)
        if bad:
            raise ValueError(f"n={sorted(bad)} puts t_n and t_n+m in different phases; allowed: {valid}")
    s_m = phase_start(g[n + m], edges).to(x0.dtype)
    ema_model = model if ema_model is None else ema_model
    online = _PhasedView(model, s_m, cond)
    target = _PhasedView(ema_model, s_m, cond)
    return consistency_distillation_loss(online, target, teacher, x0, g.to(x0.dtype), m, cfg_scale, n=n,
                                         generator=generator, eps=eps, distance=distance, c=c,
                                         parameterization="x0", cond=cond, uncond=uncond, denoise=denoise,
                                         reduction=reduction)


def _phased_f(net, x, t, s_m, cond):
    if getattr(net, "phased", False):
        return net(x, t, {"cond": cond, "s": s_m})
    return net.predict("x0", x, t, cond)


class _PhasedView(torch.nn.Module):
    """A predictor view whose ``predict("x0")`` is the phased consistency output ``f^m(x_t, t)`` (ODE point at s_m)."""

    def __init__(self, net, s_m, cond):
        super().__init__()
        self.net, self.s_m, self.cond = net, s_m, cond
        self.process, self.prediction = net.process, "x0"

    def forward(self, x, t, cond=None):
        return _phased_f(self.net, x, t, self.s_m, cond)

    def predict(self, target, x, t, cond=None):
        if target != "x0":
            raise ValueError(f"a phased consistency view only provides 'x0' (the phase-edge point), not {target!r}")
        return self(x, t, cond)


class PhasedPredictor(torch.nn.Module):
    """A phased consistency model from any network ``F(x_t, t, cond)``: ``f^m(x_t, t) = x_t + (t - s_m) F(x_t, t)``,
    so the boundary condition ``f^m(x, s_m) = x`` holds exactly at every phase edge (PCD; the analogue of Eq. 19's
    ``c_skip(epsilon) = 1``). ``phased = True``: called with ``cond = {"cond": c, "s": s_m}``."""

    phased = True

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.process, self.prediction = net.process, "x0"

    def forward(self, x_t: Tensor, t, cond=None):
        if not isinstance(cond, dict) or "s" not in cond:
            raise ValueError("a PhasedPredictor needs cond={'cond': c, 's': s_m} (the lower phase edge)")
        t = batch_times(self.process, t, x_t)
        s = batch_times(self.process, cond["s"], x_t)
        return x_t + expand_like((t - s).to(x_t.dtype), x_t) * self.net(x_t, t, cond.get("cond"))


def phased_sampling(model, edges, x_init: Tensor, cond=None) -> Tensor:
    """PCD multistep sampling: deterministic jumps ``x_{s_{m+1}} -> f^m(x_{s_{m+1}}, s_{m+1}) = x_{s_m}`` across the
    phase edges from ``s_M`` down to ``s_0`` (Wang talk PCD; no re-noising). ``model`` as in the PCD loss."""
    e = torch.as_tensor(edges, dtype=torch.float64).flatten()
    if e.numel() < 2 or not bool((e[1:] > e[:-1]).all()):
        raise ValueError("edges must be strictly increasing phase edges s_0 < ... < s_M")
    x = check_batch(x_init, "x_init")
    for mm in range(e.numel() - 2, -1, -1):
        s_m = e[mm].to(x.dtype).expand(x.shape[0])
        x = _phased_f(model, x, e[mm + 1].to(x.dtype).expand(x.shape[0]), s_m, cond)
    return x


# ---- reflow, rectified diffusion, velocity-mapped fine-tuning (Eq. 29, 35, Sec. 2.4.1-2.4.5; Wang talk Alg. 3-4) ----
def ode_pairs(teacher, z: Tensor, timesteps, *, sampler: str = "ddim", cond=None, progress: bool = False
              ) -> Tensor:
    """``x_hat0 = Flow(z)``: the teacher's deterministic ODE sample from noise ``z`` (the coupling of Eq. 29 /
    ``Denoise^N`` of Eq. 35 / rectified diffusion's ``(eps, x_hat0)``). ``sampler``: ``"ddim"`` (any process; for
    rectified flow this is Euler) or ``"dpm_solver"``. Runs without gradient."""
    from ..samplers.diffusion import ddim, dpm_solver
    fns = {"ddim": ddim, "dpm_solver": dpm_solver}
    check_choice("sampler", sampler, sorted(fns))
    with torch.no_grad():
        return fns[sampler](teacher, timesteps, z, cond=cond, progress=progress)


def reflow_loss(model, x_hat0: Tensor, z: Tensor, *, generator: torch.Generator | None = None, t=None,
                cond=None, reduction: str = "mean") -> Tensor:
    """k-rectified flow on coupled pairs (handbook Eq. 29; Wang talk Alg. 3): flow matching with ``x0 = Flow_k(z)``
    and the SAME ``z`` as noise (instead of an independent draw). ``model`` is a rectified-flow velocity model."""
    check_shape("z", z, x_hat0.shape, "the shape of x_hat0: the coupled noise")
    return flow_matching_loss(model, x_hat0, eps=z, generator=generator, t=t, cond=cond, reduction=reduction)


def rectified_diffusion_loss(model, x_hat0: Tensor, z: Tensor, *, generator: torch.Generator | None = None,
                             t=None, target: str | None = None, cond=None, reduction: str = "mean") -> Tensor:
    """Rectified diffusion (Wang talk Alg. 4): retrain a diffusion model on its own ODE-coupled pairs, keeping its
    process and parameterisation: ``x_t = alpha x_hat0 + sigma z``, loss ``||eps_theta(x_t) - z||^2`` (or the
    model's own target). It is ``denoising_loss`` with ``x0 = x_hat0`` and ``eps = z`` coupled."""
    check_shape("z", z, x_hat0.shape, "the shape of x_hat0: the coupled noise")
    return denoising_loss(model, x_hat0, eps=z, generator=generator, t=t, target=target, cond=cond,
                          reduction=reduction)


def velocity_mapped_loss(model, x0: Tensor, *, generator: torch.Generator | None = None, t=None,
                         eps: Tensor | None = None, cond=None, reduction: str = "mean") -> Tensor:
    """Velocity-mapped RF fine-tuning of a diffusion model (handbook Sec. 2.4.4 Approach 2 corrected by 2.4.5):
    ``||v^y_theta(x_t, t) - (x0 - eps)||^2`` where ``v^y_theta`` is the model's prediction mapped to the InstaFlow
    velocity (``instaflow_v``, Eq. 31-33, 39) and ``(x0, eps)`` may be ODE-coupled pairs (then ``eps = z``).

    Since ``v^y = x0_hat - eps_hat`` and ``eps_hat = (x_t - alpha x0_hat)/sigma``, the residual is
    ``(1 + alpha/sigma)(x0_hat - x0)``: a weighted x0 regression with weight ``(1 + alpha/sigma)^2`` (checked in
    ``distill.traj.velocity_mapped_weight``; the handbook's weights are corrected in ``basics.weighted_regression``).
    """
    process = check_process(model, None, "velocity_mapped_loss")
    x0 = check_batch(x0, "x0", nonempty=True)
    if t is None:
        t = draw_times(process, x0, None, None, generator)
    t = batch_times(process, t, x0)
    x_t, eps = process.q_sample(x0, t, eps=eps, generator=generator)
    v_y = model.predict("instaflow_v", x_t, t, cond)
    per = squared_norm(v_y - (x0 - eps))
    return reduce_loss(per, reduction, "velocity_mapped_loss")


def straightness(predictor, z: Tensor, timesteps, cond=None) -> float:
    """Straightness ``S = E int ||(x_end - z)/(t_end - t_start) - v(x_t, t)||^2 dt / |T|`` of the deterministic paths
    (Liu et al. 2022; handbook Sec. 2.4.1: reflow lowers it, 0 for straight paths), along the predictor's own
    DDIM/Euler trajectory on ``timesteps`` (a left Riemann sum). ``v`` is the PF-ODE drift (``samplers.velocity``)."""
    from ..samplers.diffusion import ddim, velocity
    ts = _check_timesteps_dec(timesteps, predictor.process)
    with torch.no_grad():
        x_end, traj = ddim(predictor, ts, z, cond=cond, return_trajectory=True)
        chord = (x_end - z) / (ts[-1] - ts[0]).item()
        total = 0.0
        for k in range(ts.numel() - 1):
            v = velocity(predictor, traj[k], ts[k].item(), cond)
            total = total + (ts[k] - ts[k + 1]).item() * squared_norm(chord - v)
    return float(total.mean() / (ts[0] - ts[-1]).item())


# ---- ADD (handbook Sec. 3.2.5) and DMD2's multi-step student --------------------------------------------------
def add_generator_loss(x0_student: Tensor, teacher, discriminator, t, *, distill_weight: float = 1.0,
                       eps: Tensor | None = None, generator: torch.Generator | None = None, weighting=None,
                       distance="l2", c: float | None = None, cond=None, reduction: str = "mean") -> Tensor:
    """ADD generator objective (handbook Sec. 3.2.5): ``L_adv + lambda L_distill``.

    ``L_distill = c(t) d(x_hat_theta, x_hat_psi(x_t, t))``: the student sample ``x_hat_theta`` is re-noised to the
    TEACHER time ``t`` (``x_t = alpha x_hat_theta + sigma eps``) and compared with the frozen teacher's Tweedie
    prediction there, with the target detached (Sauer et al.); ``weighting`` gives ``c(t)`` (None: 1).
    ``L_adv``: the non-saturating generator term ``softplus(-D(x_hat_theta))`` for a discriminator ``D(x0) -> logit``
    that scores REAL data high. (The handbook writes ``log D(x_hat) + log(1 - D(x0))`` with D scoring FAKES high;
    same game, D relabelled.) ``discriminator=None`` leaves only the distillation term.
    """
    x0 = check_batch(x0_student, "x0_student", nonempty=True)
    process = check_process(teacher, None, "add_generator_loss (teacher)")
    d = get_pair_distance(distance, c)
    t = batch_times(process, t, x0)
    x_t, _ = process.q_sample(x0, t, eps=eps, generator=generator)
    with torch.no_grad():
        target = teacher.predict("x0", x_t.detach(), t, cond)
    ct = torch.ones_like(t) if weighting is None else torch.as_tensor(weighting(t), dtype=x0.dtype).expand(x0.shape[0])
    per = distill_weight * ct * d(x0, target)
    if discriminator is not None:
        for p in discriminator.parameters():
            p.requires_grad_(False)
        try:
            per = per + F.softplus(-discriminator(x0)).reshape(-1)
        finally:
            for p in discriminator.parameters():
                p.requires_grad_(True)
    return reduce_loss(per, reduction, "add_generator_loss")


def add_discriminator_loss(x0_student: Tensor, x0_real: Tensor, discriminator, reduction: str = "mean") -> Tensor:
    """ADD discriminator objective: ``softplus(-D(x_real)) + softplus(D(x_fake))`` (= ``-log D(real) - log(1 - D(fake))``,
    handbook Sec. 3.2.5 with D relabelled to score real data high); the student samples are detached."""
    xf, xr = check_batch(x0_student, "x0_student", nonempty=True), check_batch(x0_real, "x0_real", nonempty=True)
    per = F.softplus(-discriminator(xr)).reshape(-1).mean() + F.softplus(discriminator(xf.detach())).reshape(-1).mean()
    return reduce_loss(per.reshape(1), reduction, "add_discriminator_loss")


def dmd2_backward_simulation(student, timesteps, z: Tensor, *, generator: torch.Generator | None = None, cond=None,
                             stop: int | None = None) -> tuple[Tensor, Tensor]:
    """DMD2's multi-step student with backward simulation (Yin et al. 2024; handbook Sec. 3.2.4 additions).

    The student ``G(x_t, t) -> x0`` is run on its own few-step schedule ``timesteps`` (decreasing, last entry the
    data end): ``x0_k = G(x_{t_k}, t_k)``, re-noised to the next time with fresh noise, as in inference. Training
    inputs ``x_{t_k}`` are taken from this simulation instead of noising real data (no train/inference mismatch).
    ``stop`` (0-based step, drawn uniformly when None) picks which step's input to return; returns
    ``(x_{t_stop}, t_stop)`` detached: feed them to ``G`` with gradient and apply ``dmd_loss`` to ``G``'s output.
    """
    from ..samplers.consistency import renoise
    process = check_process(student, None, "dmd2_backward_simulation")
    ts = _check_timesteps_dec(timesteps, process)
    K = ts.numel() - 1
    if stop is None:
        stop = int(torch.randint(0, K, (1,), generator=generator))
    check_int("stop", stop, lo=0, hi=K - 1, hi_name="K-1")  # a student step
    x = check_batch(z, "z")
    with torch.no_grad():
        for k in range(stop):
            x0 = student.predict("x0", x, ts[k].item(), cond)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = renoise(x0, process.t_min, ts[k + 1].item(), process, noise)
    return x, ts[stop].to(x.dtype)
