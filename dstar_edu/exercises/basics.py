"""Exercises on the handbook's DDPM formulas (Sec. 2.2.1, 2.6; Eq. 7, 8/10, 18, Fig. 3), graded by value.

The trials are random float64 inputs: 2D points and 3x32x32 images, per-sample and shared times ``t`` of
``DDPM(T=1000)``. The hints and catalogued mistakes aim at the usual slips of each exercise (``alpha_bar_t``
vs per-step ``alpha_t``, a missing ``sqrt``, the sign of ``v``, ...).

    >>> from dstar_edu import exercises
    >>> exercises.list_exercises("basics")
    ['tweedie_x0', 'posterior_mean_ddpm', 'v_prediction', 'x0_from_v', 'score_from_eps']
    >>> exercises.describe("tweedie_x0")          # prompt + signature
    >>> exercises.check("tweedie_x0", my_tweedie)  # True / False, with a printed explanation

Reference solutions call ``dstar_edu.conversions``; the Eq. 8 posterior mean, which has no library
function, is written once here (``ddpm_posterior_mean``).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import conversions as cv
from ..process import DDPM
from .core import Exercise, Trial, register

Tensor = torch.Tensor

__all__ = ["ddpm_posterior_mean", "TRIAL_SHAPES", "SHARED_T_TRIAL"]

#: input shapes of the trials, cycled: 2D points and CIFAR-shaped images through the same code
TRIAL_SHAPES = ((8, 2), (3, 3, 32, 32), (64, 2), (2, 3, 32, 32), (5, 2))
#: trials with this index modulo len(TRIAL_SHAPES) use one shared t (0-d coefficients), the others one t per sample
SHARED_T_TRIAL = 3

_PROCESS = DDPM(1000)


def ddpm_posterior_mean(x_t: Tensor, x0_hat: Tensor, alpha_t: Tensor, alpha_bar_t: Tensor,
                        alpha_bar_prev: Tensor) -> Tensor:
    """Handbook Eq. 8/10: mean of ``q(x_{t-1} | x_t, x0)``,
    ``sqrt(ab_{t-1}) (1 - alpha_t) / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t``."""
    from ..samplers.diffusion import ddpm_posterior
    c_x0, c_xt, _ = ddpm_posterior(alpha_bar_t, alpha_bar_prev, alpha=alpha_t)
    return c_x0 * x0_hat + c_xt * x_t


# ---- random inputs ---------------------------------------------------------------------------------------
def _coefs(t: Tensor, shape: tuple[int, ...], shared: bool) -> dict[str, Tensor]:
    """DDPM coefficients at integer times ``t`` shaped to broadcast against ``(batch, *shape)``."""
    ti = t.long()
    view = (lambda c: c.reshape(())) if shared else (lambda c: c.reshape(-1, *[1] * (len(shape) - 1)))
    return {"alpha_t": view(_PROCESS.alphas[ti - 1]), "alpha_bar_t": view(_PROCESS.alpha_bars[ti]),
            "alpha_bar_prev": view(_PROCESS.alpha_bars[ti - 1])}


def _draw(trial: int, g: torch.Generator) -> dict[str, Tensor]:
    """Data-like x0, noise eps, times t (int in 1..T) and x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (Eq. 6)."""
    shape = TRIAL_SHAPES[trial % len(TRIAL_SHAPES)]
    shared = trial % len(TRIAL_SHAPES) == SHARED_T_TRIAL
    f64 = torch.float64
    if len(shape) == 2:
        x0 = 1.5 * torch.randn(shape, generator=g, dtype=f64)
    else:
        x0 = 2 * torch.rand(shape, generator=g, dtype=f64) - 1       # images in [-1, 1]
    eps = torch.randn(shape, generator=g, dtype=f64)
    t = torch.randint(2, _PROCESS.T + 1, (1 if shared else shape[0],), generator=g).to(f64)
    c = _coefs(t, shape, shared)
    ab = c["alpha_bar_t"]
    x_t = torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * eps
    # a network's eps_hat / x0_hat are imperfect: perturb the true ones so the answer is not x0 itself
    eps_hat = eps + 0.1 * torch.randn(shape, generator=g, dtype=f64)
    x0_hat = x0 + 0.1 * torch.randn(shape, generator=g, dtype=f64)
    return {"x0": x0, "eps": eps, "x_t": x_t, "eps_hat": eps_hat, "x0_hat": x0_hat, "t": t, **c}


def _basics(pick: Callable[[dict], dict], **fields) -> Exercise:
    """An exercise of this area: its arguments are ``pick(d)`` of a ``_draw`` ``d``."""
    def draw(trial: int, g: torch.Generator) -> Trial:
        d = _draw(trial, g)
        t = d["t"]
        times = f"one shared t = {int(t.item())}" if t.numel() == 1 else f"t = {[int(v) for v in t.tolist()][:8]}"
        return Trial(pick(d), times, times=t if t.numel() > 1 else None)
    return Exercise(area="basics", draw=draw, n_trials=len(TRIAL_SHAPES),
                    covers="2D points and 3x32x32 images, DDPM T=1000, several t",
                    call_note=(" with float64 torch tensors; the coefficients already broadcast against x "
                               "(use torch.sqrt, not math.sqrt)"),
                    shape_note=("A larger shape usually means a coefficient was reshaped or indexed so that it "
                                "broadcasts along a new axis: use the coefficients exactly as given."),
                    return_note="a torch.Tensor of the same shape as the first argument", **fields)


# ---- the exercises ---------------------------------------------------------------------------------------
_AB = "DDPM alpha_bar_t, a tensor that broadcasts against x_t (shape (batch, 1, ...) or 0-d)"

register(_basics(
    name="tweedie_x0",
    guards=('dstar_edu.conversions:x0_from_eps', 'dstar_edu.conversions:to_x0_eps', 'dstar_edu.conversions:convert'),
    source="handbook Eq. 7",
    prompt=("Tweedie's formula (handbook Eq. 7). The forward process of Eq. 6 gives x_t = sqrt(alpha_bar_t) x0 "
            "+ sqrt(1 - alpha_bar_t) eps. A network that predicts the noise eps_hat therefore also predicts the "
            "clean sample: solve Eq. 6 for x0 with eps replaced by eps_hat. Return x0_hat (same shape as x_t)."),
    args=(("x_t", "noisy sample, shape (batch, *shape)"), ("eps_hat", "predicted noise, same shape as x_t"),
          ("alpha_bar", _AB)),
    returns="x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)",
    reference=lambda x_t, eps_hat, alpha_bar: cv.x0_from_eps(
        x_t, eps_hat, torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)),
    hint=("Eq. 6 scales x0 by sqrt(alpha_bar_t) and eps by sqrt(1 - alpha_bar_t): alpha_bar is a variance-type "
          "coefficient, so both need a square root. Subtract the noise part from x_t, then divide by the "
          "signal coefficient."),
    mistakes=(
        (lambda x_t, eps_hat, alpha_bar: (x_t - (1 - alpha_bar) * eps_hat) / alpha_bar,
         "both square roots are missing: use sqrt(1 - alpha_bar) and sqrt(alpha_bar), "
         "not 1 - alpha_bar and alpha_bar."),
        (lambda x_t, eps_hat, alpha_bar: (x_t - torch.sqrt(1 - alpha_bar) * eps_hat) / alpha_bar,
         "you divide by alpha_bar; the signal coefficient in Eq. 6 is sqrt(alpha_bar)."),
        (lambda x_t, eps_hat, alpha_bar: (x_t - (1 - alpha_bar) * eps_hat) / torch.sqrt(alpha_bar),
         "the noise coefficient needs a square root: sqrt(1 - alpha_bar) eps_hat."),
        (lambda x_t, eps_hat, alpha_bar: (x_t + torch.sqrt(1 - alpha_bar) * eps_hat) / torch.sqrt(alpha_bar),
         "sign error: the noise is *subtracted* from x_t (x_t - sqrt(1 - alpha_bar) eps_hat)."),
        (lambda x_t, eps_hat, alpha_bar: torch.sqrt(alpha_bar) * (x_t - torch.sqrt(1 - alpha_bar) * eps_hat),
         "you multiply by sqrt(alpha_bar); solving x_t = sqrt(alpha_bar) x0 + ... for x0 *divides* by it."),
        (lambda x_t, eps_hat, alpha_bar: x_t / torch.sqrt(alpha_bar) - torch.sqrt(1 - alpha_bar) * eps_hat,
         "only x_t is divided by sqrt(alpha_bar); the whole difference x_t - sqrt(1 - alpha_bar) eps_hat is."),
        (lambda x_t, eps_hat, alpha_bar: (x_t - torch.sqrt(alpha_bar) * eps_hat) / torch.sqrt(1 - alpha_bar),
         "the coefficients are swapped: x0 goes with sqrt(alpha_bar), the noise with sqrt(1 - alpha_bar)."),
    ), pick=lambda d: {"x_t": d["x_t"], "eps_hat": d["eps_hat"], "alpha_bar": d["alpha_bar_t"]}))

register(_basics(
    name="posterior_mean_ddpm",
    guards=('dstar_edu.exercises.basics:ddpm_posterior_mean', 'dstar_edu.samplers.diffusion:_ddpm_update',
            'dstar_edu.samplers.diffusion:ddpm_posterior'),
    source="handbook Eq. 8/10",
    prompt=("DDPM posterior mean (handbook Eq. 8, written with x0_hat in Eq. 10). Given x_t and a clean-sample "
            "prediction x0_hat, the forward posterior q(x_{t-1} | x_t, x0) is Gaussian; its mean is a weighted sum "
            "of x0_hat and x_t. The weights mix the per-step alpha_t = 1 - beta_t (Eq. 5) and the cumulative "
            "alpha_bar_t, alpha_bar_{t-1} (Eq. 6). Return the mean (same shape as x_t), without the sigma_t noise."),
    args=(("x_t", "noisy sample at step t, shape (batch, *shape)"),
          ("x0_hat", "predicted clean sample, same shape as x_t"),
          ("alpha_t", "per-step alpha_t = 1 - beta_t (Eq. 5), broadcasts against x_t"),
          ("alpha_bar_t", "cumulative alpha_bar_t = prod_{i<=t} alpha_i (Eq. 6), broadcasts against x_t"),
          ("alpha_bar_prev", "alpha_bar_{t-1}, broadcasts against x_t")),
    returns=("mu = sqrt(alpha_bar_prev) (1 - alpha_t) / (1 - alpha_bar_t) x0_hat "
             "+ sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t"),
    reference=ddpm_posterior_mean,
    hint=("did you use alpha_bar_t or the per-step alpha_t? One step of Eq. 5 (x_{t-1} -> x_t) carries "
          "sqrt(alpha_t) and variance 1 - alpha_t; the path x0 -> x_{t-1} of Eq. 6 carries sqrt(alpha_bar_{t-1}) "
          "and variance 1 - alpha_bar_{t-1}; both weights share the denominator 1 - alpha_bar_t. The x0_hat "
          "weight is sqrt(alpha_bar_{t-1}) (1 - alpha_t) / (1 - alpha_bar_t)."),
    mistakes=(
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev: ddpm_posterior_mean(
            x_t, x0_hat, alpha_bar_t, alpha_bar_t, alpha_bar_prev),
         "you used alpha_bar_t where the per-step alpha_t belongs (in 1 - alpha_t and sqrt(alpha_t))."),
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev:
            (torch.sqrt(alpha_bar_prev) * (1 - alpha_t) * x0_hat
             + torch.sqrt(alpha_bar_t) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t),
         "the x_t weight uses sqrt(alpha_bar_t); it must be the one-step sqrt(alpha_t)."),
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev:
            (torch.sqrt(alpha_bar_prev) * (1 - alpha_bar_t) * x0_hat
             + torch.sqrt(alpha_t) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t),
         "the x0_hat weight uses 1 - alpha_bar_t; it must be the one-step variance 1 - alpha_t (= beta_t)."),
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev:
            (alpha_bar_prev * (1 - alpha_t) * x0_hat + alpha_t * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t),
         "square roots are missing: the weights contain sqrt(alpha_bar_{t-1}) and sqrt(alpha_t)."),
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev: ddpm_posterior_mean(
            x0_hat, x_t, alpha_t, alpha_bar_t, alpha_bar_prev),
         "x_t and x0_hat are swapped: sqrt(alpha_bar_{t-1}) (1 - alpha_t) multiplies x0_hat."),
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev: ddpm_posterior_mean(
            x_t, x0_hat, alpha_t, alpha_bar_prev, alpha_bar_t),
         "alpha_bar_t and alpha_bar_{t-1} are swapped: the denominator is 1 - alpha_bar_t."),
        (lambda x_t, x0_hat, alpha_t, alpha_bar_t, alpha_bar_prev:
            torch.sqrt(alpha_bar_prev) * x0_hat + torch.sqrt(1 - alpha_bar_prev) * (
                x_t - torch.sqrt(alpha_bar_t) * x0_hat) / torch.sqrt(1 - alpha_bar_t),
         "you wrote the deterministic DDIM step (Eq. 11 with sigma_t = 0), not the DDPM posterior mean of Eq. 8."),
    ), pick=lambda d: {k: d[k] for k in ("x_t", "x0_hat", "alpha_t", "alpha_bar_t", "alpha_bar_prev")}))

register(_basics(
    name="v_prediction",
    guards=('dstar_edu.conversions:v_from_x0_eps',
            'dstar_edu.conversions:from_x0_eps',
            'dstar_edu.conversions:convert'),
    source="handbook Sec. 2.6.2, Fig. 3",
    prompt=("v-prediction target (handbook Sec. 2.6.2). Write x_t = sin(phi) x0 + cos(phi) eps with "
            "sin(phi) = sqrt(alpha_bar_t); the handbook's v is the rate of change of x_t along the angle phi, "
            "v = dx_t/dphi, which points from the noise towards the data. Given the clean sample x0, the noise eps "
            "and alpha_bar, return v (same shape as x0)."),
    args=(("x0", "clean sample, shape (batch, *shape)"), ("eps", "noise, same shape as x0"), ("alpha_bar", _AB)),
    returns="v = sqrt(1 - alpha_bar) x0 - sqrt(alpha_bar) eps",
    reference=cv.v_from_x0_eps,
    hint=("differentiate x = sin(phi) x0 + cos(phi) eps with respect to phi: v = cos(phi) x0 - sin(phi) eps, with "
          "cos(phi) = sqrt(1 - alpha_bar) and sin(phi) = sqrt(alpha_bar). Mind the sign: the handbook's v points "
          "towards the data (+x0)."),
    mistakes=(
        (lambda x0, eps, alpha_bar: torch.sqrt(alpha_bar) * eps - torch.sqrt(1 - alpha_bar) * x0,
         "your v has the opposite sign: that is diffusers' 'v_prediction' (v_bar = -v, the forward direction). "
         "The handbook's v = sqrt(1 - alpha_bar) x0 - sqrt(alpha_bar) eps."),
        (lambda x0, eps, alpha_bar: torch.sqrt(alpha_bar) * x0 - torch.sqrt(1 - alpha_bar) * eps,
         "the coefficients are swapped: x0 goes with cos(phi) = sqrt(1 - alpha_bar), "
         "eps with sin(phi) = sqrt(alpha_bar)."),
        (lambda x0, eps, alpha_bar: (1 - alpha_bar) * x0 - alpha_bar * eps,
         "square roots are missing: cos(phi) = sqrt(1 - alpha_bar), sin(phi) = sqrt(alpha_bar)."),
        (lambda x0, eps, alpha_bar: x0 - eps,
         "you returned x0 - eps, the rectified-flow / InstaFlow velocity (Eq. 30), not the angular v of Sec. 2.6.2."),
        (lambda x0, eps, alpha_bar: torch.sqrt(1 - alpha_bar) * x0 + torch.sqrt(alpha_bar) * eps,
         "sign error on the noise term: d cos(phi)/dphi = -sin(phi), so v = ... - sqrt(alpha_bar) eps."),
    ), pick=lambda d: {"x0": d["x0"], "eps": d["eps"], "alpha_bar": d["alpha_bar_t"]}))

register(_basics(
    name="x0_from_v",
    guards=('dstar_edu.conversions:x0_from_v', 'dstar_edu.conversions:to_x0_eps', 'dstar_edu.conversions:convert'),
    source="handbook Fig. 3",
    prompt=("Triangular formula x0 <- v (handbook Fig. 3). A v-prediction network outputs v_hat; rotate back by "
            "the angle phi (sin(phi) = sqrt(alpha_bar_t)) to recover the clean sample: x_t and v are the signal "
            "and its angular derivative, so x0 is a rotation of the pair (x_t, v). Return x0_hat (same shape as x_t)."),
    args=(("x_t", "noisy sample, shape (batch, *shape)"), ("v_hat", "predicted v, same shape as x_t"),
          ("alpha_bar", _AB)),
    returns="x0_hat = sqrt(alpha_bar) x_t + sqrt(1 - alpha_bar) v_hat",
    reference=lambda x_t, v_hat, alpha_bar: cv.x0_from_v(x_t, v_hat, alpha_bar),
    hint=("with x_t = sin(phi) x0 + cos(phi) eps and v = cos(phi) x0 - sin(phi) eps, x0 = sin(phi) x_t + cos(phi) v "
          "(sin^2 + cos^2 = 1 removes eps). sin(phi) = sqrt(alpha_bar), cos(phi) = sqrt(1 - alpha_bar)."),
    mistakes=(
        (lambda x_t, v_hat, alpha_bar: torch.sqrt(1 - alpha_bar) * x_t - torch.sqrt(alpha_bar) * v_hat,
         "you computed eps_hat (the other edge of Fig. 3), not x0_hat."),
        (lambda x_t, v_hat, alpha_bar: torch.sqrt(alpha_bar) * x_t - torch.sqrt(1 - alpha_bar) * v_hat,
         "sign error: x0 = sqrt(alpha_bar) x_t + sqrt(1 - alpha_bar) v (you may be using diffusers' v = -v_handbook)."),
        (lambda x_t, v_hat, alpha_bar: torch.sqrt(1 - alpha_bar) * x_t + torch.sqrt(alpha_bar) * v_hat,
         "the coefficients are swapped: x_t goes with sqrt(alpha_bar), v with sqrt(1 - alpha_bar)."),
        (lambda x_t, v_hat, alpha_bar: alpha_bar * x_t + (1 - alpha_bar) * v_hat,
         "square roots are missing: the weights are sqrt(alpha_bar) and sqrt(1 - alpha_bar)."),
    ), pick=lambda d: {"x_t": d["x_t"], "v_hat": cv.v_from_x0_eps(d["x0_hat"], d["eps_hat"], d["alpha_bar_t"]),
                       "alpha_bar": d["alpha_bar_t"]}))

register(_basics(
    name="score_from_eps",
    guards=('dstar_edu.conversions:score_from_eps',
            'dstar_edu.conversions:from_x0_eps',
            'dstar_edu.conversions:convert'),
    source="handbook Eq. 18",
    prompt=("Score from noise prediction (handbook Eq. 16-18). The conditional score of q(x_t | x0) = "
            "N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) can be written with the noise eps alone (Eq. 17); "
            "replacing eps by the network's eps_hat gives the model score s_theta(x_t, t) of Eq. 18. Given eps_hat "
            "and alpha_bar, return s_theta (same shape as eps_hat)."),
    args=(("eps_hat", "predicted noise, shape (batch, *shape)"), ("alpha_bar", _AB)),
    returns="s = -eps_hat / sqrt(1 - alpha_bar)",
    reference=lambda eps_hat, alpha_bar: cv.score_from_eps(eps_hat, torch.sqrt(1 - alpha_bar)),
    hint=("for x ~ N(mu, sigma^2 I) the score is -(x - mu) / sigma^2; write x - mu with the noise. The score "
          "points *against* the noise."),
    hints=("x_t - sqrt(alpha_bar) x0 = sigma eps with sigma = sqrt(1 - alpha_bar_t), the noise standard deviation "
           "of Eq. 6.",),
    mistakes=(
        (lambda eps_hat, alpha_bar: eps_hat / torch.sqrt(1 - alpha_bar),
         "sign error: the score is -eps_hat / sqrt(1 - alpha_bar) (it points back towards the data)."),
        (lambda eps_hat, alpha_bar: -eps_hat / (1 - alpha_bar),
         "you divide by the variance 1 - alpha_bar; divide eps_hat by the standard deviation sqrt(1 - alpha_bar)."),
        (lambda eps_hat, alpha_bar: -eps_hat * torch.sqrt(1 - alpha_bar),
         "you multiply by sqrt(1 - alpha_bar); Eq. 18 divides eps_hat by it."),
        (lambda eps_hat, alpha_bar: -eps_hat / torch.sqrt(alpha_bar),
         "the noise standard deviation is sqrt(1 - alpha_bar), not sqrt(alpha_bar)."),
    ), pick=lambda d: {"eps_hat": d["eps_hat"], "alpha_bar": d["alpha_bar_t"]}))

