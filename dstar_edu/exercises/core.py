"""The grading machinery shared by every exercise area: one registry, one way to call and explain an answer.

An area module (``basics``, ``distill``, ``align``) builds :class:`Exercise` objects -- prompt, reference
solution, a trial generator, a hint and the catalogued typical mistakes -- and adds them with :func:`register`.
:func:`check` does the rest, the same way for every area:

* it draws ``n_trials`` random float64 problems from ``Generator().manual_seed(seed)`` (same seed, same problems);
* it calls the student's function positionally on copies of the inputs and reports, instead of raising,
  an exception (``NotImplementedError`` as "not implemented yet"), a ``None`` or non-tensor result and a
  wrong shape;
* ``graded_by="value"``: the result must satisfy ``max|got - expected| <= RTOL * max|expected| + ATOL``;
  ``graded_by="gradient"``: the student returns a scalar loss, and its gradient with respect to a generator's
  parameters must match the trial's exact gradient to the same tolerance (a trial may widen ``atol``);
* a wrong answer is explained: the failing trial, the max error (and the entries that differ most), NaN/inf,
  the catalogued mistake it matches, a float32 or rounding-level near miss, and the exercise's hint.

``check`` prints "Correct! ..." or the explanation and returns ``True``/``False``.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

Tensor = torch.Tensor

__all__ = ["Exercise", "Trial", "GradientTrial", "EXERCISES", "RTOL", "ATOL", "GRADED_BY", "register", "check",
           "describe", "list_exercises", "reference", "sample_inputs", "over_dims", "batch_label", "flat_grad"]

#: an answer passes when ``max|got - expected| <= RTOL * max|expected| + ATOL`` on every trial
RTOL = 1e-8
ATOL = 1e-12
GRADED_BY = ("value", "gradient")


@dataclass(frozen=True)
class Trial:
    """One value-graded problem: the arguments in call order; ``note`` completes its description in messages."""
    inputs: dict[str, Any]
    note: str = ""

    @property
    def label(self) -> str:
        first, x = next(iter(self.inputs.items()))
        return f"{first} of shape {tuple(x.shape)}" + (f", {self.note}" if self.note else "")


@dataclass(frozen=True)
class GradientTrial:
    """One gradient-graded problem: ``loss(fn)`` calls a loss function (the student's, the reference or a
    catalogued mistake) with this problem's arguments; the gradient of that scalar with respect to ``params``,
    flattened and concatenated, must equal ``expected`` (to ``RTOL`` and ``atol``)."""
    label: str
    params: list[Tensor]
    loss: Callable[[Callable], Any]
    expected: Tensor
    atol: float = ATOL


def over_dims(dims: tuple[int, ...], make: Callable[[int, torch.Generator], Trial | GradientTrial]):
    """A ``draw`` for ``Exercise``: trial ``i`` is ``make(dims[i % len(dims)], g)`` (e.g. 2 = 2D points,
    3072 = 3x32x32 images)."""
    return lambda trial, g: make(dims[trial % len(dims)], g)


def batch_label(dim: int, batch: int) -> str:
    """How a message names a generated batch: ``"2D points, batch 16"`` or ``"3x32x32 images, batch 4"``."""
    return f"{'2D points' if dim == 2 else '3x32x32 images'}, batch {batch}"


def flat_grad(objective: Tensor, params: list[Tensor]) -> Tensor:
    """The gradient of a scalar with respect to ``params``, flattened and concatenated (``GradientTrial.expected``)."""
    return torch.cat([q.reshape(-1) for q in torch.autograd.grad(objective, params)])


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the student reads (``describe``), how it is graded and what a wrong answer is told."""
    name: str
    area: str                                      # "basics", "distill", "align": list_exercises(area)
    source: str                                    # paper / handbook equation
    prompt: str                                    # one paragraph
    args: tuple[tuple[str, str], ...]              # (argument name, meaning), in call order
    returns: str                                   # the formula (for instructors; describe shows return_note if set)
    reference: Callable
    hint: str                                      # always shown on a wrong answer
    draw: Callable[[int, torch.Generator], Trial | GradientTrial]   # trial i, drawn from the check's generator
    graded_by: str = "value"                       # "value" or "gradient"
    mistakes: tuple[tuple[Callable, str], ...] = ()  # (typical wrong answer, diagnosis)
    n_trials: int = 3                              # check's default number of trials
    covers: str = "2D points and 3x32x32 images"   # what the trials span, for messages ("" to say nothing)
    call_note: str = ""                            # completes "It is called positionally as f(args)" on an exception
    shape_note: str = ""                           # added when an answer has more dimensions than expected
    return_note: str = ""                          # what describe says to return ("" -> returns)
    against: str = ""                              # gradient-graded: the objective whose gradient is matched
    grading: str = ""                              # gradient-graded: how that exact gradient is computed (describe)

    @property
    def signature(self) -> str:
        return f"def my_{self.name}({', '.join(a for a, _ in self.args)}):"


