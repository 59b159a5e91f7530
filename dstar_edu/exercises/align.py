"""Exercises on preference alignment (DI* Thm 3.2, Sec. 3.3; Luo talk Thm 3.3; Wang talk DPO; DRWR).

    >>> from dstar_edu import exercises
    >>> exercises.list_exercises("align")
    ['cfg_implicit_reward_loss', 'guided_score', 'dpo_loss', 'drwr_weights']
    >>> exercises.describe("cfg_implicit_reward_loss")
    >>> exercises.check("cfg_implicit_reward_loss", my_cfg_loss)

``cfg_implicit_reward_loss`` is graded by its *gradient*: the student's loss is evaluated on
``x_t = alpha g_theta(z) + sigma eps`` of an affine generator, and its theta-gradient must equal the exact
gradient of the negative implicit CFG reward ``-mean w(t) log p_t(x_t|c) / p_t(x_t)`` (DI* Eq. 3.7),
computed by autograd of the exact class-conditional mixture log-densities (the ``align.distar_cfg_sign``
check). The other three are graded by value on random float64 inputs; the catalogued mistakes include the
forms the papers print (the sign of DI* Eq. 3.6, DI*-In's reference, the handbook's DRWR weight).
Reference solutions call ``dstar_edu.objectives``.
"""
from __future__ import annotations

import math

import torch

from ..process import DDPM
from .core import Exercise, GradientTrial, Trial, batch_label, flat_grad, over_dims, register

Tensor = torch.Tensor

__all__ = ["TRIAL_DIMS"]

#: trial dimensions, cycled: 2D points and CIFAR-shaped images through the same code
TRIAL_DIMS = (2, 3072, 2, 2, 3072)

_PROCESS = DDPM(1000)


# ---- reference solutions ------------------------------------------------------------------------------------
def _ref_cfg_loss(x_t, score, cond, weight):
    """DI* Eq. 3.6 with the corrected sign: -mean_i w_i <sg[s(x_t|c) - s(x_t|None)], x_t>."""
    xd = x_t.detach()
    g = (score(xd, cond) - score(xd, None)).detach()
    return -(weight * (g * x_t).reshape(x_t.shape[0], -1).sum(1)).mean()


def _ref_guided(score_cond, score_uncond, alpha_cfg):
    """The formula of ``objectives.alignment.GuidedPredictor.forward`` (tested equal in tests/test_alignment.py)."""
    return score_cond + alpha_cfg * (score_cond - score_uncond)


def _ref_dpo(logp_w, logp_l, ref_logp_w, ref_logp_l, beta):
    from ..objectives.preference import dpo_loss
    return dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta)


def _ref_drwr(rewards, beta, w_max):
    from ..objectives.reward_finetune import drwr_weights
    return drwr_weights(rewards, beta, w_max=w_max)


# ---- inputs ---------------------------------------------------------------------------------------------------
def _cfg_setup(dim: int, g: torch.Generator):
    """Class-conditional exact reference, an affine generator and one batch (x_t carries theta)."""
    from ..generators import AffineGaussianGenerator
    from toy_data.mixtures import GaussianMixture
    f64 = torch.float64
    if dim == 2:
        means = 1.5 * torch.randn(4, 2, generator=g, dtype=f64)
        mix = GaussianMixture(means, 0.05 + 0.2 * torch.rand(4, generator=g, dtype=f64), labels=[0, 0, 1, 1],
                              process=_PROCESS)
        gen = AffineGaussianGenerator(2, mean=0.3 * torch.randn(2, generator=g, dtype=f64),
                                      A=torch.eye(2, dtype=f64) + 0.2 * torch.randn(2, 2, generator=g, dtype=f64))
        B, shape = 16, (2,)
    else:
        shape = (3, 32, 32)
        means = torch.rand(6, *shape, generator=g, dtype=f64) * 2 - 1
        mix = GaussianMixture(means, 0.05, labels=[0, 1, 0, 1, 0, 1], process=_PROCESS)
        gen = AffineGaussianGenerator(shape, mean=0.2 * torch.randn(shape, generator=g, dtype=f64),
                                      A=0.3 + 0.1 * torch.rand(dim, generator=g, dtype=f64))
        B = 4
    z = gen.noise(B, g)
    eps = torch.randn((B, *shape), generator=g, dtype=f64)
    t = torch.randint(300 if dim > 2 else 50, 950, (B,), generator=g).to(f64)
    return mix, gen, z, eps, t, _PROCESS.sigma(t) ** 2


