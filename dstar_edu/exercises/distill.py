"""Exercises on one-step score distillation (SIM Sec. 3.3, Eq. 3.7-3.8, Table 4, App. A.3).

    >>> from dstar_edu import exercises
    >>> exercises.list_exercises("distill")
    ['pseudo_huber_grad', 'huber_grad', 'sim_loss']
    >>> exercises.describe("sim_loss")
    >>> exercises.check("sim_loss", my_sim_loss)

``pseudo_huber_grad`` and ``huber_grad`` are graded by value (``d'(y)`` of SIM Table 4, the corrected forms)
on random float64 2D points and 3x32x32 images. ``sim_loss`` is graded by its *gradient*: the student's loss
is evaluated on the generator output ``x0 = g_theta(z)`` of an exact generator, and its theta-gradient must
equal that of ``objectives.distill.sim_generator_loss`` (SIM Eq. 3.8), whose expectation is the gradient of
the score divergence (SIM Thm 3.1, check ``distill.sim_thm31.pseudo_huber``). The catalogued mistakes are
the gradient-flow choices that the check ``distill.sim_gradient_flow`` rejects.
"""
from __future__ import annotations

import torch

from ..process import VP
from .core import Exercise, GradientTrial, Trial, batch_label, flat_grad, over_dims, register

Tensor = torch.Tensor

__all__ = ["TRIAL_DIMS"]

#: trial dimensions, cycled: 2D points and CIFAR-shaped images through the same code
TRIAL_DIMS = (2, 3072, 2)

_PROCESS = VP()


# ---- reference solutions ----------------------------------------------------------------------------------------
def _ref_pseudo_huber_grad(y, c):
    from ..objectives.divergences import PseudoHuber
    return PseudoHuber(c).grad(y)


def _ref_huber_grad(y, delta):
    from ..objectives.divergences import Huber
    return Huber(delta).grad(y)


def _per_sample_norm(y):
    return torch.sqrt((y * y).reshape(y.shape[0], -1).sum(1)).reshape(-1, *[1] * (y.ndim - 1))


def _sum(v):
    return v.reshape(v.shape[0], -1).sum(1)


def _ref_sim_loss(x0, eps, alpha, sigma, teacher_score, fake_score, c):
    """SIM Eq. 3.8 via the library: -y^T (s_psi(x_t) + eps/sigma) / sqrt(||y||^2 + c^2), batch mean."""
    from ..objectives.divergences import PseudoHuber
    x_t = alpha * x0 + sigma * eps
    s_psi = fake_score(x_t)
    y = s_psi - teacher_score(x_t)
    return -_sum(PseudoHuber(c).grad(y) * (s_psi + eps / sigma)).mean()


def _sim_variant(kind: str):
    """Typical wrong SIM losses (the gradient-flow mistakes of check distill.sim_gradient_flow and more)."""
    def loss(x0, eps, alpha, sigma, teacher_score, fake_score, c):
        x_t = alpha * x0 + sigma * eps
        xd = x_t.detach()
        norm = lambda y: torch.sqrt(_per_sample_norm(y) ** 2 + c * c)   # noqa: E731
        if kind == "detach_y":
            y = (fake_score(xd) - teacher_score(xd)).detach()
            s = fake_score(x_t)
        elif kind == "detach_inputs":
            y, s = fake_score(xd) - teacher_score(xd), fake_score(xd)
            return -_sum(y / norm(y) * (s + eps / sigma)).mean() + 0 * x0.sum()
        elif kind == "di_surrogate":
            y = (fake_score(xd) - teacher_score(xd)).detach()
            return _sum(y / norm(y) * x_t).mean()
        elif kind == "plus_sign":
            s = fake_score(x_t)
            y = s - teacher_score(x_t)
            return _sum(y / norm(y) * (s + eps / sigma)).mean()
        elif kind == "factor_two":
            s = fake_score(x_t)
            y = s - teacher_score(x_t)
            return -_sum(2 * y / norm(y) * (s + eps / sigma)).mean()
        elif kind == "conditional_sign":
            s = fake_score(x_t)
            y = s - teacher_score(x_t)
            return -_sum(y / norm(y) * (s - eps / sigma)).mean()
        elif kind == "no_c":
            s = fake_score(x_t)
            y = s - teacher_score(x_t)
            return -_sum(y / _per_sample_norm(y) * (s + eps / sigma)).mean()
        elif kind == "batch_norm":
            s = fake_score(x_t)
            y = s - teacher_score(x_t)
            return -_sum(y / torch.sqrt((y * y).sum() + c * c) * (s + eps / sigma)).mean()
        elif kind == "sum":
            s = fake_score(x_t)
            y = s - teacher_score(x_t)
            return -_sum(y / norm(y) * (s + eps / sigma)).sum()
        else:
            raise ValueError(kind)
        return -_sum(y / norm(y) * (s + eps / sigma)).mean()
    return loss