EXERCISES: dict[str, Exercise] = {}


def register(*exercises: Exercise) -> None:
    """Add exercises to the single registry (names are unique across areas)."""
    for ex in exercises:
        if ex.name in EXERCISES:
            raise ValueError(f"exercise name={ex.name!r} is already registered (area {EXERCISES[ex.name].area!r})")
        if ex.graded_by not in GRADED_BY:
            raise ValueError(f"graded_by={ex.graded_by!r} is unknown; allowed: {', '.join(GRADED_BY)}")
        EXERCISES[ex.name] = ex


# ---- public API ------------------------------------------------------------------------------------------
def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ValueError(f"exercise name={name!r} is unknown; allowed: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def _n_trials(ex: Exercise, n_trials) -> int:
    n = ex.n_trials if n_trials is None else n_trials
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n_trials={n_trials!r} must be a positive integer")
    return n


def list_exercises(area: str | None = None) -> list[str]:
    """Names of the registered exercises, of one area (``"basics"``, ``"distill"``, ``"align"``) or all."""
    if area is None:
        return list(EXERCISES)
    areas = list(dict.fromkeys(ex.area for ex in EXERCISES.values()))
    if area not in areas:
        raise ValueError(f"area={area!r} is unknown; allowed: {', '.join(areas)}")
    return [name for name, ex in EXERCISES.items() if ex.area == area]


def reference(name: str) -> Callable:
    """The reference solution of exercise ``name`` (for instructors)."""
    return _get(name).reference


def _covering(ex: Exercise) -> str:
    return f" ({ex.covers})" if ex.covers else ""


def describe(name: str) -> None:
    """Print the exercise prompt, the function signature to implement and how it is graded."""
    ex = _get(name)
    lines = [f"Exercise {ex.name!r} ({ex.source})", "", ex.prompt, "", "Implement:", f"    {ex.signature}"]
    lines += [f"        # {a}: {meaning}" for a, meaning in ex.args]
    lines += [f"        ...  # return {ex.return_note or ex.returns}", ""]
    if ex.graded_by == "gradient":
        lines.append(f"Graded by exercises.check({ex.name!r}, my_{ex.name}) by the gradient of your loss with "
                     f"respect to a generator's parameters, against the exact gradient of {ex.against}, on "
                     f"{ex.n_trials} random float64 problems{_covering(ex)}, rtol {RTOL:g}."
                     + (f" {ex.grading}" if ex.grading else ""))
    else:
        lines.append(f"Graded by exercises.check({ex.name!r}, my_{ex.name}) on {ex.n_trials} random float64 inputs"
                     f"{_covering(ex)}: max|got - expected| <= {RTOL:g} * max|expected| + {ATOL:g}.")
    print("\n".join(lines))


def sample_inputs(name: str, n_trials: int | None = None, seed: int = 0) -> list[dict]:
    """The inputs ``check`` passes for value-graded exercise ``name``, in argument order (same seed -> same
    inputs); ``n_trials`` defaults to check's."""
    ex = _get(name)
    if ex.graded_by != "value":
        raise ValueError(f"exercise {name!r} is graded by its gradient on a generated model; it has no fixed inputs")
    g = torch.Generator().manual_seed(int(seed))
    return [ex.draw(i, g).inputs for i in range(_n_trials(ex, n_trials))]


# ---- calling the student and explaining the answer -------------------------------------------------------
class _Rejected(Exception):
    """A wrong answer; the argument is the explanation to print."""


def _copies(inputs: dict) -> list:
    return [v.clone() if isinstance(v, Tensor) else v for v in inputs.values()]


def _call(ex: Exercise, fn_name: str, where: str, call: Callable[[], Any]) -> Tensor:
    """Run ``call()`` (which calls the student's function); its result as a tensor, or ``_Rejected``."""
    arg_names = ", ".join(a for a, _ in ex.args)
    try:
        got = call()
    except NotImplementedError:
        raise _Rejected(f"Not implemented yet: {fn_name}({arg_names}) raised NotImplementedError on {where}.\n"
                        f"Replace the body with your formula. Hint: {ex.hint}") from None
    except Exception as exc:  # noqa: BLE001 - the student's error is reported, not raised
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        raise _Rejected(f"Your function raised {type(exc).__name__}: {exc}\n  on {where}.\n"
                        f"It is called positionally as f({arg_names}){ex.call_note}.\n"
                        f"Traceback (last lines):\n{''.join(tb[-2:]).rstrip()}\nHint: {ex.hint}") from None
    if got is None:
        raise _Rejected(f"Your function returned None on {where}: did you forget the `return` statement?")
    try:
        return torch.as_tensor(got)
    except Exception:  # noqa: BLE001
        raise _Rejected(f"Your function returned a {type(got).__name__}, which is not a tensor, on {where}. "
                        "Return a torch.Tensor.") from None


def _close(got: Tensor, expected: Tensor, atol: float = ATOL) -> tuple[bool, float, float]:
    err = (got.detach().to(torch.float64) - expected).abs().max().item()
    tol = RTOL * expected.abs().max().item() + atol
    return err <= tol, err, tol  # a NaN error compares False


def _entries(expected: Tensor, got: Tensor, k: int = 3) -> str:
    err = (got - expected).abs().nan_to_num(float("inf")).flatten()
    idx = torch.topk(err, min(k, err.numel())).indices
    rows = []
    for i in idx.tolist():
        pos = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), expected.shape))
        want, have = expected.flatten()[i].item(), got.flatten()[i].item()
        rows.append(f"    at index {pos}: expected {want: .10g}, got {have: .10g}")
    return "\n".join(rows)


