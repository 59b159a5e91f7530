"""Formula exercises for notebooks 01, 04, 05, 06 and 09, graded by value like ``basics``.

Each reference is the library function that implements the formula (guarded while an answer is graded):
the unified velocity of handbook Sec. 2.7, the consistency parameterisation (Eq. 19), the VE re-noising of
multistep consistency sampling (Eq. 26), the rectified-flow velocity target (Sec. 2.4), InstaFlow's y-space
(Eq. 30-33), TrigFlow's F-parameterisation (Eq. 38) and DDPO's transition log-density and advantages.
"""
from __future__ import annotations

import math

import torch

from .. import conversions as cv
from ..process import DDPM, VP, RectifiedFlow, TrigFlow
from .core import Exercise, Trial, register

Tensor = torch.Tensor
F64 = torch.float64
SHAPES = ((8, 2), (3, 3, 32, 32), (64, 2), (2, 3, 32, 32))


def _col(v: Tensor, shape) -> Tensor:
    return v.reshape(-1, *[1] * (len(shape) - 1))


def _x(shape, g):
    return torch.randn(shape, generator=g, dtype=F64) * (1.5 if len(shape) == 2 else 0.5)


def _value(name, source, prompt, args, returns, reference, hint, make, guards, mistakes=(), hints=(), note=""):
    def draw(trial, g):
        shape = SHAPES[trial % len(SHAPES)]
        inputs, times = make(shape, g)
        return Trial(inputs, note, times=times)
    return Exercise(name=name, area="formulas", source=source, prompt=prompt, args=args, returns=returns,
                    reference=reference, hint=hint, draw=draw, n_trials=len(SHAPES), guards=guards,
                    mistakes=mistakes, hints=hints, covers="2D points and 3x32x32 images, several t",
                    call_note=" with float64 torch tensors that broadcast against x (use torch functions)",
                    return_note="a torch.Tensor shaped like the first argument")


# ---- Sec. 2.7: the unified velocity from the score ------------------------------------------------------------
def _velocity_inputs(shape, g):
    x_t = _x(shape, g)
    kind = int(torch.randint(0, 3, (), generator=g))
    process = (VP(), RectifiedFlow(), TrigFlow())[kind]
    lo, hi = ((0.05, 0.95), (0.05, 0.95), (0.05, 1.5))[kind]
    t = lo + (hi - lo) * torch.rand(shape[0], generator=g, dtype=F64)
    c = {k: _col(getattr(process, k)(t), shape) for k in ("alpha", "sigma", "d_alpha", "d_sigma")}
    score = -x_t / (1 + torch.rand(shape, generator=g, dtype=F64))
    return {"x_t": x_t, "score": score, **c}, None


register(_value(
    "velocity_from_score", "handbook Sec. 2.7 (unified velocity formula)",
    ("The unified velocity formula (handbook Sec. 2.7): for any process x_t = alpha(t) x0 + sigma(t) eps, the "
     "probability-flow velocity dx_t/dt is a combination of x_t and the score s = grad log p_t(x_t), with "
     "coefficients built from alpha, sigma and their time derivatives d_alpha, d_sigma. Derive it from "
     "Tweedie (x0_hat = (x_t + sigma^2 s) / alpha, eps_hat = -sigma s) and v = d_alpha x0_hat + d_sigma eps_hat."),
    (("x_t", "sample, shape (batch, *shape)"), ("score", "score at x_t, same shape"),
     ("alpha", "alpha(t), broadcasts against x_t"), ("sigma", "sigma(t)"), ("d_alpha", "alpha'(t)"),
     ("d_sigma", "sigma'(t)")),
    "v = (d_alpha / alpha) x_t + sigma (d_alpha sigma / alpha - d_sigma) score",
    cv.velocity_from_score,
    "substitute x0_hat = (x_t + sigma^2 s) / alpha and eps_hat = -sigma s into v = d_alpha x0_hat + d_sigma eps_hat.",
    _velocity_inputs, ("dstar_edu.conversions:velocity_from_score", "dstar_edu.conversions:from_x0_eps",
                       "dstar_edu.conversions:convert"),
    mistakes=(
        (lambda x_t, s, a, sg, da, ds: da / a * x_t + sg * (da * sg / a + ds) * s,
         "sign error on the d_sigma term: eps_hat = -sigma s, so d_sigma enters with a minus sign."),
        (lambda x_t, s, a, sg, da, ds: da / a * x_t + (da * sg / a - ds) * s,
         "a factor sigma is missing in front of the score term (sigma^2 s / alpha and sigma s both carry sigma)."),
    ),
    hints=("with alpha = 1 - t, sigma = t (rectified flow) the formula must give v = eps_hat - x0_hat.",)))


