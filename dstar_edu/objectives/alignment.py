"""Preference alignment of one-step generators: Diff-Instruct++ (KL-PPO) and Diff-Instruct* (score-divergence
PPO), with classifier-free guidance as an implicit reward (Luo talk Diff-Instruct++ Thm 3.1, 3.3, Alg. 1;
DI* paper Thm 3.1, 3.2, Sec. 3.3, Alg. 1).

Both maximise ``E_{x0 ~ p_theta}[alpha_rew r(x0, c)]`` while keeping the one-step generator ``x0 = g_theta(z)``
close to a reference diffusion model ``s_ref``; they differ in the regulariser (DI* Eq. 3.1):

* **DI++** (KL, Luo talk Eq. 3.1): ``L = E[-alpha_rew r] + KL``; with the integral KL of Diff-Instruct the
  gradient is ``-alpha_rew grad_x r dx0/dtheta + w (s_psi(x_t) - s_ref(x_t)) dx_t/dtheta`` (Luo talk Thm 3.1
  at every t, Alg. 1 Eq. 3.3-3.4). The KL part *is* ``distill.diff_instruct_loss``.
* **DI*** (score divergence, DI* Eq. 3.2-3.4): ``L = E[-alpha_rew r] + D^[0,T]`` whose tractable loss (3.4)
  *is* SIM's generator loss ``distill.sim_generator_loss`` (pseudo-Huber distance by default, Eq. 3.8).

CFG enters two ways (DI* Sec. 3.3), both with scale ``alpha_cfg``:

* ``cfg="in"`` (DI*-In, "CFG-enhanced reference"): the reference score becomes
  ``s_ref(x_t|c) + alpha_cfg (s_ref(x_t|c) - s_ref(x_t|uncond))`` (:class:`GuidedPredictor`). The DI* text
  prints ``s_ref(x_t|t,c) + alpha_cfg (s_ref(x_t|t, uncond))``, dropping ``s_ref(x_t|t,c) -`` inside the
  bracket (erratum ``align.distar_in_reference``).
* ``cfg="out"`` (DI*-Out, "implicit CFG reward"): ``alpha_cfg`` times the CFG loss (DI* Eq. 3.6),
  whose gradient is that of the negative implicit reward ``-r_cfg = -int w E log p_ref(x_t|c)/p_ref(x_t)``
  (DI* Eq. 3.7). As printed, Eq. 3.6 (and the last line of Alg. 1 Eq. 3.5) has the wrong sign: its
  gradient is that of ``+r_cfg``; ``cfg_implicit_reward_loss`` implements
  ``-w <sg(s_ref(x_t|c) - s_ref(x_t|uncond)), x_t>`` (erratum ``align.distar_cfg_sign``).

With the KL regulariser both ways are *the same gradient* (Luo talk Thm 3.3: ``-r_cfg + beta KL`` has the
gradient ``beta w (s_theta - s~^beta_ref) dx_t/dtheta`` with ``s~^beta = s(.|uncond) + (1 + 1/beta)(s(.|c) -
s(.|uncond))``, i.e. ``alpha_cfg = 1/beta``); with a score divergence they differ.

Scale conventions (written once): ``alpha_cfg`` is the *extra* guidance ``w`` of ``s_c + w (s_c - s_u)`` (the
handbook's Eq. 23 convention, the Wang talk's ``omega``). DI++ Alg. 1 (Eq. 3.5) writes the guided reference
as ``s_u + alpha'_cfg (s_c - s_u)``: its ``alpha'_cfg`` is ``1 + alpha_cfg`` here. The KL weight is 1 (Alg. 1);
the talk's ``beta`` corresponds to ``alpha_rew = 1/beta``, ``alpha_cfg = 1/beta`` (loss divided by beta).
"""
from __future__ import annotations

import torch