def _explain(ex: Exercise, lines: list[str], got: Tensor, expected: Tensor, err: float,
             answer_of: Callable[[Callable], Tensor | None], atol: float = ATOL) -> str:
    """Finish the explanation of a wrong ``got``: NaN/inf, the matching catalogued mistake (``answer_of(wrong)``
    is what that mistake gives on this trial), else a float32 or rounding-level near miss; then the hint."""
    if not torch.isfinite(got).all():
        lines.append("  Your result contains NaN or inf: check for a division by zero "
                     "or the sqrt of a negative number.")
    diagnosis = None
    for wrong, why in ex.mistakes:
        try:
            answer = answer_of(wrong)
        except Exception:  # noqa: BLE001 - a mistake that cannot be evaluated here cannot match
            continue
        if answer is not None and answer.shape == got.shape and _close(got, answer, atol)[0]:
            diagnosis = why
            break
    if diagnosis:
        lines.append(f"  Likely mistake: {diagnosis}")
    elif got.dtype != torch.float64:
        lines.append(f"  Your result is {got.dtype}: keep float64 all the way (no .float() or float32 constants).")
    elif err <= 1e-4 * max(expected.abs().max().item(), 1.0):
        lines.append("  Very close: a rounding-level difference, e.g. a float32 intermediate "
                     "or an approximate constant.")
    lines.append(f"Hint ({ex.source}): {ex.hint}")
    return "\n".join(lines)


def _grade_value(ex: Exercise, student_fn: Callable, fn_name: str, trial: Trial, where: str) -> None:
    expected = ex.reference(*_copies(trial.inputs))
    got = _call(ex, fn_name, where, lambda: student_fn(*_copies(trial.inputs)))
    if tuple(got.shape) != tuple(expected.shape):
        x = next(iter(trial.inputs.values()))
        same = " (the shape of the first argument)" if isinstance(x, Tensor) and x.shape == expected.shape else ""
        extra = f" {ex.shape_note}" if ex.shape_note and got.ndim > expected.ndim else ""
        raise _Rejected(f"Wrong shape on {where}: expected {tuple(expected.shape)}{same}, "
                        f"got {tuple(got.shape)}.{extra}")
    ok, err, tol = _close(got, expected)
    if ok:
        return
    lines = [f"Not yet: wrong values on {where}.",
             f"  max |got - expected| = {err:.3g} (allowed {tol:.3g}); the entries that differ most:",
             _entries(expected, got.detach().to(torch.float64))]
    raise _Rejected(_explain(ex, lines, got, expected, err,
                             lambda wrong: torch.as_tensor(wrong(*_copies(trial.inputs)))))