# ---- Eq. 19: the consistency parameterisation ---------------------------------------------------------------
def _cm_inputs(shape, g):
    t = 0.002 + 80 * torch.rand(shape[0], generator=g, dtype=F64) ** 3
    return {"x_t": _x(shape, g) * _col(1 + t, shape), "x0_hat": _x(shape, g), "t": _col(t, shape)}, t


register(_value(
    "consistency_f", "handbook Eq. 19 (sigma_data = 0.5, eps = 0.002)",
    ("The consistency function of handbook Eq. 19: a skip connection that mixes the noisy sample x_t and the "
     "network's clean-sample output x0_hat with the two time-dependent scalings c_skip(t) and c_out(t) printed "
     "there, with sigma_data = 0.5 and eps = 0.002 (t is the EDM noise level). At t = eps, f must be x_t."),
    (("x_t", "noisy sample, shape (batch, *shape)"), ("x0_hat", "network output, same shape"),
     ("t", "EDM noise level in [0.002, 80], broadcasts against x_t")),
    "f = c_skip(t) x_t + c_out(t) x0_hat",
    lambda x_t, x0_hat, t: cv.consistency_f(x_t, x0_hat, t),
    "c_skip and c_out are chosen so that f(x, eps) = x exactly (the boundary condition of Eq. 19).",
    _cm_inputs, ("dstar_edu.conversions:consistency_f", "dstar_edu.conversions:cm_c_skip_c_out"),
    hints=("c_skip multiplies x_t and c_out multiplies x0_hat; both use the shifted time t - eps.",
           "c_skip = sigma_data^2 / ((t - eps)^2 + sigma_data^2), c_out = sigma_data (t - eps) / sqrt(t^2 + "
           "sigma_data^2)."),
    mistakes=(
        (lambda x_t, x0, t: 0.25 / (t ** 2 + 0.25) * x_t + 0.5 * t / torch.sqrt(t ** 2 + 0.25) * x0,
         "the shift by eps = 0.002 is missing: use (t - eps) in c_skip and c_out, so that f(x, eps) = x."),
        (lambda x_t, x0, t: 0.25 / ((t - 0.002) ** 2 + 0.25) * x0 + 0.5 * (t - 0.002) / torch.sqrt(t ** 2 + 0.25) * x_t,
         "x_t and x0_hat are swapped: c_skip multiplies x_t (the skip connection)."),
    )))


# ---- Eq. 26: re-noising in multistep consistency sampling -------------------------------------------------
def _renoise_inputs(shape, g):
    t = 0.01 + 40 * torch.rand((), generator=g, dtype=F64)
    return {"x": _x(shape, g), "t": t, "z": torch.randn(shape, generator=g, dtype=F64)}, None


def _ref_renoise(x, t, z):
    from ..process import VE
    from ..samplers.consistency import renoise
    return renoise(x, 0.002, float(t), VE(80.0), z)


register(_value(
    "cm_renoise", "handbook Eq. 26 / Alg. 4 (VE, eps = 0.002)",
    ("Multistep consistency sampling (Alg. 4) re-noises the current clean estimate x (which sits at the boundary "
     "time eps = 0.002 of the VE process, x_t = x0 + t z) to the next noise level t with fresh noise z: the "
     "added noise must bring the variance from eps^2 up to t^2 exactly (Eq. 26). Return the re-noised sample."),
    (("x", "clean estimate at time eps, shape (batch, *shape)"), ("t", "target noise level (0-d tensor, > eps)"),
     ("z", "standard normal noise, same shape as x")),
    "x + sqrt(t^2 - eps^2) z",
    _ref_renoise,
    "variances add: the noise to add has variance t^2 - eps^2.",
    _renoise_inputs, ("dstar_edu.samplers.consistency:renoise",),
    mistakes=(
        (lambda x, t, z: x + t * z, "you add noise of standard deviation t; x already carries eps^2 of variance."),
        (lambda x, t, z: x + (t - 0.002) * z, "standard deviations do not subtract: variances do (t^2 - eps^2)."),
    )))


