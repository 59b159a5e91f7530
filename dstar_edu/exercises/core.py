"""The grading machinery shared by every exercise area: one registry, one way to call and explain an answer.

An area module (``basics``, ``distill``, ``align``) builds :class:`Exercise` objects -- prompt, reference
solution, a trial generator, a hint and the catalogued typical mistakes -- and adds them with :func:`register`.
:func:`check` does the rest, the same way for every area:

* it draws ``n_trials`` random float64 problems from ``Generator().manual_seed(seed)``; by default the seed is
  fresh for every grading run (drawn from the OS, not chosen by the student) and printed, so a failure can be
  reproduced with ``check(name, fn, seed=...)`` while a table of ``sample_inputs`` answers is useless;
* while the student's function runs, the library functions that implement the answer (``Exercise.guards``),
  the exercise's reference and :func:`reference` / :func:`sample_inputs` refuse to run, with a message;
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

import contextlib
import importlib
import secrets
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..validation import check_choice, check_int

Tensor = torch.Tensor

__all__ = ["Exercise", "Trial", "GradientTrial", "OutcomeTrial", "GradingGuardError", "EXERCISES", "RTOL", "ATOL",
           "GRADED_BY", "register", "check",
           "describe", "list_exercises", "reference", "sample_inputs", "over_dims", "batch_label", "flat_grad"]

#: an answer passes when ``max|got - expected| <= RTOL * max|expected| + ATOL`` on every trial
RTOL = 1e-8
ATOL = 1e-12
GRADED_BY = ("value", "gradient", "outcome")


@dataclass(frozen=True)
class Trial:
    """One value-graded problem: the arguments in call order; ``note`` completes its description in messages."""
    inputs: dict[str, Any]
    note: str = ""
    times: Any = None        # per-sample times of the batch (1-d tensor), for "which time region" feedback

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


@dataclass(frozen=True)
class OutcomeTrial:
    """One outcome-graded problem: the student's function is called on ``inputs`` (in order) and ``judge(got)``
    returns ``None`` when the outcome is good enough, else a sentence saying which property failed (measured
    against an exact answer, e.g. the flow map of Gaussian data) without stating the formula."""
    label: str
    inputs: dict[str, Any]
    judge: Callable[[Tensor], str | None]
    run: Callable[[Callable], Any] | None = None    # if set, got = run(student_fn) (e.g. a training loop that
    #                                                 calls it many times) instead of student_fn(*inputs)
    probe: Callable[[Callable], Any] | None = None  # if set, catalogued mistakes match when probe(mistake) equals
    #                                                 probe(student_fn) (a cheap deterministic evaluation)


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
    guards: tuple[str, ...] = ()                   # "module:qualname" of library functions that implement the
    #                                                answer: they refuse to run while a student's answer is graded
    hints: tuple[str, ...] = ()                    # progressive hints after `hint` (the seed equation pointer):
    #                                                the k-th failed check in a session also shows hints[:k-1]

    @property
    def signature(self) -> str:
        return f"def my_{self.name}({', '.join(a for a, _ in self.args)}):"


EXERCISES: dict[str, Exercise] = {}


def register(*exercises: Exercise) -> None:
    """Add exercises to the single registry (names are unique across areas)."""
    for ex in exercises:
        if ex.name in EXERCISES:
            raise ValueError(f"exercise name={ex.name!r} is already registered (area {EXERCISES[ex.name].area!r})")
        check_choice("graded_by", ex.graded_by, GRADED_BY)
        EXERCISES[ex.name] = ex


# ---- public API ------------------------------------------------------------------------------------------
def _get(name: str) -> Exercise:
    check_choice("exercise name", name, EXERCISES)
    return EXERCISES[name]


def _n_trials(ex: Exercise, n_trials) -> int:
    n = ex.n_trials if n_trials is None else n_trials
    check_int("n_trials", n, lo=1)
    return n


def list_exercises(area: str | None = None) -> list[str]:
    """Names of the registered exercises, of one area (``"basics"``, ``"distill"``, ``"align"``) or all."""
    if area is None:
        return list(EXERCISES)
    areas = list(dict.fromkeys(ex.area for ex in EXERCISES.values()))
    check_choice("area", area, areas)
    return [name for name, ex in EXERCISES.items() if ex.area == area]


class GradingGuardError(RuntimeError):
    """Raised by a guarded function called while a student's answer is being graded."""


#: names of the exercises whose student answer is running right now (a stack: grading does not nest in practice)
_GRADING: list[str] = []


def _refuse_while_grading(what: str) -> None:
    if _GRADING:
        raise GradingGuardError(f"{what} refuses to run while exercise {_GRADING[-1]!r} is being graded: "
                                "write the computation yourself.")