def _gradient(trial: GradientTrial, loss: Tensor) -> Tensor | None:
    """The flattened gradient of ``loss`` with respect to ``trial.params``; None if a parameter gets none."""
    grads = torch.autograd.grad(loss, trial.params, allow_unused=True)
    if any(q is None for q in grads):
        return None
    return torch.cat([q.reshape(-1) for q in grads])


def _mistake_gradient(trial: GradientTrial, wrong: Callable) -> Tensor | None:
    loss = trial.loss(wrong)
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        return None
    return _gradient(trial, loss)


def _grade_gradient(ex: Exercise, student_fn: Callable, fn_name: str, trial: GradientTrial, where: str) -> None:
    loss = _call(ex, fn_name, where, lambda: trial.loss(student_fn))
    wrt = ex.args[0][0]
    if loss.numel() != 1:
        raise _Rejected(f"Wrong shape on {where}: the loss must be a scalar tensor, got shape {tuple(loss.shape)}.")
    if not loss.requires_grad:
        raise _Rejected(f"Your loss does not depend on {wrt} (no gradient) on {where}: let {wrt} carry the "
                        f"gradient to the generator's parameters.\nHint: {ex.hint}")
    try:
        got = _gradient(trial, loss)
    except Exception as exc:  # noqa: BLE001
        raise _Rejected(f"Your loss could not be differentiated on {where}: {type(exc).__name__}: {exc}\n"
                        f"Hint: {ex.hint}") from None
    if got is None:
        raise _Rejected(f"Your loss does not depend on every generator parameter on {where}.\nHint: {ex.hint}")
    ok, err, tol = _close(got, trial.expected, trial.atol)
    if ok:
        return
    lines = [f"Not yet: the gradient of your loss is wrong on {where}.",
             f"  max |grad(yours) - grad({ex.against})| = {err:.3g} (allowed {tol:.3g})"]
    raise _Rejected(_explain(ex, lines, got, trial.expected, err,
                             lambda wrong: _mistake_gradient(trial, wrong), trial.atol))


def check(name: str, student_fn: Callable, n_trials: int | None = None, seed: int = 0) -> bool:
    """Grade ``student_fn`` against exercise ``name`` on ``n_trials`` random problems (default: the exercise's).

    Prints "Correct! ..." or an explanation (failing input, max error, a diagnosis, a hint); returns
    ``True``/``False``. Never raises for a wrong answer or an exception inside ``student_fn``.
    """
    ex = _get(name)
    if not callable(student_fn):
        print(f"Not a function: check({name!r}, ...) needs the function itself, got {type(student_fn).__name__}. "
              f"Define it as `{ex.signature}` and pass its name without calling it.")
        return False
    n = _n_trials(ex, n_trials)
    fn_name = getattr(student_fn, "__name__", f"my_{name}")
    fn_name = f"my_{name}" if fn_name == "<lambda>" else fn_name
    grade = _grade_gradient if ex.graded_by == "gradient" else _grade_value
    g = torch.Generator().manual_seed(int(seed))
    for i in range(n):
        trial = ex.draw(i, g)
        try:
            grade(ex, student_fn, fn_name, trial, f"trial {i + 1}/{n} ({trial.label})")
        except _Rejected as wrong:
            print(wrong.args[0])
            return False
    if ex.graded_by == "gradient":
        print(f"Correct! {fn_name}: its gradient matches the exact gradient of {ex.against} ({ex.source}) "
              f"on {n} random problems{_covering(ex)}.")
    else:
        print(f"Correct! {fn_name} matches the reference ({ex.source}) on {n} random inputs{_covering(ex)} "
              f"to rtol {RTOL:g}.")
    return True