# ---- Sec. 2.4: the rectified-flow velocity target --------------------------------------------------------------
def _rf_inputs(shape, g):
    return {"x0": _x(shape, g), "eps": torch.randn(shape, generator=g, dtype=F64)}, None


register(_value(
    "rf_velocity_target", "handbook Sec. 2.4 (rectified flow, Eq. 30)",
    ("Rectified flow (handbook Sec. 2.4) interpolates x_t = (1 - t) x0 + t eps between data (t = 0) and noise "
     "(t = 1). Its training target is the velocity dx_t/dt along this straight line. Return it."),
    (("x0", "data, shape (batch, *shape)"), ("eps", "noise, same shape")),
    "v = eps - x0",
    lambda x0, eps: cv.from_x0_eps("velocity", x0, eps, RectifiedFlow().q_sample(x0, 0.5, eps=eps)[0], 0.5,
                                   RectifiedFlow()),
    "differentiate x_t = (1 - t) x0 + t eps with respect to t.",
    _rf_inputs, ("dstar_edu.conversions:from_x0_eps", "dstar_edu.conversions:convert"),
    mistakes=((lambda x0, eps: x0 - eps, "sign: dx_t/dt points from the data towards the noise (t grows to noise)."),)))


# ---- Eq. 30-33: InstaFlow's y-space -------------------------------------------------------------------------
def _instaflow_inputs(shape, g):
    t = torch.randint(1, 1000, (shape[0],), generator=g).to(F64)
    ab = _col(DDPM(1000).alpha_bar(t), shape)
    return {"x_t": _x(shape, g), "alpha_bar": ab}, t


register(_value(
    "instaflow_y", "handbook Eq. 30-33 (InstaFlow y-space)",
    ("InstaFlow (handbook Eq. 30-33) rescales the DDPM state x_t of Eq. 6 into the rectified-flow "
     "interpolation y_t = (1 - gamma) x0 + gamma eps, whose weights of x0 and eps add up to one. Find the "
     "rescaling from Eq. 6 and return y_t."),
    (("x_t", "DDPM sample, shape (batch, *shape)"), ("alpha_bar", "alpha_bar_t, broadcasts against x_t")),
    "y = x_t / (sqrt(ab) + sqrt(1 - ab))",
    cv.instaflow_y,
    "the weights of x0 and eps in x_t are sqrt(ab) and sqrt(1 - ab); divide by their sum.",
    _instaflow_inputs, ("dstar_edu.conversions:instaflow_y",),
    mistakes=((lambda x_t, ab: x_t / (ab + (1 - ab)),
               "square roots are missing: the coefficients are sqrt(alpha_bar) and sqrt(1 - alpha_bar)."),
              (lambda x_t, ab: x_t / torch.sqrt(ab), "dividing by sqrt(alpha_bar) gives x0's scale, not the "
               "rectified-flow interpolation (weights summing to one)."))))


# ---- Eq. 38: TrigFlow's F-parameterisation -----------------------------------------------------------------
def _trig_inputs(shape, g):
    t = (math.pi / 2) * torch.rand(shape[0], generator=g, dtype=F64)
    return {"x_t": _x(shape, g), "t": _col(t, shape), "F": _x(shape, g)}, None


register(_value(
    "trigflow_f", "handbook Eq. 38 (TrigFlow, sigma_d = 0.5)",
    ("TrigFlow (handbook Eq. 38) writes the consistency function with the network output F as a rotation of "
     "x_t by the angle t (sigma_d = 0.5, t in [0, pi/2]). At t = 0 it returns x_t (the boundary condition holds "
     "by construction). Return f as Eq. 38 defines it."),
    (("x_t", "sample, shape (batch, *shape)"), ("t", "time in [0, pi/2], broadcasts against x_t"),
     ("F", "network output, same shape as x_t")),
    "f = cos(t) x_t - sin(t) sigma_d F",
    lambda x_t, t, F: cv.trigflow_f(x_t, t, F, 0.5),
    "x_t is rotated by the angle t towards -sigma_d F.",
    _trig_inputs, ("dstar_edu.conversions:trigflow_f",),
    hints=("cos(t) multiplies x_t; the F term carries sin(t) and sigma_d.",),
    mistakes=((lambda x_t, t, F: torch.cos(t) * x_t + torch.sin(t) * 0.5 * F, "sign: the F term is subtracted."),
              (lambda x_t, t, F: torch.cos(t) * x_t - torch.sin(t) * F, "the F term carries sigma_d = 0.5."),
              (lambda x_t, t, F: torch.sin(t) * x_t - torch.cos(t) * 0.5 * F,
               "sin and cos are swapped: at t = 0 f must return x_t."))))