def _value_inputs(name: str, dim: int, g: torch.Generator) -> dict:
    f64 = torch.float64
    if name == "guided_score":
        shape = (6, 2) if dim == 2 else (2, 3, 32, 32)
        return {"score_cond": torch.randn(shape, generator=g, dtype=f64),
                "score_uncond": torch.randn(shape, generator=g, dtype=f64),
                "alpha_cfg": float(0.5 + 4 * torch.rand((), generator=g))}
    n = 8
    if name == "drwr_weights":
        return {"rewards": 2 * torch.rand(n, generator=g, dtype=f64) - 0.5,
                "beta": float(0.5 + 2 * torch.rand((), generator=g)), "w_max": 3.0}
    return {"logp_w": -5 * torch.rand(n, generator=g, dtype=f64), "logp_l": -5 * torch.rand(n, generator=g, dtype=f64),
            "ref_logp_w": -5 * torch.rand(n, generator=g, dtype=f64),
            "ref_logp_l": -5 * torch.rand(n, generator=g, dtype=f64),
            "beta": float(0.1 + torch.rand((), generator=g))}


def _cfg_trial(dim: int, g: torch.Generator) -> GradientTrial:
    """One batch of an affine generator; the exact gradient of the negative implicit reward is the answer."""
    mix, gen, z, eps, t, w = _cfg_setup(dim, g)
    params = list(gen.parameters())
    a, s = _PROCESS.coefficients(t, gen(z))

    def x_t():
        return a * gen(z) + s * eps

    def score(x, cond):
        return mix.score(x, t, cond)
    xx = x_t()
    expected = flat_grad(-(w * (mix.log_prob(xx, t, 1) - mix.log_prob(xx, t))).mean(), params)
    # the exact gradient goes through log-densities: allow their float64 rounding, propagated
    budget = 64 * torch.finfo(torch.float64).eps * float(mix.log_prob(xx.detach(), t).abs().max()) \
        * float(xx.detach().abs().max()) * float(w.max()) / math.sqrt(xx[0].numel())
    return GradientTrial(batch_label(dim, z.shape[0]), params, lambda fn: fn(x_t(), score, 1, w), expected,
                         atol=budget)


def _align(covers: str = "2D points and 3x32x32 images", **fields) -> Exercise:
    """An exercise of this area: value-graded on ``_value_inputs``, or gradient-graded on ``_cfg_trial``."""
    name = fields["name"]
    make = _cfg_trial if fields.get("graded_by") == "gradient" else lambda dim, g: Trial(_value_inputs(name, dim, g))
    return Exercise(area="align", draw=over_dims(TRIAL_DIMS, make), n_trials=3, covers=covers,
                    against="the negative implicit reward",
                    grading=("It is computed by autograd of the exact class-conditional mixture log-densities at "
                             "an affine generator's x_t."), **fields)


