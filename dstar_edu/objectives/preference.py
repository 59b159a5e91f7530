"""Preference optimisation (Wang talk, "Human Preference Learning"): the KL-regularised optimum, DPO and its
implicit reward, Diffusion-DPO, Diffusion-NPO.

Wang talk, DPO slides::

    max_pi E_{y ~ pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x))
    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)
    r*(x, y) = beta log pi*(y|x) / pi_ref(y|x) + beta log Z(x)
    p*(y1 > y2 | x) = sigmoid(beta log pi*(y1|x)/pi_ref(y1|x) - beta log pi*(y2|x)/pi_ref(y2|x))

so the Bradley-Terry likelihood of preference pairs is a loss on the policy itself (DPO):
``-log sigmoid(h_w - h_l)`` with the implicit reward ``h = beta log pi_theta / pi_ref``. Diffusion-DPO
(Wallace et al. 2024) replaces the intractable ``log pi_theta(x0)`` of a diffusion model by its denoising
ELBO, giving ``h(x0) = -beta w(t) (||eps - eps_theta(x_t, t)||^2 - ||eps - eps_ref(x_t, t)||^2)`` at a random
``t`` (the paper's ``beta T omega(lambda_t)`` is this ``beta * w(t)``). Diffusion-NPO (Wang talk) trains the
*negative* model with "one line of code": swap the pairs (DPO) or use ``R_NPO = 1 - R`` (reward methods,
``rewards.NegatedReward``), then guide with ``(omega + 1) eps_pos(x, c) - omega eps_neg(x, c)``.

Distributions over a finite set are given by log-probabilities on the last axis; Gaussian helpers
give closed forms for the exact checks (``dstar_edu/verify/checks/alignment.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import check_positive
from .common import draw_times, reduce_loss
from .pretrain import denoising_loss

Tensor = torch.Tensor

__all__ = ["kl_regularized_objective", "kl_regularized_optimum", "kl_optimum_log_partition", "gaussian_kl_optimum",
           "dpo_implicit_reward", "bradley_terry_prob", "dpo_loss", "npo_swap", "diffusion_dpo_implicit_reward",
           "diffusion_dpo_loss", "diffusion_npo_loss", "npo_guided_eps"]


def _beta(beta) -> float:
    check_positive("beta", beta)  # the KL weight / temperature
    return float(beta)


def _logp(logp, name: str) -> Tensor:
    t = torch.as_tensor(logp)
    if not t.is_floating_point() or t.ndim < 1:
        raise ValueError(f"{name} must be a floating tensor of log-probabilities (..., K)")
    total = torch.logsumexp(t, -1)
    if bool(((total.abs()) > 1e-6).any()):
        raise ValueError(f"{name} is not normalised: logsumexp over the last axis is "
                         f"{total.flatten()[:4].tolist()} (must be 0)")
    return t


# ---- the KL-regularised optimum (Wang talk) ------------------------------------------------------------------
def kl_regularized_objective(log_pi: Tensor, log_ref: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``J(pi) = E_pi[r] - beta KL(pi || pi_ref)`` for distributions on a finite set (last axis)."""
    log_pi, log_ref = _logp(log_pi, "log_pi"), _logp(log_ref, "log_ref")
    r = torch.as_tensor(rewards, dtype=log_pi.dtype)
    pi = log_pi.exp()
    return (pi * r).sum(-1) - _beta(beta) * (pi * (log_pi - log_ref)).sum(-1)