# ---- inputs -------------------------------------------------------------------------------------------------------
def _value_inputs(name: str, dim: int, g: torch.Generator) -> dict:
    f64 = torch.float64
    shape = (7, 2) if dim == 2 else (2, 3, 32, 32)
    y = torch.randn(shape, generator=g, dtype=f64) * (2.0 if name == "huber_grad" else 1.0)
    if name == "pseudo_huber_grad":
        return {"y": y, "c": float(0.05 + torch.rand((), generator=g))}
    return {"y": y, "delta": float(0.3 + torch.rand((), generator=g))}


def _sim_setup(dim: int, g: torch.Generator):
    """An exact generator, an exact teacher and a different frozen exact fake score, one batch."""
    from ..generators import AffineGaussianGenerator, MixtureGenerator
    from toy_data.mixtures import GaussianMixture
    f64 = torch.float64
    if dim == 2:
        teacher = GaussianMixture(1.5 * torch.randn(3, 2, generator=g, dtype=f64),
                                  0.05 + 0.2 * torch.rand(3, generator=g, dtype=f64), process=_PROCESS)
        gen = AffineGaussianGenerator(2, mean=0.3 * torch.randn(2, generator=g, dtype=f64),
                                      A=torch.eye(2, dtype=f64) + 0.3 * torch.randn(2, 2, generator=g, dtype=f64))
        fake = MixtureGenerator(2, 2, means=torch.randn(2, 2, generator=g, dtype=f64),
                                log_scales=-torch.rand(2, generator=g, dtype=f64))
        B = 16
    else:
        shape = (3, 32, 32)
        teacher = GaussianMixture(2 * torch.rand(4, *shape, generator=g, dtype=f64) - 1, 0.05, process=_PROCESS)
        gen = MixtureGenerator(2, shape, means=0.5 * torch.randn(2, *shape, generator=g, dtype=f64),
                               log_scales=torch.log(torch.tensor([0.2, 0.4], dtype=f64)))
        fake = MixtureGenerator(2, shape, means=0.5 * torch.randn(2, *shape, generator=g, dtype=f64),
                                log_scales=torch.log(torch.tensor([0.3, 0.3], dtype=f64)))
        B = 4
    z = gen.noise(B, g)
    eps = torch.randn(B, *gen.event_shape, generator=g, dtype=f64)
    t = 0.1 + 0.8 * torch.rand(B, generator=g, dtype=f64)
    return teacher, gen, fake.score_predictor(_PROCESS, frozen=True), z, eps, t


def _sim_trial(dim: int, g: torch.Generator) -> GradientTrial:
    """One batch of an exact generator; the gradient of SIM Eq. 3.8 (``sim_generator_loss``) is the answer."""
    from ..objectives.distill import sim_generator_loss
    teacher, gen, fake, z, eps, t = _sim_setup(dim, g)
    params = list(gen.parameters())
    c = 0.5
    a, s = _PROCESS.coefficients(t, eps)

    def loss(fn):
        return fn(gen(z), eps, a, s, lambda x: teacher.predict("score", x, t), lambda x: fake.predict("score", x, t), c)
    expected = flat_grad(sim_generator_loss(gen(z), teacher, fake, t, eps=eps, distance="pseudo_huber", c=c), params)
    return GradientTrial(batch_label(dim, z.shape[0]), params, loss, expected)


