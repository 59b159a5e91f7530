"""Reward fine-tuning of multi-step diffusion models (handbook Sec. 3.3): ReFL, DRaFT / DRaFT-K, QSM,
DDPO_SF (Eq. 48, Alg. 10) and its importance-sampled clipped variant, DRWR and its advantage-weighted form.

Objectives are functions of tensors, predictors and a reward ``r(x, cond) -> (batch,)``
(``dstar_edu.rewards``); there is no training loop here. Sampling chains reuse
``dstar_edu.samplers.diffusion.ddim_step`` (the handbook's Eq. 14 step with ``eta``; ``eta = 1`` is the
DDPM posterior step of Eq. 49-50), so the transitions here are exactly the library's sampler.

Direct reward gradient (Sec. 3.3.1, need a differentiable reward):

* ``refl_loss``: ``-R(x0_hat(x_t, t))`` with Tweedie's one-step prediction (Eq. 7) at an ``x_t``
  reached without gradient (``sample_until``).
* ``draft_loss``: ``-R(G_theta(eps))`` through the sampler chain; ``K`` truncates the back-propagation
  to the last ``K`` steps (DRaFT-K; ``K = None`` is full DRaFT).
* ``qsm_loss``: Q-score matching ``||s_theta(x_t, t) - scale * grad R(x_t)||^2``.

Gradient-free (Sec. 3.3.2):

* ``sample_with_log_probs`` (Alg. 10 lines 3-8), ``transition_stats`` (Eq. 49-50),
  ``gaussian_log_prob`` (Eq. 51), ``ddpo_sf_loss`` (Eq. 48 / Alg. 10 line 11) and ``ddpo_is_loss`` (the
  importance-sampled, clipped multi-update version of Black et al. 2023).
* ``drwr_weights`` and ``drwr_loss``: reward-weighted denoising regression with weights
  ``min(exp(beta A), w_max)``, ``A = R`` or ``A = R - baseline`` (advantage-weighted).

Errata (checks in ``dstar_edu/verify/checks/alignment.py``): Sec. 3.3 prints the DRWR weight as
``min(e^beta R(x), w_max)``; reward-weighted regression needs ``exp(beta R(x))``, whose optimum is the
KL-regularised ``p_ref exp(beta R) / Z``. Eq. 51's gradient is printed ``(mu - x_{t-1}) / sigma^2 grad mu``;
the gradient of the Gaussian log-density is ``(x_{t-1} - mu) / sigma^2 grad mu``. The restatement of
Eq. 8 in Sec. 3.3 weights ``x_t`` by ``sqrt(alpha_bar_t)``; Eq. 8 has ``sqrt(alpha_t)``.
"""
from __future__ import annotations

import math

import torch

from ..process import Process
from ..samplers.common import check_timesteps
from ..samplers.diffusion import ddim_sigma, ddim_step, denoise
from ..validation import check_batch, check_choice, check_finite, check_int, check_positive, check_real
from .common import reduce_loss
from .pretrain import denoising_loss

Tensor = torch.Tensor

__all__ = ["refl_loss", "sample_until", "draft_loss", "qsm_loss", "transition_stats", "gaussian_log_prob",
           "sample_with_log_probs", "ddpo_sf_loss", "ddpo_is_loss", "normalize_advantages", "drwr_weights",
           "drwr_loss"]


# ---- helpers -------------------------------------------------------------------------------------------
def _process(predictor, what: str) -> Process:
    process = getattr(predictor, "process", None)
    if not isinstance(process, Process) or not hasattr(predictor, "prediction"):
        raise ValueError(f"{what} needs a dstar_edu predictor (with .process and .prediction), got "
                         f"{type(predictor).__name__}")
    return process


def _check_reward(reward, what: str, need_grad: bool = True):
    if not callable(reward):
        raise ValueError(f"{what}: reward must be callable r(x, cond) -> (batch,), got {type(reward).__name__}")
    if need_grad and getattr(reward, "differentiable", True) is False:
        raise ValueError(f"{what} back-propagates through the reward, but {type(reward).__name__} is not "
                         "differentiable; allowed: a differentiable reward (use DDPO or DRWR otherwise)")
    return reward