def reference(name: str) -> Callable:
    """The reference solution of exercise ``name`` (for instructors); refuses to run while an answer is graded."""
    _refuse_while_grading("exercises.reference")
    return _get(name).reference


def _covering(ex: Exercise) -> str:
    return f" ({ex.covers})" if ex.covers else ""


def describe(name: str) -> None:
    """Print the exercise prompt, the function signature to implement and how it is graded."""
    ex = _get(name)
    lines = [f"Exercise {ex.name!r} ({ex.source})", "", ex.prompt, "", "Implement:", f"    {ex.signature}"]
    lines += [f"        # {a}: {meaning}" for a, meaning in ex.args]
    lines += [f"        ...  # return {ex.return_note or ex.returns}", ""]
    if ex.graded_by == "outcome":
        lines.append(f"Graded by exercises.check({ex.name!r}, my_{ex.name}) by its outcome on {ex.n_trials} "
                     f"random float64 problems{_covering(ex)}: {ex.grading}")
    elif ex.graded_by == "gradient":
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
    _refuse_while_grading("exercises.sample_inputs")
    ex = _get(name)
    if ex.graded_by == "gradient":
        raise ValueError(f"exercise {name!r} is graded by its gradient on a generated model; it has no fixed inputs")
    g = torch.Generator().manual_seed(int(seed))
    return [ex.draw(i, g).inputs for i in range(_n_trials(ex, n_trials))]


# ---- guards: what refuses to run while the student's function runs ---------------------------------------
def _resolve(target: str) -> Callable:
    """``"package.module:Qual.name"`` -> the function object (a plain function or a method's function)."""
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__func__", obj)


def _refusing_code(label: str, exercise: str):
    """A code object that raises ``GradingGuardError`` whatever it is called with; swapped into a guarded
    function's ``__code__`` so that every reference to that function object (``from m import f`` included)
    refuses. The message is a constant of the code, as the function keeps its own module's globals."""
    msg = (f"{label} refuses to run while exercise {exercise!r} is being graded: it implements the answer, "
           "so write the computation yourself.")
    namespace: dict[str, Any] = {}
    exec(f"def _refuse(*args, **kwargs):\n    raise RuntimeError({msg!r})", {}, namespace)  # noqa: S102
    return namespace["_refuse"].__code__


@contextlib.contextmanager
def _guarded(ex: Exercise):
    """While the block runs: ``ex.guards`` and ``ex.reference`` refuse to run, ``reference()`` and
    ``sample_inputs()`` too. Functions with a closure cannot have their code swapped; they are skipped."""
    targets = [(t, _resolve(t)) for t in ex.guards] + [("the reference solution", ex.reference)]
    swapped = []
    try:
        for label, fn in targets:
            code = getattr(fn, "__code__", None)
            if code is None or code.co_freevars:
                continue
            label = label.replace(":", ".")
            swapped.append((fn, code))
            fn.__code__ = _refusing_code(label, ex.name)
        _GRADING.append(ex.name)
        yield
    finally:
        if _GRADING and _GRADING[-1] == ex.name:
            _GRADING.pop()
        for fn, code in reversed(swapped):
            fn.__code__ = code


# ---- calling the student and explaining the answer -------------------------------------------------------
class _Rejected(Exception):
    """A wrong answer; the argument is the explanation to print."""


def _copies(inputs: dict) -> list:
    return [v.clone() if isinstance(v, Tensor) else v for v in inputs.values()]


def _call(ex: Exercise, fn_name: str, where: str, call: Callable[[], Any]) -> Tensor:
    """Run ``call()`` (which calls the student's function); its result as a tensor, or ``_Rejected``."""
    arg_names = ", ".join(a for a, _ in ex.args)
    try:
        with _guarded(ex):
            got = call()
    except NotImplementedError:
        raise _Rejected(f"Not implemented yet: {fn_name}({arg_names}) raised NotImplementedError on {where}.\n"
                        f"Replace the body with your own code (see {ex.source}).") from None
    except Exception as exc:  # noqa: BLE001 - the student's error is reported, not raised
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        raise _Rejected(f"Your function raised {type(exc).__name__}: {exc}\n  on {where}.\n"
                        f"It is called positionally as f({arg_names}){ex.call_note}.\n"
                        f"Traceback (last lines):\n{''.join(tb[-2:]).rstrip()}\n"
                        + "\n".join(_hint_lines(ex))) from None
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


#: how many times each exercise has failed in this session: the k-th failure shows the first k hint levels
_FAILURES: dict[str, int] = {}