def kl_regularized_optimum(log_ref: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``log pi* = log pi_ref + r / beta - log Z`` (Wang talk): the maximiser of ``kl_regularized_objective``."""
    log_ref = _logp(log_ref, "log_ref")
    return F.log_softmax(log_ref + torch.as_tensor(rewards, dtype=log_ref.dtype) / _beta(beta), -1)


def kl_optimum_log_partition(log_ref: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``log Z = log E_{pi_ref}[exp(r / beta)]``; ``max_pi J(pi) = beta log Z`` (Gibbs variational principle)."""
    log_ref = _logp(log_ref, "log_ref")
    return torch.logsumexp(log_ref + torch.as_tensor(rewards, dtype=log_ref.dtype) / _beta(beta), -1)


def gaussian_kl_optimum(mean: Tensor, cov: Tensor, b: Tensor, A: Tensor | None = None, beta: float = 1.0
                        ) -> tuple[Tensor, Tensor]:
    """``pi* ∝ N(mean, cov) exp(r / beta)`` for the concave quadratic reward ``r(x) = b^T x - x^T A x / 2``.

    ``pi* = N(m*, S*)`` with ``S* = (cov^-1 + A / beta)^-1`` and ``m* = S* (cov^-1 mean + b / beta)``
    (``A = None`` is a linear reward: the optimum is the reference shifted by ``cov b / beta``).
    """
    beta = _beta(beta)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    D = mean.numel()
    if cov.shape != (D, D):
        raise ValueError(f"cov has shape {tuple(cov.shape)}; expected ({D}, {D})")
    b = torch.as_tensor(b, dtype=torch.float64).reshape(D)
    A = torch.zeros(D, D, dtype=torch.float64) if A is None else torch.as_tensor(A, dtype=torch.float64)
    prec = torch.linalg.inv(cov) + A / beta
    if bool((torch.linalg.eigvalsh(0.5 * (prec + prec.T)) <= 0).any()):
        raise ValueError("cov^-1 + A / beta is not positive definite: exp(r / beta) is not integrable "
                         "against the reference (A must not be too negative)")
    S = torch.linalg.inv(prec)
    return S @ (torch.linalg.solve(cov, mean) + b / beta), S


# ---- DPO -----------------------------------------------------------------------------------------------------
def dpo_implicit_reward(logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``h = beta log pi_theta(y) / pi_ref(y)``; for ``pi_theta = pi*`` it equals
    ``r - beta log Z`` (Wang talk ``r*``), so differences of ``h`` are differences of ``r``."""
    return _beta(beta) * (torch.as_tensor(logp) - torch.as_tensor(ref_logp))


def bradley_terry_prob(r_1: Tensor, r_2: Tensor) -> Tensor:
    """``P(y1 > y2) = exp(r_1) / (exp(r_1) + exp(r_2)) = sigmoid(r_1 - r_2)`` (Bradley-Terry)."""
    return torch.sigmoid(torch.as_tensor(r_1) - torch.as_tensor(r_2))


def dpo_loss(logp_w: Tensor, logp_l: Tensor, ref_logp_w: Tensor, ref_logp_l: Tensor, beta: float,
             reduction: str = "mean") -> Tensor:
    """DPO (Wang talk): ``-log sigmoid(beta log pi/pi_ref (y_w) - beta log pi/pi_ref (y_l))`` per pair.

    ``y_w`` is the preferred sample. The gradient vanishes (in expectation over Bradley-Terry labels
    drawn from a reward ``r``) exactly at ``pi* = pi_ref exp(r / beta) / Z``.
    """
    h = dpo_implicit_reward(logp_w, ref_logp_w, beta) - dpo_implicit_reward(logp_l, ref_logp_l, beta)
    return reduce_loss(-F.logsigmoid(h), reduction, "dpo_loss")


def npo_swap(x_w, x_l):
    """Diffusion-NPO for preference pairs (Wang talk): ``r_NPO = (x_1, x_0, c)``, i.e. swap winner and loser."""
    return x_l, x_w


# ---- Diffusion-DPO / NPO ---------------------------------------------------------------------------------------
def diffusion_dpo_implicit_reward(model, reference, x0: Tensor, beta: float, *, t, eps: Tensor, cond=None,
                                  weighting="none", normalize_dims: bool = False) -> Tensor:
    """Per-sample Diffusion-DPO implicit reward at one ``(t, eps)``:
    ``h(x0) = -beta w(t) (||eps - eps_theta(x_t, t)||^2 - ||eps - eps_ref(x_t, t)||^2)``.

    The ELBO surrogate of ``beta log pi_theta(x0) / pi_ref(x0)`` (Wallace et al. 2024, Eq. 14 with
    ``beta T omega(lambda_t)`` written as ``beta w(t)``). The reference runs without gradient.
    """
    beta = _beta(beta)
    err = denoising_loss(model, x0, t=t, eps=eps, target="eps", weighting=weighting, cond=cond, reduction="none",
                         normalize_dims=normalize_dims)
    with torch.no_grad():
        err_ref = denoising_loss(reference, x0, t=t, eps=eps, target="eps", weighting=weighting, cond=cond,
                                 reduction="none", normalize_dims=normalize_dims)
    return -beta * (err - err_ref)


def diffusion_dpo_loss(model, reference, x0_w: Tensor, x0_l: Tensor, *, beta: float, t=None, t_sampler=None,
                       eps_w: Tensor | None = None, eps_l: Tensor | None = None,
                       generator: torch.Generator | None = None, cond=None, weighting="none",
                       normalize_dims: bool = False, reduction: str = "mean") -> Tensor:
    """Diffusion-DPO (Wallace et al. 2024; Wang talk): ``-log sigmoid(h(x0_w) - h(x0_l))`` with
    ``diffusion_dpo_implicit_reward`` at a shared time ``t`` per pair.

    Defaults follow Wallace et al.'s code: one ``t`` per pair (drawn with ``t_sampler``/``generator``) and
    the *same* noise for winner and loser (``eps_l = eps_w``). ``beta`` includes the paper's ``T``.
    """
    if not isinstance(x0_w, Tensor) or not isinstance(x0_l, Tensor) or x0_w.shape != x0_l.shape:
        raise ValueError(f"x0_w and x0_l must be tensors of the same shape, got "
                         f"{tuple(getattr(x0_w, 'shape', ()))} and {tuple(getattr(x0_l, 'shape', ()))}")
    if getattr(model, "process", None) is None:
        raise ValueError(f"model must be a dstar_edu predictor with a .process, got {type(model).__name__}")
    t = draw_times(model.process, x0_w, t, t_sampler, generator)
    if eps_w is None:
        eps_w = torch.randn(x0_w.shape, generator=generator, dtype=x0_w.dtype, device=x0_w.device)
    eps_l = eps_w if eps_l is None else eps_l
    kw = dict(t=t, cond=cond, weighting=weighting, normalize_dims=normalize_dims)
    h_w = diffusion_dpo_implicit_reward(model, reference, x0_w, beta, eps=eps_w, **kw)
    h_l = diffusion_dpo_implicit_reward(model, reference, x0_l, beta, eps=eps_l, **kw)
    return reduce_loss(-F.logsigmoid(h_w - h_l), reduction, "diffusion_dpo_loss")


def diffusion_npo_loss(model, reference, x0_w: Tensor, x0_l: Tensor, **kwargs) -> Tensor:
    """Diffusion-NPO (Wang talk): Diffusion-DPO on swapped pairs, ``diffusion_dpo_loss(model, ref, x0_l, x0_w)``.

    With shared ``t`` and noise, ``exp(-L_DPO) + exp(-L_NPO) = 1`` per pair (``sigmoid(h) + sigmoid(-h) = 1``).
    """
    x_w, x_l = npo_swap(x0_w, x0_l)
    return diffusion_dpo_loss(model, reference, x_w, x_l, **kwargs)


def npo_guided_eps(eps_pos: Tensor, eps_neg: Tensor, omega: float) -> Tensor:
    """NPO guidance (Wang talk): ``eps^omega = (omega + 1) eps_pos(x_t, c) - omega eps_neg(x_t, c')``.

    With ``eps_neg`` the unconditional branch of the same model this is classifier-free guidance,
    ``grad log p(x|c) + omega grad log [p(x|c) / p(x|c')]`` in score form.
    """
    if eps_pos.shape != eps_neg.shape:
        raise ValueError(f"eps_pos has shape {tuple(eps_pos.shape)} but eps_neg has shape {tuple(eps_neg.shape)}")
    return (omega + 1) * eps_pos - omega * eps_neg
