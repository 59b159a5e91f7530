"""Graded classroom exercises on one-step score distillation (SIM Sec. 3.3, Eq. 3.7-3.8, Table 4, App. A.3).

Same interface as ``dstar_edu.exercises``: a student writes a function, ``check`` runs it and the reference on
the same random float64 problems (2D points and 3x32x32 images) and prints "Correct!" or what went wrong (the
failing input, the max error, a diagnosis when the answer matches a catalogued mistake, a hint). Wrong
answers never raise; ``check`` returns ``True``/``False``.

    >>> from dstar_edu import exercises_distill as ex
    >>> ex.list_exercises()
    ['pseudo_huber_grad', 'huber_grad', 'sim_loss']
    >>> ex.describe("sim_loss")
    >>> ex.check("sim_loss", my_sim_loss)

``pseudo_huber_grad`` and ``huber_grad`` are graded by value (``d'(y)`` of SIM Table 4, the corrected forms).
``sim_loss`` is graded by its *gradient*: the student's loss is evaluated on the generator output
``x0 = g_theta(z)`` of an exact generator, and its theta-gradient must equal that of
``objectives.distill.sim_generator_loss`` (SIM Eq. 3.8), whose expectation is the gradient of the score
divergence (SIM Thm 3.1, check ``distill.sim_thm31.pseudo_huber``). The catalogued mistakes are the
gradient-flow choices that the check ``distill.sim_gradient_flow`` rejects.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from .process import VP

Tensor = torch.Tensor

__all__ = ["DistillExercise", "EXERCISES", "RTOL", "ATOL", "check", "describe", "list_exercises", "reference",
           "sample_inputs"]

#: an answer passes when ``max|got - expected| <= RTOL * max|expected| + ATOL`` on every trial
RTOL = 1e-8
ATOL = 1e-12
#: trial dimensions, cycled: 2D points and CIFAR-shaped images through the same code
TRIAL_DIMS = (2, 3072, 2)

_PROCESS = VP()


@dataclass(frozen=True)
class DistillExercise:
    name: str
    source: str
    prompt: str
    args: tuple[tuple[str, str], ...]
    returns: str
    reference: Callable
    hint: str
    graded_by: str                                      # "value" or "gradient"
    mistakes: tuple[tuple[Callable, str], ...] = ()

    @property
    def signature(self) -> str:
        return f"def my_{self.name}({', '.join(a for a, _ in self.args)}):"


# ---- reference solutions ----------------------------------------------------------------------------------------
def _ref_pseudo_huber_grad(y, c):
    from .objectives.divergences import PseudoHuber
    return PseudoHuber(c).grad(y)


def _ref_huber_grad(y, delta):
    from .objectives.divergences import Huber
    return Huber(delta).grad(y)


def _per_sample_norm(y):
    return torch.sqrt((y * y).reshape(y.shape[0], -1).sum(1)).reshape(-1, *[1] * (y.ndim - 1))


def _sum(v):
    return v.reshape(v.shape[0], -1).sum(1)


def _ref_sim_loss(x0, eps, alpha, sigma, teacher_score, fake_score, c):
    """SIM Eq. 3.8 via the library: -y^T (s_psi(x_t) + eps/sigma) / sqrt(||y||^2 + c^2), batch mean."""
    from .objectives.divergences import PseudoHuber
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


EXERCISES: dict[str, DistillExercise] = {}


def _add(ex: DistillExercise) -> None:
    EXERCISES[ex.name] = ex


_add(DistillExercise(
    name="pseudo_huber_grad", source="SIM Eq. 3.8, Table 4 (row 6, corrected)",
    prompt=("The pseudo-Huber distance of SIM is d(y) = sqrt(||y||_2^2 + c^2) - c, where the norm runs over ALL "
            "non-batch dimensions of one sample (a 2D point, or a whole 3x32x32 image). SIM's generator loss only "
            "needs its gradient d'(y) = grad_y d(y). Given y of shape (batch, *shape) and the constant c > 0, "
            "return d'(y) (same shape as y), one sample at a time."),
    args=(("y", "score differences s_psi - s_q, shape (batch, *shape)"), ("c", "the pseudo-Huber constant, c > 0")),
    returns="d'(y) = y / sqrt(||y||_2^2 + c^2), the norm per sample",
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

_add(DistillExercise(
    name="huber_grad", source="SIM App. A.3 (corrected), Table 4 (row 5)",
    prompt=("The Huber distance sums L_delta(y_i) over the coordinates of a sample, with L_delta(u) = u^2/2 for "
            "|u| <= delta and delta (|u| - delta/2) otherwise. Return its gradient d'(y) (same shape as y). "
            "Careful: SIM App. A.3 prints the two branches the other way round."),
    args=(("y", "score differences, shape (batch, *shape)"), ("delta", "the Huber threshold, delta > 0")),
    returns="d'(y) = y where |y| <= delta, delta * sign(y) elsewhere (i.e. clamp(y, -delta, delta))",
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

_add(DistillExercise(
    name="sim_loss", source="SIM Eq. 3.7-3.8, Thm 3.1",
    prompt=("Write SIM's generator loss with the pseudo-Huber distance (Eq. 3.8), batch mean:\n"
            "  x_t = alpha x0 + sigma eps,   y = s_psi(x_t) - s_q(x_t),\n"
            "  L = mean_i  -( y_i / sqrt(||y_i||^2 + c^2) )^T ( s_psi(x_t,i) - grad log q(x_t,i | x0,i) ),\n"
            "with grad log q(x_t | x0) = -eps / sigma. x0 carries the gradient to the generator's parameters. The "
            "two score functions are frozen networks: do not stop the gradient anywhere -- Thm 3.1 needs it to flow "
            "through x_t into BOTH score evaluations and into y. Your loss is graded by its gradient."),
    args=(("x0", "generator output (batch, *shape), carrying gradient"), ("eps", "forward noise, same shape"),
          ("alpha", "alpha(t), shape (batch, 1, ...) broadcasting against x0"), ("sigma", "sigma(t), same"),
          ("teacher_score", "callable x_t -> s_q(x_t) (frozen pre-trained score at this t)"),
          ("fake_score", "callable x_t -> s_psi(x_t) (frozen online score at this t)"),
          ("c", "pseudo-Huber constant")),
    returns="the scalar loss of SIM Eq. 3.8 (its theta-gradient is graded)",
    reference=_ref_sim_loss,
    hint=("build x_t from x0 (no detach), evaluate both scores at that x_t, form d'(y) = y / sqrt(||y||^2 + c^2) "
          "per sample, and return mean_i of -d'(y_i) . (s_psi + eps/sigma)_i. Every quantity keeps its graph."),
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


# ---- inputs -------------------------------------------------------------------------------------------------------
def _value_inputs(name: str, dim: int, g: torch.Generator) -> dict:
    f64 = torch.float64
    shape = (7, 2) if dim == 2 else (2, 3, 32, 32)
    y = torch.randn(shape, generator=g, dtype=f64) * (2.0 if name == "huber_grad" else 1.0)
    if name == "pseudo_huber_grad":
        return {"y": y, "c": float(0.05 + torch.rand((), generator=g))}
    return {"y": y, "delta": float(0.3 + torch.rand((), generator=g))}


def sample_inputs(name: str, n_trials: int = 3, seed: int = 0) -> list[dict]:
    """The inputs ``check`` uses for a value-graded exercise (same seed -> same inputs)."""
    ex = _get(name)
    if ex.graded_by != "value":
        raise ValueError(f"exercise {name!r} is graded by its gradient on a generated model; it has no fixed inputs")
    g = torch.Generator().manual_seed(int(seed))
    return [_value_inputs(name, TRIAL_DIMS[i % len(TRIAL_DIMS)], g) for i in range(n_trials)]


def _sim_setup(dim: int, g: torch.Generator):
    """An exact generator, an exact teacher and a different frozen exact fake score, one batch."""
    from .generators import AffineGaussianGenerator, MixtureGenerator
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


# ---- grading ------------------------------------------------------------------------------------------------------
def _get(name: str) -> DistillExercise:
    if name not in EXERCISES:
        raise ValueError(f"exercise name={name!r} is unknown; allowed: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def list_exercises() -> list[str]:
    return list(EXERCISES)


def reference(name: str) -> Callable:
    """The reference solution (for instructors)."""
    return _get(name).reference


def describe(name: str) -> None:
    ex = _get(name)
    lines = [f"Exercise {ex.name!r} ({ex.source})", "", ex.prompt, "", "Implement:", f"    {ex.signature}"]
    lines += [f"        # {a}: {meaning}" for a, meaning in ex.args]
    lines += [f"        ...  # return {ex.returns}", ""]
    if ex.graded_by == "gradient":
        lines.append("Graded by the gradient of your loss with respect to an exact generator's parameters, against "
                     "objectives.distill.sim_generator_loss, on 2D points and 3x32x32 images, float64, "
                     f"rtol {RTOL:g}.")
    else:
        lines.append(f"Graded by value on random float64 inputs: max|got - expected| <= {RTOL:g} max|expected| + {ATOL:g}.")
    print("\n".join(lines))


def _close(got: Tensor, expected: Tensor) -> tuple[bool, float, float]:
    err = (got.to(torch.float64) - expected).abs().max().item()
    tol = RTOL * expected.abs().max().item() + ATOL
    return err <= tol, err, tol      # NaN compares False


def _student_error(ex: DistillExercise, exc: BaseException, where: str) -> str:
    if isinstance(exc, NotImplementedError):
        return f"Not implemented yet: my_{ex.name} raised NotImplementedError on {where}.\nHint: {ex.hint}"
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return (f"Your function raised {type(exc).__name__}: {exc}\n  on {where}.\n"
            f"Traceback (last lines):\n{''.join(tb[-2:]).rstrip()}\nHint: {ex.hint}")


def _grade_value(ex: DistillExercise, student_fn, trial: int, g: torch.Generator):
    dim = TRIAL_DIMS[trial % len(TRIAL_DIMS)]
    args = _value_inputs(ex.name, dim, g)
    where = f"trial {trial + 1} (y of shape {tuple(args['y'].shape)})"
    expected = ex.reference(*[v.clone() if isinstance(v, Tensor) else v for v in args.values()])
    try:
        got = student_fn(*[v.clone() if isinstance(v, Tensor) else v for v in args.values()])
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return False, _student_error(ex, exc, where)
    if got is None:
        return False, f"Your function returned None on {where}: did you forget the `return` statement?"
    if not isinstance(got, Tensor):
        return False, f"Your function returned a {type(got).__name__} on {where}; return a torch.Tensor."
    if tuple(got.shape) != tuple(expected.shape):
        return False, f"Wrong shape on {where}: expected {tuple(expected.shape)} (the shape of y), got {tuple(got.shape)}."
    ok, err, tol = _close(got, expected)
    if ok:
        return True, None
    lines = [f"Not yet: wrong values on {where}.", f"  max |got - expected| = {err:.3g} (allowed {tol:.3g})"]
    if not torch.isfinite(got).all():
        lines.append("  Your result contains NaN or inf: check for a division by zero.")
    for wrong, why in ex.mistakes:
        if _close(got, wrong(*args.values()))[0]:
            lines.append(f"  Likely mistake: {why}")
            break
    lines.append(f"Hint ({ex.source}): {ex.hint}")
    return False, "\n".join(lines)


def _grade_gradient(ex: DistillExercise, student_fn, trial: int, g: torch.Generator):
    dim = TRIAL_DIMS[trial % len(TRIAL_DIMS)]
    teacher, gen, fake, z, eps, t = _sim_setup(dim, g)
    params = list(gen.parameters())
    c = 0.5
    where = f"trial {trial + 1} ({'2D points' if dim == 2 else '3x32x32 images'}, batch {z.shape[0]})"
    a, s = _PROCESS.coefficients(t, eps)

    def grad_of(fn):
        loss = fn(gen(z), eps, a, s, lambda x: teacher.predict("score", x, t), lambda x: fake.predict("score", x, t), c)
        if loss is None:
            raise ValueError("your function returned None: did you forget the `return` statement?")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar tensor, got {type(loss).__name__} of shape "
                             f"{tuple(getattr(loss, 'shape', ()))}")
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on x0 (no gradient): let x0, hence x_t, carry the gradient")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if q is None else q).reshape(-1) for q, p in zip(grads, params)])
    from .objectives.distill import sim_generator_loss
    expected = torch.cat([q.reshape(-1) for q in torch.autograd.grad(
        sim_generator_loss(gen(z), teacher, fake, t, eps=eps, distance="pseudo_huber", c=c), params)])
    try:
        got = grad_of(student_fn)
    except Exception as exc:  # noqa: BLE001
        return False, _student_error(ex, exc, where)
    ok, err, tol = _close(got, expected)
    if ok:
        return True, None
    lines = [f"Not yet: the gradient of your loss is wrong on {where}.",
             f"  max |grad(yours) - grad(SIM Eq. 3.8)| = {err:.3g} (allowed {tol:.3g})"]
    for wrong, why in ex.mistakes:
        try:
            if _close(got, grad_of(wrong))[0]:
                lines.append(f"  Likely mistake: {why}")
                break
        except Exception:  # noqa: BLE001 - a mistake that cannot be differentiated cannot match
            continue
    lines.append(f"Hint ({ex.source}): {ex.hint}")
    return False, "\n".join(lines)


def check(name: str, student_fn: Callable, n_trials: int = 3, seed: int = 0) -> bool:
    """Grade ``student_fn`` on ``n_trials`` random problems; prints "Correct! ..." or an explanation."""
    ex = _get(name)
    if not callable(student_fn):
        print(f"Not a function: check({name!r}, ...) needs the function itself, got {type(student_fn).__name__}. "
              f"Define it as `{ex.signature}` and pass its name without calling it.")
        return False
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials={n_trials!r} must be a positive integer")
    g = torch.Generator().manual_seed(int(seed))
    grade = _grade_gradient if ex.graded_by == "gradient" else _grade_value
    for trial in range(n_trials):
        ok, msg = grade(ex, student_fn, trial, g)
        if not ok:
            print(msg)
            return False
    what = "its gradient matches SIM's" if ex.graded_by == "gradient" else "it matches the reference"
    print(f"Correct! my_{name}: {what} ({ex.source}) on {n_trials} random problems (2D points and 3x32x32 images).")
    return True