# ---- the exercises ------------------------------------------------------------------------------------------
register(_align(
    name="cfg_implicit_reward_loss",
    guards=('dstar_edu.objectives.alignment:cfg_implicit_reward_loss',),
    source="DI* Thm 3.2, Eq. 3.6-3.7 (corrected sign); Luo talk Thm 3.3",
    prompt=("Classifier-free guidance as an implicit reward. The implicit reward of a class (or prompt) c is "
            "r = E w(t) log p_ref(x_t|c) / p_ref(x_t) with x_t = alpha g_theta(z) + sigma eps (DI* Eq. 3.7). Its "
            "gradient needs only the two scores: grad_x log p(x|c)/p(x) = s(x|c) - s(x|None). Write a *loss* whose "
            "gradient with respect to the generator's parameters is the gradient of the NEGATIVE implicit reward "
            "(so that minimising it guides towards c), averaged over the batch: evaluate the two scores at the "
            "stopped-gradient x_t (they must not be differentiated), and let x_t itself carry the gradient. "
            "Return a scalar tensor."),
    args=(("x_t", "noisy generator samples (batch, *shape), carrying gradient to theta"),
          ("score", "callable score(x, cond) -> exact score of p_ref(x_t) at this t; cond=None is unconditional"),
          ("cond", "the condition (a class label)"),
          ("weight", "w(t) per sample, shape (batch,)")),
    returns="L = -mean_i w_i < sg[ s(x_t|c) - s(x_t|None) ], x_t >   (scalar)",
    return_note="a scalar tensor whose gradient is that of the batch-mean negative implicit reward",
    reference=_ref_cfg_loss,
    hint=("the gradient of -log p(x_t|c)/p(x_t) in x_t is -(s(x_t|c) - s(x_t|None)); a loss <sg[g], x_t> has the "
          "gradient g dx_t/dtheta, so put the minus sign in front and detach the scores (x_t.detach() inside "
          "score(...), or .detach() on their difference). DI* prints Eq. 3.6 with a plus sign: that ascends the "
          "negative reward."),
    graded_by="gradient",
    mistakes=(
        (lambda x_t, score, cond, weight: -_ref_cfg_loss(x_t, score, cond, weight),
         "this is DI* Eq. 3.6 *as printed* (plus sign): its gradient is that of +r, i.e. it pushes samples away "
         "from the condition. The corrected loss has a minus sign (erratum align.distar_cfg_sign)."),
        (lambda x_t, score, cond, weight: -(weight * ((score(x_t, cond) - score(x_t, None)) * x_t)
                                             .reshape(x_t.shape[0], -1).sum(1)).mean(),
         "the scores are differentiated too: evaluate them at sg[x_t] (x_t.detach()) so that only the factor x_t "
         "carries the gradient (DI* Thm 3.2's sg[x_t])."),
        (lambda x_t, score, cond, weight: -(weight * (score(x_t.detach(), cond).detach() * x_t)
                                             .reshape(x_t.shape[0], -1).sum(1)).mean(),
         "you used s(x_t|c) alone; the implicit reward is a log-ratio, so subtract the unconditional score."),
        (lambda x_t, score, cond, weight: -((score(x_t.detach(), cond) - score(x_t.detach(), None)).detach()
                                            * x_t).reshape(x_t.shape[0], -1).sum(1).mean(),
         "the time weight w(t) is missing (multiply each sample's term by weight)."),
        (lambda x_t, score, cond, weight: -(weight * ((score(x_t.detach(), cond) - score(x_t.detach(), None)).detach()
                                                      * x_t).reshape(x_t.shape[0], -1).sum(1)).sum(),
         "you sum over the batch; the loss is the batch *mean* (an expectation)."),
    )))

register(_align(
    name="guided_score",
    guards=('dstar_edu.objectives.alignment:GuidedPredictor.forward',),
    source="DI* Sec. 3.3 (DI*-In, corrected); Luo talk Eq. 3.5; handbook Eq. 23",
    prompt=("The CFG-enhanced reference of DI*-In. Given the conditional score s_c = s_ref(x_t|t,c), the "
            "unconditional s_u = s_ref(x_t|t,None) and the guidance scale alpha_cfg, return the guided score that "
            "DI*-In uses as its reference: the conditional score plus alpha_cfg times the CFG direction."),
    args=(("score_cond", "s_ref(x_t|t,c), shape (batch, *shape)"), ("score_uncond", "s_ref(x_t|t,None), same shape"),
          ("alpha_cfg", "the guidance scale (a float)")),
    returns="s_c + alpha_cfg (s_c - s_u)",
    return_note="the guided score, a torch.Tensor shaped like score_cond",
    reference=_ref_guided,
    hint=("the CFG direction is the gradient of the implicit reward, s_c - s_u; add alpha_cfg times it to s_c. "
          "Equivalently s_u + (1 + alpha_cfg)(s_c - s_u)."),
    graded_by="value",
    mistakes=(
        (lambda sc, su, a: sc + a * su,
         "this is DI* Sec. 3.3 as printed (s_c + alpha_cfg s_u): the bracket lost 's_c -' (erratum "
         "align.distar_in_reference); it is the score of p(x|c) p(x)^alpha_cfg, not of a guided model."),
        (lambda sc, su, a: su + a * (sc - su),
         "you used DI++ Alg. 1's convention s_u + alpha (s_c - s_u), whose guidance scale is 1 + alpha_cfg here."),
        (lambda sc, su, a: sc - a * (sc - su),
         "sign error: guidance moves *towards* the condition, + alpha_cfg (s_c - s_u)."),
    )))