def _hint_lines(ex: Exercise) -> list[str]:
    """Progressive hints: first only the seed equation to read, then the exercise's hint, then ``ex.hints``."""
    level = _FAILURES.get(ex.name, 0) + 1
    lines = [f"Hint 1 (re-read {ex.source}): write out the equation's symbols one by one and match each to an "
             "argument of your function."]
    if level >= 2:
        lines.append(f"Hint 2: {ex.hint}")
    for k, more in enumerate(ex.hints[:max(0, level - 2)], start=3):
        lines.append(f"Hint {k}: {more}")
    if level < 2 + len(ex.hints):
        lines.append("(Check again after a change: each further failure reveals one more hint.)")
    return lines


def _properties(got: Tensor, expected: Tensor, times=None) -> list[str]:
    """Which property of a wrong answer fails -- sign, overall scale, scale varying per sample (time), the time
    region -- measured against the reference without printing the formula."""
    g = got.detach().to(torch.float64)
    e = expected.to(torch.float64)
    if not torch.isfinite(g).all() or e.abs().max() == 0 or g.shape != e.shape:
        return []
    out = []
    fit = (g * e).sum() / (e * e).sum()                          # least-squares factor got ~ fit * expected
    resid = (g - fit * e).norm() / e.norm()
    if resid < 1e-6:
        if abs(fit + 1) < 1e-6:
            out.append("Property check: your answer has the right magnitude everywhere but the opposite sign.")
        elif fit < 0:
            out.append(f"Property check: your answer is the reference times {fit.item():.4g}: the sign and the "
                       "overall scale are both off.")
        else:
            out.append(f"Property check: your answer is the reference times {fit.item():.4g}: the direction is "
                       "right, an overall constant factor is off.")
        return out
    cos = ((g * e).sum() / (g.norm() * e.norm()).clamp_min(1e-300)).item()
    if cos < -0.5:
        out.append("Property check: your answer points against the reference (negative correlation): a sign is off.")
    if e.ndim >= 1 and e.shape[0] > 1:
        if e.ndim >= 2:          # a 1-d answer has one number per sample: any two are trivially proportional
            per = [((gi * ei).sum() / (ei * ei).sum().clamp_min(1e-300)).item() for gi, ei in zip(g, e)]
            per_resid = max(((gi - c * ei).norm() / ei.norm().clamp_min(1e-300)).item()
                            for gi, ei, c in zip(g, e, per))
            if per_resid < 1e-6:
                out.append("Property check: per sample your answer is the reference times a factor, but the factor "
                           f"changes from sample to sample (from {min(per):.4g} to {max(per):.4g}): a "
                           "time-dependent coefficient is wrong, not the structure.")
        if times is not None and torch.as_tensor(times).numel() == e.shape[0]:
            t = torch.as_tensor(times).to(torch.float64).flatten()
            bad = torch.tensor([not torch.allclose(gi, ei, rtol=RTOL * 10, atol=1e-10) for gi, ei in zip(g, e)])
            if bad.any() and not bad.all() and bool((t == t.round()).all()):      # integer (DDPM) times: list them
                out.append(f"Property check: correct at t = {sorted(int(v) for v in t[~bad].tolist())[:6]}, wrong at "
                           f"t = {sorted(int(v) for v in t[bad].tolist())[:6]}: look at what changes with the time.")
            elif bad.any() and not bad.all():                                   # continuous times: their ranges
                ok_t = t[~bad]
                out.append(f"Property check: correct for t in [{ok_t.min().item():.3g}, {ok_t.max().item():.3g}], "
                           f"wrong for t in [{t[bad].min().item():.3g}, {t[bad].max().item():.3g}]: look at what "
                           "changes with the time.")
            elif bad.all():
                rel = [((gi - ei).norm() / ei.norm().clamp_min(1e-300)).item() for gi, ei in zip(g, e)]
                lo, hi = t[torch.tensor(rel).argmin()].item(), t[torch.tensor(rel).argmax()].item()
                out.append(f"Property check: wrong at every t; the relative error is smallest at t = {lo:g} and "
                           f"largest at t = {hi:g}.")
    return out


def _explain(ex: Exercise, lines: list[str], got: Tensor, expected: Tensor, err: float,
             answer_of: Callable[[Callable], Tensor | None], atol: float = ATOL, times=None) -> str:
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
    else:
        lines += [f"  {p}" for p in _properties(got, expected, times)]
    lines += _hint_lines(ex)
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
                             lambda wrong: torch.as_tensor(wrong(*_copies(trial.inputs))), times=trial.times))


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
                        f"gradient to the generator's parameters.\n" + "\n".join(_hint_lines(ex)))
    try:
        got = _gradient(trial, loss)
    except Exception as exc:  # noqa: BLE001
        raise _Rejected(f"Your loss could not be differentiated on {where}: {type(exc).__name__}: {exc}\n"
                        + "\n".join(_hint_lines(ex))) from None
    if got is None:
        raise _Rejected(f"Your loss does not depend on every generator parameter on {where}.\n"
                        + "\n".join(_hint_lines(ex)))
    ok, err, tol = _close(got, trial.expected, trial.atol)
    if ok:
        return
    lines = [f"Not yet: the gradient of your loss is wrong on {where}.",
             f"  max |grad(yours) - grad({ex.against})| = {err:.3g} (allowed {tol:.3g})"]
    raise _Rejected(_explain(ex, lines, got, trial.expected, err,
                             lambda wrong: _mistake_gradient(trial, wrong), trial.atol))