# ---- DDPO (handbook Sec. 3.3): transition log-density and normalised advantages -----------------------------
def _logp_inputs(shape, g):
    std = 0.05 + torch.rand((), generator=g, dtype=F64)
    mean = _x(shape, g)
    return {"x": mean + std * torch.randn(shape, generator=g, dtype=F64), "mean": mean, "std": std}, None


def _ref_logp(x, mean, std):
    from ..objectives.reward_finetune import gaussian_log_prob
    return gaussian_log_prob(x, mean, std)


register(Exercise(**{**_value(
    "transition_log_prob", "handbook Eq. 51 (DDPO: log-density of a denoising step)",
    ("DDPO (handbook Sec. 3.3) treats each stochastic denoising step as an action with Gaussian density "
     "N(x; mean, std^2 I). Return the log-density of each sample x (summed over all its entries): a tensor of "
     "shape (batch,)."),
    (("x", "the sampled next state, shape (batch, *shape)"), ("mean", "the step's mean, same shape"),
     ("std", "the step's standard deviation (0-d tensor)")),
    "sum_i [-(x_i - mean_i)^2 / (2 std^2) - log std - log sqrt(2 pi)]",
    _ref_logp, "the log-density of an isotropic Gaussian, summed over every entry of one sample.",
    _logp_inputs, ("dstar_edu.objectives.reward_finetune:gaussian_log_prob",),
    mistakes=((lambda x, m, s: (-((x - m) / s) ** 2 / 2).reshape(x.shape[0], -1).sum(1),
               "the normalising constant is missing: each entry adds -log std - log sqrt(2 pi)."),
              (lambda x, m, s: (-((x - m) / s) ** 2 / 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).reshape(
                  x.shape[0], -1).mean(1), "you average over the entries; the log-density of a sample sums them."))
).__dict__, "return_note": "a tensor of shape (batch,)"}))


def _adv_inputs(shape, g):
    return {"rewards": 3 * torch.randn(shape[0] + 4, generator=g, dtype=F64) + 1}, None


def _ref_adv(rewards):
    from ..objectives.reward_finetune import normalize_advantages
    return normalize_advantages(rewards)


register(Exercise(**{**_value(
    "ddpo_advantages", "DDPO per-batch advantages (handbook Sec. 3.3)",
    ("DDPO (handbook Sec. 3.3) turns the rewards of a batch into advantages by standardising them over the "
     "batch, as its reference code does: use torch's default (unbiased) standard deviation and guard its "
     "division with 1e-8 added to it. Return the advantages."),
    (("rewards", "1-d tensor of rewards, one per sample"),),
    "(R - mean R) / (std R + 1e-8)",
    _ref_adv, "centre, then scale: the result has mean 0 and standard deviation ~1.",
    _adv_inputs, ("dstar_edu.objectives.reward_finetune:normalize_advantages",),
    mistakes=((lambda r: r - r.mean(), "you centre but do not scale by the standard deviation."),
              (lambda r: (r - r.mean()) / (r.std(unbiased=False) + 1e-8),
               "the biased standard deviation (unbiased=False); use torch's default, the unbiased one."))
).__dict__, "return_note": "a 1-d tensor shaped like rewards", "covers": "batches of 6 to 68 rewards"}))


# ---- Eq. 15-17: the conditional score and Tweedie in score form (notebook 03) ------------------------------
def _vp_inputs(shape, g):
    t = 0.02 + 0.96 * torch.rand(shape[0], generator=g, dtype=F64)
    vp = VP()
    a, s = _col(vp.alpha(t), shape), _col(vp.sigma(t), shape)
    x0 = _x(shape, g)
    x_t = a * x0 + s * torch.randn(shape, generator=g, dtype=F64)
    return {"x_t": x_t, "x0": x0, "alpha": a, "sigma": s}, None


def _score_inputs(shape, g):
    d, _ = _vp_inputs(shape, g)
    score = -(d["x_t"] - d["alpha"] * d["x0"]) / d["sigma"] ** 2 + 0.1 * torch.randn(shape, generator=g, dtype=F64)
    return {"x_t": d["x_t"], "score": score, "alpha": d["alpha"], "sigma": d["sigma"]}, None