def _rewards(reward, x: Tensor, cond) -> Tensor:
    r = reward(x, cond)
    if not isinstance(r, Tensor) or r.shape != (x.shape[0],):
        raise ValueError(f"the reward returned shape {tuple(getattr(r, 'shape', ()))}; expected ({x.shape[0]},)")
    return r


def _check_x(x, name: str) -> Tensor:
    check_batch(x, name, nonempty=True)
    return x


# ---- ReFL (Sec. 3.3.1) -------------------------------------------------------------------------------------
@torch.no_grad()
def sample_until(predictor, timesteps, x_init: Tensor, stop: int, *, eta: float = 0.0,
                 generator: torch.Generator | None = None, cond=None) -> Tensor:
    """Run DDIM steps ``timesteps[0] -> timesteps[stop]`` without gradient; returns ``x_{timesteps[stop]}``.

    ReFL (Xu et al.) denoises without gradient down to a random step, then takes one gradient-carrying
    prediction (``refl_loss``).
    """
    process = _process(predictor, "sample_until")
    ts = check_timesteps(timesteps, process)
    check_int("stop", stop, lo=0, hi=len(ts) - 1)  # an index of timesteps
    x = _check_x(x_init, "x_init")
    for i in range(stop):
        x = ddim_step(predictor, x, ts[i], ts[i + 1], eta=eta, cond=cond, generator=generator)
    return x


def refl_loss(predictor, x_t: Tensor, t, reward, *, cond=None, reward_cond=None) -> Tensor:
    """ReFL, handbook Sec. 3.3.1: ``L = -E[R(x_theta)]`` with ``x_theta = (x_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t)``
    (Eq. 7), so ``grad L = -E[grad_x R(x_theta) grad_theta x_theta]``.

    ``x_t`` is treated as data (detached: it was reached by the sampler without gradient); the gradient
    flows through the single predictor call only. (Sec. 3.3 prints ``x_theta`` with ``alpha_t``: the bar of
    ``alpha_bar_t`` is lost in extraction; it cites Eq. 7, which has it.)
    """
    _process(predictor, "refl_loss")
    _check_reward(reward, "refl_loss")
    x_t = _check_x(x_t, "x_t").detach()
    x0_hat, _ = denoise(predictor, x_t, t, cond)
    return reduce_loss(-_rewards(reward, x0_hat, reward_cond), "mean", "refl_loss")


# ---- DRaFT / DRaFT-K ---------------------------------------------------------------------------------------
def draft_loss(predictor, timesteps, x_init: Tensor, reward, *, K: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, cond=None, reward_cond=None, return_sample: bool = False):
    """DRaFT, handbook Sec. 3.3.1: ``L = -E_eps[R(G_theta(eps))]``, ``G_theta`` the sampler chain (DDIM, ``eta``).

    ``K`` (DRaFT-K) back-propagates through the last ``K`` steps only: the first ``N - K`` steps run
    without gradient and their output is detached (a stop-gradient on ``x_{t_K}``), so the gradient is
    ``-grad_x R(x0) d x0 / d theta`` along the last ``K`` steps. ``K = None`` or ``K = N`` is the full
    DRaFT gradient. With ``eta > 0`` the step noises are drawn from ``generator`` in step order, so two
    calls with equally seeded generators share the chain whatever ``K``.

    Returns the loss (and the final sample if ``return_sample``).
    """
    process = _process(predictor, "draft_loss")
    _check_reward(reward, "draft_loss")
    ts = check_timesteps(timesteps, process)
    N = len(ts) - 1
    if K is None:
        K = N
    check_int("K", K, lo=1, hi=N, hi_name="N")  # the number of sampler steps to back-propagate
    x = _check_x(x_init, "x_init").detach()
    for i in range(N):
        if i < N - K:
            with torch.no_grad():
                x = ddim_step(predictor, x, ts[i], ts[i + 1], eta=eta, cond=cond, generator=generator)
        else:
            x = ddim_step(predictor, x, ts[i], ts[i + 1], eta=eta, cond=cond, generator=generator)
    loss = reduce_loss(-_rewards(reward, x, reward_cond), "mean", f"draft_loss(K={K})")
    return (loss, x) if return_sample else loss