def _grade_outcome(ex: Exercise, student_fn: Callable, fn_name: str, trial: OutcomeTrial, where: str) -> None:
    if trial.run is not None:
        got = _call(ex, fn_name, where, lambda: trial.run(student_fn))
    else:
        got = _call(ex, fn_name, where, lambda: student_fn(*_copies(trial.inputs)))
        x = next(iter(trial.inputs.values()))
        if isinstance(x, Tensor) and tuple(got.shape) != tuple(x.shape):
            raise _Rejected(f"Wrong shape on {where}: expected {tuple(x.shape)} (the shape of the first argument), "
                            f"got {tuple(got.shape)}.")
    failure = trial.judge(got.detach().to(torch.float64))
    if failure is None:
        return
    lines = [f"Not yet: {where}.", f"  {failure}"]
    if not torch.isfinite(got).all():
        lines.append("  Your result contains NaN or inf: check for a division by zero "
                     "or the sqrt of a negative number.")
    mine = got
    if trial.probe is not None:
        try:
            mine = _call(ex, fn_name, where, lambda: trial.probe(student_fn))
        except _Rejected:
            mine = None
    for wrong, why in ex.mistakes if mine is not None else ():
        try:
            answer = torch.as_tensor(trial.probe(wrong) if trial.probe is not None
                                     else wrong(*_copies(trial.inputs)))
        except Exception:  # noqa: BLE001 - a mistake that cannot be evaluated here cannot match
            continue
        if answer.shape == mine.shape and torch.allclose(mine.detach().to(torch.float64), answer.to(torch.float64),
                                                         rtol=RTOL, atol=ATOL, equal_nan=True):
            lines.append(f"  Likely mistake: {why}")
            break
    lines += _hint_lines(ex)
    raise _Rejected("\n".join(lines))


def check(name: str, student_fn: Callable, n_trials: int | None = None, seed: int | None = None) -> bool:
    """Grade ``student_fn`` against exercise ``name`` on ``n_trials`` random problems (default: the exercise's).

    ``seed=None`` (the default) draws fresh problems from an OS seed the student does not choose and prints it;
    pass that seed to reproduce a failure. Prints "Correct! ..." or an explanation (failing input, the property
    that fails, a diagnosis, progressive hints); returns ``True``/``False``. Never raises for a wrong answer or
    an exception inside ``student_fn``.
    """
    ex = _get(name)
    if not callable(student_fn):
        print(f"Not a function: check({name!r}, ...) needs the function itself, got {type(student_fn).__name__}. "
              f"Define it as `{ex.signature}` and pass its name without calling it.")
        return False
    n = _n_trials(ex, n_trials)
    fn_name = getattr(student_fn, "__name__", f"my_{name}")
    fn_name = f"my_{name}" if fn_name == "<lambda>" else fn_name
    if seed is None:
        seed = secrets.randbelow(2**31)
    else:
        check_int("seed", seed, lo=0)  # or None: a fresh seed
    print(f"Grading {name!r} on fresh problems, seed {seed} "
          f"(reproduce with exercises.check({name!r}, {fn_name}, seed={seed})).")
    grade = {"gradient": _grade_gradient, "outcome": _grade_outcome}.get(ex.graded_by, _grade_value)
    g = torch.Generator().manual_seed(int(seed))
    for i in range(n):
        trial = ex.draw(i, g)
        try:
            grade(ex, student_fn, fn_name, trial, f"trial {i + 1}/{n} ({trial.label})")
        except _Rejected as wrong:
            msg = wrong.args[0]
            if not msg.startswith("Not implemented yet"):
                _FAILURES[name] = _FAILURES.get(name, 0) + 1
            print(msg)
            return False
    if ex.graded_by == "outcome":
        print(f"Correct! {fn_name} reaches the target ({ex.source}) on {n} random problems{_covering(ex)}.")
    elif ex.graded_by == "gradient":
        print(f"Correct! {fn_name}: its gradient matches the exact gradient of {ex.against} ({ex.source}) "
              f"on {n} random problems{_covering(ex)}.")
    else:
        print(f"Correct! {fn_name} matches the reference ({ex.source}) on {n} random inputs{_covering(ex)} "
              f"to rtol {RTOL:g}.")
    return True