register(_value(
    "conditional_score", "handbook Eq. 16-17 (the DSM regression target)",
    ("Denoising score matching regresses onto the score of the forward kernel q(x_t | x0) = N(alpha x0, "
     "sigma^2 I) (handbook Eq. 16-17), which is known in closed form for every x0. Given x_t, x0 and the "
     "coefficients, return grad_{x_t} log q(x_t | x0)."),
    (("x_t", "noisy sample, shape (batch, *shape)"), ("x0", "clean sample, same shape"),
     ("alpha", "alpha(t), broadcasts against x_t"), ("sigma", "sigma(t), broadcasts against x_t")),
    "-(x_t - alpha x0) / sigma^2",
    lambda x_t, x0, alpha, sigma: cv.score_from_eps(cv.eps_from_x0(x_t, x0, alpha, sigma), sigma),
    "the score of a Gaussian N(mu, sigma^2 I) at x is -(x - mu) / sigma^2.",
    _vp_inputs, ("dstar_edu.conversions:score_from_eps", "dstar_edu.conversions:eps_from_x0",
                 "dstar_edu.conversions:from_x0_eps", "dstar_edu.conversions:convert"),
    mistakes=((lambda x_t, x0, a, s: -(x_t - a * x0) / s, "divide by the variance sigma^2, not by sigma."),
              (lambda x_t, x0, a, s: (x_t - a * x0) / s ** 2, "sign: the score points back towards alpha x0."),
              (lambda x_t, x0, a, s: -(x_t - x0) / s ** 2, "the mean of q(x_t | x0) is alpha x0, not x0."))))

register(_value(
    "x0_from_score", "handbook Eq. 15 (Tweedie's formula in score form)",
    ("Tweedie's formula (handbook Eq. 15) in score form: for x_t = alpha x0 + sigma eps, the posterior mean "
     "E[x0 | x_t] is a function of x_t and the score of p_t at x_t alone. Given x_t, the score and the "
     "coefficients, return E[x0 | x_t] as Eq. 15 gives it."),
    (("x_t", "noisy sample, shape (batch, *shape)"), ("score", "grad log p_t(x_t), same shape"),
     ("alpha", "alpha(t), broadcasts against x_t"), ("sigma", "sigma(t), broadcasts against x_t")),
    "(x_t + sigma^2 score) / alpha",
    cv.x0_from_score,
    "Eq. 15 gives E[alpha x0 | x_t] first (the noise variance times the score corrects x_t); divide by alpha.",
    _score_inputs, ("dstar_edu.conversions:x0_from_score", "dstar_edu.conversions:to_x0_eps",
                    "dstar_edu.conversions:convert"),
    hints=("E[alpha x0 | x_t] = x_t + sigma^2 grad log p_t(x_t).",),
    mistakes=((lambda x_t, sc, a, s: (x_t + s * sc) / a, "the score is multiplied by the variance sigma^2."),
              (lambda x_t, sc, a, s: x_t + s ** 2 * sc, "the result must be divided by alpha (E[alpha x0 | x_t] "
               "is what x_t + sigma^2 s gives)."),
              (lambda x_t, sc, a, s: (x_t - s ** 2 * sc) / a, "sign: the score term is added."))))


# ---- LCM's boundary parameterisation (notebook 04) -----------------------------------------------------------
def _lcm_inputs(shape, g):
    t = torch.randint(1, 1000, (shape[0],), generator=g).to(F64)
    return {"x_t": _x(shape, g), "x0_hat": _x(shape, g), "t": _col(t, shape)}, t


def _ref_lcm_f(x_t, x0_hat, t):
    from ..samplers.consistency import lcm_boundary_scalings
    c_skip, c_out = lcm_boundary_scalings(t)
    return c_skip * x_t + c_out * x0_hat