def _distill(**fields) -> Exercise:
    """An exercise of this area: value-graded on ``_value_inputs``, or gradient-graded on ``_sim_trial``."""
    name = fields["name"]
    make = _sim_trial if fields.get("graded_by") == "gradient" else lambda dim, g: Trial(_value_inputs(name, dim, g))
    return Exercise(area="distill", draw=over_dims(TRIAL_DIMS, make), n_trials=len(TRIAL_DIMS), against="SIM Eq. 3.8",
                    grading=("It is the gradient of objectives.distill.sim_generator_loss on the same batch of an "
                             "exact generator, with exact teacher and fake scores."), **fields)


# ---- the exercises ------------------------------------------------------------------------------------------------
register(_distill(
    name="pseudo_huber_grad",
    guards=('dstar_edu.objectives.divergences:PseudoHuber.grad',),
    source="SIM Eq. 3.8, Table 4 (row 6, corrected)",
    prompt=("The pseudo-Huber distance of SIM is d(y) = sqrt(||y||_2^2 + c^2) - c, where the norm runs over ALL "
            "non-batch dimensions of one sample (a 2D point, or a whole 3x32x32 image). SIM's generator loss only "
            "needs its gradient d'(y) = grad_y d(y). Given y of shape (batch, *shape) and the constant c > 0, "
            "return d'(y) (same shape as y), one sample at a time."),
    args=(("y", "score differences s_psi - s_q, shape (batch, *shape)"), ("c", "the pseudo-Huber constant, c > 0")),
    returns="d'(y) = y / sqrt(||y||_2^2 + c^2), the norm per sample",
    return_note="d'(y), a torch.Tensor shaped like y",
    reference=_ref_pseudo_huber_grad,
    hint=("differentiate sqrt(r + c^2) with r = ||y||^2: d/dy = (1/2)(r + c^2)^(-1/2) * 2y. Compute r per sample "
          "with y.reshape(y.shape[0], -1) and reshape it so that it broadcasts against y."),
    graded_by="value",
    mistakes=(
        (lambda y, c: 2 * _ref_pseudo_huber_grad(y, c),
         "a factor 2 too many: this is Table 4's d' as printed (erratum distill.table4_pseudo_huber); the 2 from "
         "differentiating ||y||^2 cancels the 1/2 from the square root."),
        (lambda y, c: y / torch.sqrt((y * y).sum() + c * c),
         "the norm runs over the whole batch; d is a distance per sample (one norm per row)."),
        (lambda y, c: y / torch.sqrt(y * y + c * c),
         "you normalised each coordinate separately (that is the derivative of sum_i sqrt(y_i^2 + c^2), a smoothed "
         "L1); the pseudo-Huber norm is over all coordinates of a sample."),
        (lambda y, c: y / (_per_sample_norm(y) + c),
         "the constant enters under the square root: sqrt(||y||^2 + c^2), not ||y|| + c."),
        (lambda y, c: y / _per_sample_norm(y),
         "c is missing: without it d' is undefined at y = 0 (SIM's adaptive normalisation keeps c > 0)."),
    )))

register(_distill(
    name="huber_grad",
    guards=('dstar_edu.objectives.divergences:Huber.grad',),
    source="SIM App. A.3 (corrected), Table 4 (row 5)",
    prompt=("The Huber distance sums L_delta(y_i) over the coordinates of a sample, with L_delta(u) = u^2/2 for "
            "|u| <= delta and delta (|u| - delta/2) otherwise. Return its gradient d'(y) (same shape as y). "
            "Careful: SIM App. A.3 prints the two branches the other way round."),
    args=(("y", "score differences, shape (batch, *shape)"), ("delta", "the Huber threshold, delta > 0")),
    returns="d'(y) = y where |y| <= delta, delta * sign(y) elsewhere (i.e. clamp(y, -delta, delta))",
    return_note="d'(y), a torch.Tensor shaped like y",
    reference=_ref_huber_grad,
    hint="quadratic near 0 (slope u), linear far away (slope +-delta): the gradient is y clipped to [-delta, delta].",
    graded_by="value",
    mistakes=(
        (lambda y, delta: torch.where(y >= delta, y, delta * torch.sign(y)),
         "this is the derivative of App. A.3's definition as printed (branches swapped, erratum "
         "distill.huber_branches): quadratic for small |y|, linear for large |y|."),
        (lambda y, delta: torch.where(y.abs() <= delta, y, torch.full_like(y, delta)),
         "the linear branch has slope -delta for negative y: use delta * sign(y)."),
        (lambda y, delta: torch.where(y.abs() <= delta, y, delta * (y.abs() - delta / 2)),
         "you returned the Huber *value* on the linear branch; the derivative there is delta * sign(y)."),
    )))