# ---- Q-score matching ----------------------------------------------------------------------------------------
def qsm_loss(predictor, x_t: Tensor, t, reward, *, scale: float = 1.0, cond=None, reward_cond=None,
             reduction: str = "mean") -> Tensor:
    """Q-score matching, handbook Sec. 3.3.1: ``E ||s_theta(x_t, t) - scale * grad_{x_t} R(x_t)||^2``.

    ``s_theta = -(x_t - sqrt(ab_t) x0_hat) / (1 - ab_t)`` is the predictor's score (any parameterisation,
    through ``predictor.predict("score")``); the target ``grad R`` is detached. The handbook writes no
    ``scale``; Psenka et al. match the score to ``alpha grad Q`` (``scale = alpha``, an inverse temperature).
    The reward is evaluated on noisy ``x_t`` (the ill-posedness the handbook points out).
    """
    _process(predictor, "qsm_loss")
    _check_reward(reward, "qsm_loss")
    x_t = _check_x(x_t, "x_t").detach()
    check_finite("scale", scale)
    with torch.enable_grad():
        xr = x_t.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_rewards(reward, xr, reward_cond).sum(), xr)
    s = predictor.predict("score", x_t, t, cond)
    per = ((s - scale * g.detach()) ** 2).reshape(x_t.shape[0], -1).sum(1)
    return reduce_loss(per, reduction, "qsm_loss")