register(_value(
    "lcm_f", "handbook Eq. 24 / Alg. 5 (LCM boundary scalings as in LCM's code)",
    ("LCM (handbook Alg. 5) parameterises its consistency function at DDPM time t like Eq. 19 (a skip scaling "
     "of x_t plus an output scaling of x0_hat), with the boundary scalings of LCM's code: they are written in "
     "s = 10 (t - 1) (diffusers' timestep t - 1 times timestep_scaling = 10) instead of Eq. 19's t - eps, with "
     "sigma_data = 0.5, and LCM's c_out omits Eq. 19's sigma_data factor in front. Return f; at t = 1 it is "
     "x_t exactly."),
    (("x_t", "noisy sample, shape (batch, *shape)"), ("x0_hat", "the network's clean-sample estimate"),
     ("t", "DDPM time in 1..999, broadcasts against x_t")),
    "c_skip(t) x_t + c_out(t) x0_hat",
    _ref_lcm_f,
    "c_skip -> 1 and c_out -> 0 at t = 1: f(x, 1) = x is the boundary condition.",
    _lcm_inputs, ("dstar_edu.samplers.consistency:lcm_boundary_scalings",),
    hints=("c_skip = sigma_data^2 / (s^2 + sigma_data^2) and c_out = s / sqrt(s^2 + sigma_data^2).",),
    mistakes=((lambda x_t, x0, t: 0.25 / ((10 * t) ** 2 + 0.25) * x_t + 10 * t / torch.sqrt((10 * t) ** 2 + 0.25) * x0,
               "s uses diffusers' timestep t - 1, not t: at t = 1 the boundary f = x_t must hold."),
              (lambda x_t, x0, t: 0.25 / ((10 * (t - 1)) ** 2 + 0.25) * x_t
               + 0.5 * 10 * (t - 1) / torch.sqrt((10 * (t - 1)) ** 2 + 0.25) * x0,
               "this c_out has Eq. 19's extra sigma_data factor; LCM's code drops it (the erratum of "
               "section 3)."))))


# ---- TrigFlow's forward process and velocity (notebook 06) ---------------------------------------------------
def _trig_x0_inputs(shape, g):
    t = (math.pi / 2) * torch.rand(shape[0], generator=g, dtype=F64)
    return {"x0": _x(shape, g), "eps": torch.randn(shape, generator=g, dtype=F64), "t": _col(t, shape)}, None


register(_value(
    "trigflow_x_t", "handbook Sec. 2.5 (TrigFlow forward process, sigma_d = 0.5)",
    ("TrigFlow (handbook Sec. 2.5) mixes data and noise z ~ N(0, sigma_d^2 I), sigma_d = 0.5, on a quarter "
     "circle: t = 0 is the data, t = pi/2 pure noise. You get a standard normal eps. Return x_t of Sec. 2.5."),
    (("x0", "data, shape (batch, *shape)"), ("eps", "standard normal noise, same shape"),
     ("t", "time in [0, pi/2], broadcasts against x0")),
    "cos(t) x0 + sin(t) sigma_d eps",
    lambda x0, eps, t: TrigFlow(0.5).q_sample(x0, t.flatten(), eps=eps)[0],
    "the noise z has standard deviation sigma_d, not 1.",
    _trig_x0_inputs, ("dstar_edu.process:Process.q_sample",),
    hints=("x_t = cos(t) x0 + sin(t) z with z = sigma_d eps.",),
    mistakes=((lambda x0, eps, t: torch.cos(t) * x0 + torch.sin(t) * eps,
               "z = sigma_d eps: the noise carries sigma_d = 0.5."),
              (lambda x0, eps, t: torch.sin(t) * x0 + torch.cos(t) * 0.5 * eps,
               "sin and cos are swapped: t = 0 is data, t = pi/2 pure noise."))))

register(_value(
    "trigflow_velocity", "handbook Sec. 2.5, Eq. 38 (TrigFlow velocity, the sCM training target)",
    ("The TrigFlow velocity dx_t/dt of x_t = cos(t) x0 + sin(t) sigma_d eps (sigma_d = 0.5) is the target of "
     "TrigFlow's flow matching. Given x0, eps and t, return it."),
    (("x0", "data, shape (batch, *shape)"), ("eps", "standard normal noise, same shape"),
     ("t", "time in [0, pi/2], broadcasts against x0")),
    "-sin(t) x0 + cos(t) sigma_d eps",
    lambda x0, eps, t: cv.from_x0_eps("velocity", x0, eps, TrigFlow(0.5).q_sample(x0, t.flatten(), eps=eps)[0],
                                      t.flatten(), TrigFlow(0.5)),
    "differentiate cos(t) and sin(t) with respect to t.",
    _trig_x0_inputs, ("dstar_edu.conversions:from_x0_eps", "dstar_edu.conversions:convert"),
    mistakes=((lambda x0, eps, t: torch.sin(t) * x0 - torch.cos(t) * 0.5 * eps,
               "sign: d cos(t)/dt = -sin(t), so the data term enters with a minus sign."),
              (lambda x0, eps, t: -torch.sin(t) * x0 + torch.cos(t) * eps, "the noise term carries sigma_d = 0.5."))))