register(_distill(
    name="sim_loss",
    guards=('dstar_edu.objectives.distill:sim_generator_loss',),
    source="SIM Eq. 3.7-3.8, Thm 3.1",
    prompt=("Write SIM's generator loss with the pseudo-Huber distance (SIM Eq. 3.7-3.8), as a batch mean: noise "
            "the generator output x0 to x_t with alpha and sigma, evaluate the two scores there, form their "
            "difference y and the pseudo-Huber d'(y) of Table 4 (the previous exercise, one norm per sample), and "
            "pair it with the fake score minus the conditional score of the forward kernel, as Eq. 3.7 does. x0 "
            "carries the gradient to the generator's parameters. The two score functions are frozen networks: do "
            "not stop the gradient anywhere -- Thm 3.1 needs it to flow through x_t into BOTH score evaluations "
            "and into y. Your loss is graded by its gradient."),
    args=(("x0", "generator output (batch, *shape), carrying gradient"), ("eps", "forward noise, same shape"),
          ("alpha", "alpha(t), shape (batch, 1, ...) broadcasting against x0"), ("sigma", "sigma(t), same"),
          ("teacher_score", "callable x_t -> s_q(x_t) (frozen pre-trained score at this t)"),
          ("fake_score", "callable x_t -> s_psi(x_t) (frozen online score at this t)"),
          ("c", "pseudo-Huber constant")),
    returns="the scalar loss of SIM Eq. 3.8 (its theta-gradient is graded)",
    return_note="the scalar loss of SIM Eq. 3.8 (its theta-gradient is graded)",
    reference=_ref_sim_loss,
    hint=("build x_t from x0 (no detach) and evaluate both scores at that x_t; the conditional score of "
          "q(x_t | x0) is the one of the previous notebooks (Eq. 16-17), written with eps and sigma. Every quantity "
          "keeps its graph."),
    hints=("form d'(y) = y / sqrt(||y||^2 + c^2) per sample and return mean_i of -d'(y_i) . (s_psi + eps/sigma)_i.",),
    graded_by="gradient",
    mistakes=(
        (_sim_variant("detach_y"),
         "y (hence d'(y)) is detached: Thm 3.1 differentiates d'(y_t) through x_t too. With a location-only "
         "generator this mistake is invisible in expectation; with a learnable scale it is not "
         "(check distill.sim_gradient_flow)."),
        (_sim_variant("detach_inputs"),
         "the scores are evaluated at a detached x_t: then the loss does not depend on theta at all. The networks' "
         "*parameters* are frozen, their *inputs* must carry the gradient."),
        (_sim_variant("di_surrogate"),
         "this is a Diff-Instruct-style surrogate sg(d'(y)) . x_t: it is the right form for the KL divergence "
         "(Luo talk Thm 3.3), not for a score divergence."),
        (_sim_variant("plus_sign"), "sign error: Eq. 3.7 has -d'(y_t)^T (...)."),
        (_sim_variant("factor_two"), "a factor 2 too many in d' (Table 4's printed pseudo-Huber row)."),
        (_sim_variant("conditional_sign"),
         "grad log q(x_t|x0) = -(x_t - alpha x0)/sigma^2 = -eps/sigma, so s_psi - grad log q = s_psi + eps/sigma."),
        (_sim_variant("no_c"), "the constant c is missing inside the square root."),
        (_sim_variant("batch_norm"), "the norm ||y|| must be per sample, not over the batch."),
        (_sim_variant("sum"), "you sum over the batch; the loss is the batch mean."),
    )))