register(_align(
    covers="",  # (batch,) vectors of log-probabilities / rewards
    name="dpo_loss",
    guards=('dstar_edu.objectives.preference:dpo_loss',),
    source="Wang talk (DPO: implicit reward beta log pi/pi_ref, Bradley-Terry)",
    prompt=("Direct preference optimisation. For a preferred sample y_w and a rejected y_l you get the policy's "
            "log-probabilities logp_w, logp_l and the reference's ref_logp_w, ref_logp_l (tensors of shape (batch,)). "
            "DPO's implicit reward is beta times the log-ratio of policy to reference (Wang talk); the "
            "Bradley-Terry model turns the two rewards into the likelihood that w beats l. Return the batch mean "
            "of the negative log-likelihood (a scalar)."),
    args=(("logp_w", "(batch,)"), ("logp_l", "(batch,)"), ("ref_logp_w", "(batch,)"), ("ref_logp_l", "(batch,)"),
          ("beta", "the KL weight (a float)")),
    returns="mean( -log sigmoid( beta (logp_w - ref_logp_w) - beta (logp_l - ref_logp_l) ) )",
    return_note="a scalar tensor: the batch-mean negative log-likelihood",
    reference=_ref_dpo,
    hint=("the Bradley-Terry likelihood of 'w beats l' is the sigmoid of the reward difference h_w - h_l; take "
          "its log with torch.nn.functional.logsigmoid (stable)."),
    hints=("h = beta (logp - ref_logp) for each of w and l; the loss is -logsigmoid(h_w - h_l), averaged.",),
    graded_by="value",
    mistakes=(
        (lambda lw, ll, rw, rl, b: -torch.nn.functional.logsigmoid(b * ((ll - rl) - (lw - rw))).mean(),
         "winner and loser are swapped: that is Diffusion-NPO's loss (Wang talk), which trains the *negative* model."),
        (lambda lw, ll, rw, rl, b: -torch.nn.functional.logsigmoid(b * (lw - ll)).mean(),
         "the reference log-probabilities are missing: the implicit reward is beta log(pi / pi_ref)."),
        (lambda lw, ll, rw, rl, b: -torch.nn.functional.logsigmoid((lw - rw) - (ll - rl)).mean(),
         "beta is missing."),
        (lambda lw, ll, rw, rl, b: torch.nn.functional.logsigmoid(b * ((lw - rw) - (ll - rl))).mean(),
         "sign error: the loss is the *negative* log-likelihood."),
    )))


register(_align(
    covers="",  # (batch,) vectors of log-probabilities / rewards
    name="drwr_weights",
    guards=('dstar_edu.objectives.reward_finetune:drwr_weights',),
    source="handbook Sec. 3.3.2 (DRWR, corrected); reward-weighted regression",
    prompt=("Diffusion reward-weighted regression weights each sample's denoising loss by a function of its reward "
            "R(x), clipped at w_max. Reward-weighted regression (Peters & Schaal 2007) uses the exponentiated "
            "reward, so that the regression's optimum is p_old(x) exp(beta R(x)) / Z: the KL-regularised optimum "
            "with temperature 1/beta. Given rewards (batch,), beta and w_max, return the weights (batch,)."),
    args=(("rewards", "R(x) per sample, shape (batch,)"), ("beta", "inverse temperature (a float)"),
          ("w_max", "clipping value (a float)")),
    returns="min(exp(beta R), w_max)",
    return_note="the weights, a tensor of shape (batch,)",
    reference=_ref_drwr,
    hint="exponentiate beta * R (torch.exp), then clip from above with torch.clamp(..., max=w_max).",
    graded_by="value",
    mistakes=(
        (lambda r, b, m: torch.clamp(math.exp(b) * r, max=m),
         "this is the handbook's printed weight min(e^beta R(x), w_max) (e^beta times R): it can be negative and "
         "its optimum is p_old R, not p_old exp(beta R) (erratum align.drwr_weight). Use exp(beta * R)."),
        (lambda r, b, m: torch.exp(b * r),
         "the clipping at w_max is missing."),
        (lambda r, b, m: torch.clamp(torch.exp(r / b), max=m),
         "beta is an inverse temperature here: exp(beta R), not exp(R / beta)."),
    )))