from ..predictors import Predictor
from ..process import Process
from ..validation import check_batch, check_choice, check_finite, check_type
from .common import DISTILL_HINT, noisy_batch, reduce_loss, sample_weight
from .distill import diff_instruct_loss, sim_generator_loss

Tensor = torch.Tensor

__all__ = ["GuidedPredictor", "cfg_implicit_reward", "cfg_implicit_reward_loss", "diff_instruct_pp_loss",
           "diff_instruct_star_loss", "CFG_MODES"]

CFG_MODES = ("in", "out")


def _scale(v, name: str) -> float:
    check_finite(name, v)
    return float(v)


def _process(pred, role: str) -> Process:
    process = getattr(pred, "process", None)
    if not isinstance(process, Process) or not hasattr(pred, "predict"):
        raise ValueError(f"{role}={type(pred).__name__} must be a dstar_edu predictor with .process and .predict")
    return process


def _cat_conds(cond, uncond, n: int):
    """``cond`` and ``uncond`` stacked along the batch (tensors with ``n`` rows or one row broadcast; dicts key
    by key; equal non-tensors pass through)."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(cond) != set(uncond):
            raise ValueError(f"batched guidance needs cond and uncond dicts with the same keys, got "
                             f"{sorted(cond) if isinstance(cond, dict) else cond!r} and "
                             f"{sorted(uncond) if isinstance(uncond, dict) else uncond!r}")
        return {k: _cat_conds(cond[k], uncond[k], n) for k in cond}
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        c = cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond
        u = uncond.expand(n, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
        return torch.cat([c, u])
    if cond is None and uncond is None:
        return None
    raise ValueError(f"batched guidance cannot stack cond {type(cond).__name__} with uncond "
                     f"{type(uncond).__name__}; use batched=False")


class GuidedPredictor(Predictor):
    """Classifier-free guided predictor ``out(x_t, t, c) + scale (out(x_t, t, c) - out_neg(x_t, t, uncond))``.

    DI*-In's CFG-enhanced reference (DI* Sec. 3.3, corrected), DI++'s modified reference (Luo talk Eq. 3.5 /
    Thm 3.3 with ``1 + scale`` as their guidance scale), handbook Eq. 23, and with a separately trained
    ``negative`` model Diffusion-NPO's guidance ``(omega + 1) eps_pos - omega eps_neg`` (Wang talk). The
    combination has weights summing to one, so it is the same guidance in every parameterisation (eps, x0,
    score, v, ...): the wrapper keeps the base predictor's ``prediction``.

    ``cond=None`` at call time is rejected: guidance needs a condition. ``uncond`` is what the base model
    takes as "no condition" (``None`` for ``MLPPredictor``'s null label and for exact mixtures; the
    empty-prompt embedding for a text-conditional UNet).

    ``batched=True`` evaluates ``cond`` and ``uncond`` in one call of the base predictor on the doubled batch
    (tensors concatenated along dim 0, dicts key by key; ``None`` entries must match): one network pass
    instead of two, as diffusers' pipelines do. Needs ``negative=None`` and conditions of equal structure.
    """

    def __init__(self, predictor: Predictor, scale: float, *, uncond=None, negative: Predictor | None = None,
                 batched: bool = False):
        process = _process(predictor, "predictor")
        super().__init__(process, predictor.prediction)
        if negative is not None:
            nproc = _process(negative, "negative")
            if repr(nproc) != repr(process) or negative.prediction != predictor.prediction:
                raise ValueError(f"negative must share the process and prediction of predictor "
                                 f"({process}, {predictor.prediction!r}), got ({nproc}, {negative.prediction!r})")
        self.base = predictor
        self.negative = negative
        self.scale = _scale(scale, "scale")
        self.uncond = uncond
        check_type("batched", batched, bool, "True or False")
        if batched and negative is not None:
            raise ValueError("batched=True needs negative=None (one network evaluates both conditions)")
        self.batched = batched

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        if cond is None:
            raise ValueError("GuidedPredictor needs cond (the condition to guide towards); got cond=None")
        if self.batched and self.scale != 0:
            n = x_t.shape[0]
            t2 = torch.as_tensor(t)
            t2 = torch.cat([t2, t2]) if t2.ndim == 1 else t2
            both = self.base(torch.cat([x_t, x_t]), t2, _cat_conds(cond, self.uncond, n))
            out_c, out_u = both[:n], both[n:]
            return out_c + self.scale * (out_c - out_u)
        out_c = self.base(x_t, t, cond)
        if self.scale == 0:
            return out_c
        neg = self.base if self.negative is None else self.negative
        out_u = neg(x_t, t, self.uncond)
        return out_c + self.scale * (out_c - out_u)

    def __repr__(self):
        return (f"GuidedPredictor({type(self.base).__name__}, scale={self.scale:g}"
                f"{', negative=' + type(self.negative).__name__ if self.negative is not None else ''})")


def cfg_implicit_reward(reference, x_t: Tensor, t, cond, uncond=None) -> Tensor:
    """The integrand of the CFG implicit reward (DI* Eq. 3.7, Luo talk Eq. 3.8): ``log p_ref(x_t|t,c) - log p_ref(x_t|t)``.

    Needs a reference with an exact ``log_prob(x_t, t, cond)`` (e.g. a class-conditional
    ``toy_data.mixtures.GaussianMixture``); per sample, shape ``(batch,)``.
    """
    if not hasattr(reference, "log_prob"):
        raise ValueError(f"reference={type(reference).__name__} has no exact log_prob(x_t, t, cond); the implicit "
                         "reward is only computable for exact models (its gradient is what CFG uses)")
    return reference.log_prob(x_t, t, cond) - reference.log_prob(x_t, t, uncond)


def cfg_implicit_reward_loss(x0: Tensor, reference, t, *, cond, uncond=None, eps: Tensor | None = None,
                             generator: torch.Generator | None = None, weight=None,
                             reduction: str = "mean") -> Tensor:
    """DI* Thm 3.2 (corrected sign) / Luo talk Thm 3.3: a loss whose theta-gradient is that of the negative
    implicit CFG reward ``-r_cfg = -E w(t) log p_ref(x_t|t,c) / p_ref(x_t|t)`` (DI* Eq. 3.7).

    ``L_cfg = -E[ w(t) <sg[s_ref(x_t|t,c) - s_ref(x_t|t,uncond)], x_t> ]`` with ``x_t = alpha g_theta(z) +
    sigma eps``: the scores are evaluated at ``sg[x_t]`` (no gradient), ``x_t`` carries theta. DI* Eq. 3.6
    prints it with a ``+`` sign, which ascends ``-r_cfg`` (pushes samples *away* from the condition):
    erratum ``align.distar_cfg_sign``. Only the gradient is meaningful, not the value.
    """
    x0 = check_batch(x0, "x0", nonempty=True)
    process = _process(reference, "reference")
    if cond is None:
        raise ValueError("cfg_implicit_reward_loss needs cond (the condition of the implicit reward); got None")
    nb = noisy_batch(x0, process, t, eps, generator)
    t, x_t = nb.t, nb.x_t
    w = sample_weight(weight, t, x0.shape[0], x0.dtype)
    with torch.no_grad():
        xd = x_t.detach()
        g = reference.predict("score", xd, t, cond) - reference.predict("score", xd, t, uncond)
    per = -w * (g * x_t).reshape(x0.shape[0], -1).sum(1)
    return reduce_loss(per, reduction, "cfg_implicit_reward_loss", DISTILL_HINT)


def _reward_term(reward, x0: Tensor, reward_cond, alpha_rew: float) -> tuple[Tensor, Tensor | None]:
    if reward is None or alpha_rew == 0:
        return x0.new_zeros(()), None
    if not callable(reward):
        raise ValueError(f"reward must be callable r(x, cond) -> (batch,), got {type(reward).__name__}")
    if getattr(reward, "differentiable", True) is False:
        raise ValueError(f"{type(reward).__name__} is not differentiable; DI++ / DI* need grad_x r (Thm 3.1)")
    r = reward(x0, reward_cond)
    if not isinstance(r, Tensor) or r.shape != (x0.shape[0],):
        raise ValueError(f"the reward returned shape {tuple(getattr(r, 'shape', ()))}; expected ({x0.shape[0]},)")
    return -alpha_rew * r.mean(), r.detach()


def _prepare(x0, reference, fake, t, eps, generator, cfg, alpha_rew, alpha_cfg, cond):
    x0 = check_batch(x0, "x0", nonempty=True)
    _process(reference, "reference")
    _process(fake, "fake")
    check_choice("cfg", cfg, CFG_MODES)  # in: CFG-enhanced reference (DI*-In); out: implicit CFG reward loss (DI*-Out)
    alpha_rew, alpha_cfg = _scale(alpha_rew, "alpha_rew"), _scale(alpha_cfg, "alpha_cfg")
    if alpha_cfg != 0 and cond is None:
        raise ValueError(f"alpha_cfg={alpha_cfg} needs cond (classifier-free guidance guides towards a condition)")
    if t is None:
        raise ValueError("t is required: the (batch,) times of the generator loss")
    if eps is None:  # one noise for every term (DI* Alg. 1 uses the same x_t for all of them)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return x0, eps, alpha_rew, alpha_cfg


def _finish(parts: dict, return_parts: bool, what: str):
    loss = sum(v for v in parts.values())
    if not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(f"{what} is not finite (terms: {[k for k, v in parts.items() if not torch.isfinite(v.detach())]})")
    if return_parts:
        return loss, {k: float(v.detach()) for k, v in parts.items()}
    return loss


def diff_instruct_pp_loss(x0: Tensor, reference, fake, t, *, reward=None, alpha_rew: float = 1.0,
                          alpha_cfg: float = 0.0, cfg: str = "in", cond=None, uncond=None, reward_cond=None,
                          eps: Tensor | None = None, generator: torch.Generator | None = None, weight=None,
                          return_parts: bool = False):
    """Diff-Instruct++ generator loss (Luo talk Thm 3.1, Thm 3.3, Alg. 1 Eq. 3.3-3.5): KL-regularised online PPO.

    Gradient: ``-alpha_rew grad_x r(x0, c) dx0/dtheta + w(t) (s_psi(x_t|c) - s~_ref(x_t|c)) dx_t/dtheta`` with
    ``s~_ref = s_ref(.|c) + alpha_cfg (s_ref(.|c) - s_ref(.|uncond))`` (``cfg="in"``), or the same with the
    plain conditional reference plus ``alpha_cfg * cfg_implicit_reward_loss`` (``cfg="out"``): equal
    gradients (Luo talk Thm 3.3). The KL part is ``distill.diff_instruct_loss`` (detached score difference).

    Args:
        x0: generator samples ``g_theta(z, c)`` with gradient to theta.
        reference: the pre-trained (conditional) diffusion model ``s_ref``; fake: the assistant ``s_psi``.
        t: ``(batch,)`` times with ``sigma(t) > 0``; ``eps``: forward noise (drawn from ``generator`` if None).
        reward: differentiable ``r(x, reward_cond)`` (``reward_cond`` defaults to ``cond``); ``alpha_rew``
            its scale. ``alpha_cfg``: CFG scale (see the module docstring), ``uncond``: the null condition.
        weight: ``w(t)``: None, a number, a ``(batch,)`` tensor or a callable.
        return_parts: also return a dict of the terms' values (``reward`` is ``-alpha_rew mean r``).
    """
    x0, eps, alpha_rew, alpha_cfg = _prepare(x0, reference, fake, t, eps, generator, cfg, alpha_rew, alpha_cfg, cond)
    teacher = GuidedPredictor(reference, alpha_cfg, uncond=uncond) if (cfg == "in" and alpha_cfg != 0) else reference
    parts = {"kl": diff_instruct_loss(x0, teacher, fake, t, eps=eps, weight=weight, cond=cond)}
    if cfg == "out" and alpha_cfg != 0:
        parts["cfg"] = alpha_cfg * cfg_implicit_reward_loss(x0, reference, t, cond=cond, uncond=uncond, eps=eps,
                                                            weight=weight)
    rterm, _ = _reward_term(reward, x0, cond if reward_cond is None else reward_cond, alpha_rew)
    parts["reward"] = rterm
    return _finish(parts, return_parts, "diff_instruct_pp_loss")


def diff_instruct_star_loss(x0: Tensor, reference, fake, t, *, reward=None, alpha_rew: float = 1.0,
                            alpha_cfg: float = 0.0, cfg: str = "in", distance="pseudo_huber", c: float | None = None,
                            cond=None, uncond=None, reward_cond=None, eps: Tensor | None = None,
                            generator: torch.Generator | None = None, weight=None, return_parts: bool = False,
                            space: str = "score", batched_cfg: bool = False, **distance_params):
    """Diff-Instruct* generator loss (DI* Eq. 3.4 / Alg. 1 Eq. 3.5, Thm 3.1-3.2): score-divergence online PPO.

    ``L = -alpha_rew E r(x0, c) + E w(t) (-d'(y_t))^T (s_psi(x_t|c) - grad log p_t(x_t|x0))`` with
    ``y_t = s_psi(x_t|c) - s~_ref(x_t|c)``: the second term is exactly ``distill.sim_generator_loss`` with the
    reference as teacher (``x_t`` carries theta into both frozen networks' inputs and into ``d'(y_t)``, SIM
    Thm 3.1 / DI* Thm 3.1). ``cfg="in"`` (DI*-In): ``s~_ref = s_ref(.|c) + alpha_cfg (s_ref(.|c) -
    s_ref(.|uncond))``; ``cfg="out"`` (DI*-Out): ``s~_ref = s_ref(.|c)`` plus ``alpha_cfg *
    cfg_implicit_reward_loss`` (DI* Eq. 3.6, corrected sign) on the same ``x_t``.

    ``distance``: a ``divergences`` name or ``ScoreDistance`` (pseudo-Huber by default, DI* Eq. 3.8; ``c``
    defaults to ``0.00054 sqrt(D)``), ``**distance_params`` its ``alpha``/``beta``/``delta``. Other
    arguments as in :func:`diff_instruct_pp_loss`. ``space``: the divergence in score space (``"score"``, DI*
    Eq. 3.4, the default) or denoiser space (``"x0"``, SIM Alg. 2 / Eq. B.13), as in ``sim_generator_loss``.
    ``batched_cfg``: DI*-In's cond and uncond reference passes in one batch (``GuidedPredictor(batched=True)``).
    """
    x0, eps, alpha_rew, alpha_cfg = _prepare(x0, reference, fake, t, eps, generator, cfg, alpha_rew, alpha_cfg, cond)
    teacher = (GuidedPredictor(reference, alpha_cfg, uncond=uncond, batched=batched_cfg)
               if (cfg == "in" and alpha_cfg != 0) else reference)
    parts = {"divergence": sim_generator_loss(x0, teacher, fake, t, eps=eps, distance=distance, c=c, weight=weight,
                                              cond=cond, space=space, **distance_params)}
    if cfg == "out" and alpha_cfg != 0:
        parts["cfg"] = alpha_cfg * cfg_implicit_reward_loss(x0, reference, t, cond=cond, uncond=uncond, eps=eps,
                                                            weight=weight)
    rterm, _ = _reward_term(reward, x0, cond if reward_cond is None else reward_cond, alpha_rew)
    parts["reward"] = rterm
    return _finish(parts, return_parts, "diff_instruct_star_loss")