# ---- DDPO (Sec. 3.3.2) ---------------------------------------------------------------------------------------
def transition_stats(predictor, x_t: Tensor, t, t_prev, *, eta: float = 1.0, cond=None) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the sampler transition ``p_theta(x_{t_prev} | x_t)`` (Eq. 49-50).

    ``mu_theta = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_theta``,
    ``sigma = eta sqrt((1 - ab_prev)/(1 - ab_t)) sqrt(1 - ab_t/ab_prev)`` (DDPM posterior at ``eta = 1``),
    for a non-VP process scaled by ``sqrt(alpha^2 + sigma^2)`` at ``t_prev`` (as ``ddim_step`` does). The
    mean is ``ddim_step`` with zero noise (differentiable in theta); the std is a 0-d tensor.
    """
    process = _process(predictor, "transition_stats")
    x_t = _check_x(x_t, "x_t")
    mean = ddim_step(predictor, x_t, t, t_prev, eta=eta, noise=torch.zeros_like(x_t), cond=cond)
    t, t_prev = process.check_t(t), process.check_t(t_prev)
    ab_t, ab_p = process.alpha_bar(t), process.alpha_bar(t_prev)
    a_p, s_p = process.alpha(t_prev), process.sigma(t_prev)
    std = torch.sqrt(a_p * a_p + s_p * s_p) * ddim_sigma(ab_t, ab_p, float(eta))
    return mean, std.to(x_t.dtype)


def gaussian_log_prob(x: Tensor, mean: Tensor, std) -> Tensor:
    """Eq. 51 summed over entries: ``log N(x; mean, std^2 I) = sum_i [-(x_i - mu_i)^2 / (2 std^2) - log std - log sqrt(2 pi)]``.

    Its gradient in ``mean`` is ``(x - mu) / std^2`` (Eq. 51's second line prints ``(mu - x)``: an erratum).
    """
    if x.shape != mean.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but mean has shape {tuple(mean.shape)}")
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if bool((std <= 0).any()):
        raise ValueError(f"std={std.flatten()[:4].tolist()} must be positive: a deterministic transition "
                         "(sigma = 0, e.g. the last step onto alpha_bar = 1, or eta = 0) has no density")
    d = x[0].numel()
    per = -(((x - mean) / std) ** 2).reshape(x.shape[0], -1).sum(1) / 2
    return per - d * (torch.log(std) + 0.5 * math.log(2 * math.pi))


def _check_chain(process: Process, timesteps, eta: float):
    ts = check_timesteps(timesteps, process)
    if not float(eta) > 0:
        raise ValueError(f"eta={eta!r}: DDPO needs stochastic transitions, eta in (0, 1]")
    ab = process.alpha_bar(ts)
    if bool((ab[-1] >= 1).item()):
        raise ValueError(f"timesteps end at t={ts[-1].item():g} where alpha_bar = 1: the last transition is "
                         "deterministic and has no log-probability (handbook Eq. 50 gives sigma = 0); end the "
                         "chain at a time with sigma(t) > 0 (e.g. t = 1 for DDPM) and score that sample")
    return ts


@torch.no_grad()
def sample_with_log_probs(predictor, timesteps, x_init: Tensor, *, eta: float = 1.0,
                          generator: torch.Generator | None = None, cond=None) -> tuple[list[Tensor], Tensor]:
    """Handbook Alg. 10 lines 3-8: sample the chain and record ``log p_theta(x_{t_{n-1}} | x_{t_n})`` (Eq. 51).

    Returns ``(trajectory, log_probs)``: ``trajectory = [x_{t_N}, ..., x_{t_0}]`` (``N + 1`` detached
    tensors) and ``log_probs`` of shape ``(batch, N)`` (the "old" log-probabilities of ``ddpo_is_loss``).
    Every transition is Gaussian with ``std > 0`` (``eta > 0``, last time with ``alpha_bar < 1``).
    """
    process = _process(predictor, "sample_with_log_probs")
    ts = _check_chain(process, timesteps, eta)
    x = _check_x(x_init, "x_init").detach()
    traj, logps = [x], []
    for i in range(len(ts) - 1):
        mean, std = transition_stats(predictor, x, ts[i], ts[i + 1], eta=eta, cond=cond)
        x_new = mean + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        logps.append(gaussian_log_prob(x_new, mean, std))
        traj.append(x_new)
        x = x_new
    return traj, torch.stack(logps, 1)


def _traj_log_probs(predictor, trajectory, ts, eta, cond) -> Tensor:
    if not isinstance(trajectory, (list, tuple)) or len(trajectory) != len(ts):
        raise ValueError(f"trajectory must be a list of {len(ts)} tensors [x_{{t_N}}, ..., x_{{t_0}}] matching "
                         f"timesteps, got {type(trajectory).__name__} of length {len(trajectory) if hasattr(trajectory, '__len__') else '?'}")
    out = []
    for i in range(len(ts) - 1):
        x, x_prev = trajectory[i].detach(), trajectory[i + 1].detach()
        mean, std = transition_stats(predictor, x, ts[i], ts[i + 1], eta=eta, cond=cond)
        out.append(gaussian_log_prob(x_prev, mean, std))
    return torch.stack(out, 1)


def _check_adv(advantages, B: int) -> Tensor:
    a = torch.as_tensor(advantages)
    if a.shape != (B,):
        raise ValueError(f"advantages/rewards must have shape ({B},), got {tuple(a.shape)}")
    return a.detach()


def normalize_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """``(R - mean R) / (std R + eps)`` over the batch (DDPO's per-batch reward normalisation)."""
    r = torch.as_tensor(rewards)
    if r.ndim != 1 or r.numel() < 2:
        raise ValueError(f"rewards must be a 1-d tensor with at least 2 entries, got shape {tuple(r.shape)}")
    return (r - r.mean()) / (r.std() + eps)


def ddpo_sf_loss(predictor, trajectory, timesteps, rewards, *, eta: float = 1.0, cond=None) -> Tensor:
    """DDPO_SF, handbook Eq. 48 and Alg. 10 line 11: ``L = -mean_b [ sum_n log p_theta(x_{t_{n-1}} | x_{t_n}) R_b ]``.

    Its gradient is the REINFORCE estimate of ``-grad_theta E[R(x_0)]`` (Eq. 48): the states are detached
    (``x_{t_n}.detach()``, Alg. 10 line 5) and ``R`` is a constant (line 9). Pass advantages (e.g.
    ``normalize_advantages(R)`` or ``R - baseline``) instead of ``R`` to reduce the variance; a baseline
    that does not depend on the sample keeps the estimate unbiased. One update per sampled batch (on-policy).
    """
    process = _process(predictor, "ddpo_sf_loss")
    ts = _check_chain(process, timesteps, eta)
    logp = _traj_log_probs(predictor, trajectory, ts, eta, cond)
    adv = _check_adv(rewards, logp.shape[0]).to(logp.dtype)
    return reduce_loss(-(logp.sum(1) * adv), "mean", "ddpo_sf_loss")


def ddpo_is_loss(predictor, trajectory, timesteps, advantages, old_log_probs: Tensor, *, clip_range: float = 1e-4,
                 eta: float = 1.0, cond=None) -> Tensor:
    """DDPO_IS with clipping (Black et al. 2023, the off-policy version mentioned in handbook Sec. 3.3.2).

    Per step ``n``: ``ratio = exp(log p_theta(x_{t_{n-1}} | x_{t_n}) - log p_old)``; the loss is
    ``mean_{b, n} max(-A_b ratio, -A_b clip(ratio, 1 - eps, 1 + eps))`` (PPO's clipped surrogate), which
    allows several updates on one batch. At ``theta = theta_old`` its gradient equals ``ddpo_sf_loss``'s
    divided by the number of steps N (tested in ``tests/test_reward_finetune.py``).
    """
    process = _process(predictor, "ddpo_is_loss")
    ts = _check_chain(process, timesteps, eta)
    check_real("clip_range", clip_range, 0, 1, lo_open=True, hi_open=True)
    logp = _traj_log_probs(predictor, trajectory, ts, eta, cond)
    old = torch.as_tensor(old_log_probs).detach()
    if old.shape != logp.shape:
        raise ValueError(f"old_log_probs has shape {tuple(old.shape)}; expected {tuple(logp.shape)} (batch, steps)")
    adv = _check_adv(advantages, logp.shape[0]).to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old)
    per = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    return reduce_loss(per.mean(1), "mean", "ddpo_is_loss")


# ---- DRWR ------------------------------------------------------------------------------------------------------
def drwr_weights(rewards: Tensor, beta: float, *, w_max: float | None = None, baseline=None) -> Tensor:
    """DRWR weights ``min(exp(beta A(x)), w_max)`` (handbook Sec. 3.3.2, corrected; Peters & Schaal 2007).

    ``A = R`` (``baseline=None``) or the advantage ``A = R - baseline`` (advantage-weighted regression,
    Peng et al. 2019): ``baseline`` is a number, a ``(batch,)`` tensor, or ``"mean"`` (the batch mean reward).
    Unclipped, the weighted regression's optimum is ``p_old(x) exp(beta R(x)) / Z``, the KL-regularised
    optimum with temperature ``1/beta`` (``preference.kl_regularized_optimum``); a constant baseline only
    rescales the weights. The handbook prints ``e^beta R(x)`` (``e^beta`` times ``R``): see the erratum check
    ``align.drwr_weight``.
    """
    r = torch.as_tensor(rewards).detach()
    if r.ndim != 1:
        raise ValueError(f"rewards must have shape (batch,), got {tuple(r.shape)}")
    check_positive("beta", beta)
    if isinstance(baseline, str):
        check_choice("baseline", baseline, ("mean",), also="None, a number or a tensor")
        a = r - r.mean()
    elif baseline is None:
        a = r
    else:
        a = r - torch.as_tensor(baseline, dtype=r.dtype)
    w = torch.exp(beta * a)
    if w_max is not None:
        check_positive("w_max", w_max, finite=False)  # or None
        w = w.clamp(max=w_max)
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(f"DRWR weights overflow (beta={beta} times rewards up to {float(a.max()):g}); "
                                 "set w_max or use an advantage baseline")
    return w


def drwr_loss(predictor, x0: Tensor, weights: Tensor, *, generator: torch.Generator | None = None, t=None,
              t_sampler=None, eps: Tensor | None = None, cond=None, weighting="none",
              reduction: str = "mean") -> Tensor:
    """DRWR, handbook Sec. 3.3.2: ``E_{x, eps, t}[ w(x) ||eps - eps_theta(x_t, t)||^2 ]`` on samples ``x``.

    ``x0`` are samples (of the current or an older model) and ``weights = drwr_weights(R(x0), beta, ...)``.
    The per-sample term is ``denoising_loss(target="eps", reduction="none")`` (same ``t``/noise conventions).
    """
    x0 = _check_x(x0, "x0")
    w = torch.as_tensor(weights).detach()
    if w.shape != (x0.shape[0],) or bool((w < 0).any()):
        raise ValueError(f"weights must be a ({x0.shape[0]},) tensor of non-negative numbers, got shape "
                         f"{tuple(w.shape)}")
    per = denoising_loss(predictor, x0, generator=generator, t=t, t_sampler=t_sampler, eps=eps, target="eps",
                         weighting=weighting, cond=cond, reduction="none")
    return reduce_loss(w.to(per.dtype) * per, reduction, "drwr_loss")
