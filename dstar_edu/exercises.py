"""Graded classroom exercises on the handbook's DDPM formulas (Sec. 2.2.1, 2.6; Eq. 7, 8/10, 18, Fig. 3).

A student writes a function, ``check`` calls it and the reference solution on the same random float64
inputs (2D points and 3x32x32 images, per-sample and shared times ``t`` of ``DDPM(T=1000)``) and prints
either "Correct!" or what went wrong: the failing input, the max error, a few expected/got entries and
a hint aimed at the usual mistakes of that exercise (``alpha_bar_t`` vs per-step ``alpha_t``, a missing
``sqrt``, the sign of ``v``, ...). Wrong answers never raise; ``check`` returns ``True``/``False``.

    >>> from dstar_edu import exercises
    >>> exercises.list_exercises()
    ['tweedie_x0', 'posterior_mean_ddpm', 'v_prediction', 'x0_from_v', 'score_from_eps']
    >>> exercises.describe("tweedie_x0")          # prompt + signature
    >>> exercises.check("tweedie_x0", my_tweedie)  # True / False, with a printed explanation

Reference solutions call ``dstar_edu.conversions``; the Eq. 8 posterior mean, which has no library
function, is written once here (``ddpm_posterior_mean``).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from . import conversions as cv
from .process import DDPM

Tensor = torch.Tensor

__all__ = ["Exercise", "EXERCISES", "RTOL", "ATOL", "check", "describe", "list_exercises", "reference",
           "sample_inputs", "ddpm_posterior_mean"]

#: a student answer passes when ``max|got - expected| <= RTOL * max|expected| + ATOL`` on every trial
RTOL = 1e-8
ATOL = 1e-12

#: input shapes of the trials, cycled: 2D points and CIFAR-shaped images through the same code
TRIAL_SHAPES = ((8, 2), (3, 3, 32, 32), (64, 2), (2, 3, 32, 32), (5, 2))
#: trials with this index modulo len(TRIAL_SHAPES) use one shared t (0-d coefficients), the others one t per sample
SHARED_T_TRIAL = 3

_PROCESS = DDPM(1000)


def ddpm_posterior_mean(x_t: Tensor, x0_hat: Tensor, alpha_t: Tensor, alpha_bar_t: Tensor,
                        alpha_bar_prev: Tensor) -> Tensor:
    """Handbook Eq. 8/10: mean of ``q(x_{t-1} | x_t, x0)``,
    ``sqrt(ab_{t-1}) (1 - alpha_t) / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t``."""
    return (torch.sqrt(alpha_bar_prev) * (1 - alpha_t) * x0_hat
            + torch.sqrt(alpha_t) * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t)


@dataclass(frozen=True)
class Exercise:
    name: str
    source: str                                   # handbook equation
    prompt: str                                   # one paragraph
    args: tuple[tuple[str, str], ...]             # (argument name, meaning), in call order
    returns: str
    reference: Callable[..., Tensor]
    hint: str                                     # always shown on a wrong answer
    mistakes: tuple[tuple[Callable[..., Tensor], str], ...] = ()  # (typical wrong answer, diagnosis)

    @property
    def signature(self) -> str:
        return f"def my_{self.name}({', '.join(a for a, _ in self.args)}):"


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


# ---- the exercises ---------------------------------------------------------------------------------------
_AB = "DDPM alpha_bar_t, a tensor that broadcasts against x_t (shape (batch, 1, ...) or 0-d)"

EXERCISES: dict[str, Exercise] = {}
_INPUTS: dict[str, Callable[[dict], dict]] = {}   # exercise name -> picks its arguments from a _draw


def _add(ex: Exercise, inputs: Callable[[dict], dict]) -> None:
    EXERCISES[ex.name] = ex
    _INPUTS[ex.name] = inputs

_add(Exercise(
    name="tweedie_x0", source="handbook Eq. 7",
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
    )), lambda d: {"x_t": d["x_t"], "eps_hat": d["eps_hat"], "alpha_bar": d["alpha_bar_t"]})

_add(Exercise(
    name="posterior_mean_ddpm", source="handbook Eq. 8/10",
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
    )), lambda d: {k: d[k] for k in ("x_t", "x0_hat", "alpha_t", "alpha_bar_t", "alpha_bar_prev")})

_add(Exercise(
    name="v_prediction", source="handbook Sec. 2.6.2, Fig. 3",
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
    )), lambda d: {"x0": d["x0"], "eps": d["eps"], "alpha_bar": d["alpha_bar_t"]})

_add(Exercise(
    name="x0_from_v", source="handbook Fig. 3",
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
    )), lambda d: {"x_t": d["x_t"], "v_hat": cv.v_from_x0_eps(d["x0_hat"], d["eps_hat"], d["alpha_bar_t"]),
                   "alpha_bar": d["alpha_bar_t"]})

_add(Exercise(
    name="score_from_eps", source="handbook Eq. 18",
    prompt=("Score from noise prediction (handbook Eq. 16-18). The conditional score of q(x_t | x0) = "
            "N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) is -(x_t - sqrt(alpha_bar_t) x0) / (1 - alpha_bar_t) "
            "= -eps / sqrt(1 - alpha_bar_t); replacing eps by the network's eps_hat gives the model score "
            "s_theta(x_t, t) of Eq. 18. Given eps_hat and alpha_bar, return s_theta (same shape as eps_hat)."),
    args=(("eps_hat", "predicted noise, shape (batch, *shape)"), ("alpha_bar", _AB)),
    returns="s = -eps_hat / sqrt(1 - alpha_bar)",
    reference=lambda eps_hat, alpha_bar: cv.score_from_eps(eps_hat, torch.sqrt(1 - alpha_bar)),
    hint=("for x ~ N(mu, sigma^2 I) the score is -(x - mu) / sigma^2 = -eps / sigma; here sigma = "
          "sqrt(1 - alpha_bar_t), the noise standard deviation of Eq. 6. The score points *against* the noise."),
    mistakes=(
        (lambda eps_hat, alpha_bar: eps_hat / torch.sqrt(1 - alpha_bar),
         "sign error: the score is -eps_hat / sqrt(1 - alpha_bar) (it points back towards the data)."),
        (lambda eps_hat, alpha_bar: -eps_hat / (1 - alpha_bar),
         "you divide by the variance 1 - alpha_bar; divide eps_hat by the standard deviation sqrt(1 - alpha_bar)."),
        (lambda eps_hat, alpha_bar: -eps_hat * torch.sqrt(1 - alpha_bar),
         "you multiply by sqrt(1 - alpha_bar); Eq. 18 divides eps_hat by it."),
        (lambda eps_hat, alpha_bar: -eps_hat / torch.sqrt(alpha_bar),
         "the noise standard deviation is sqrt(1 - alpha_bar), not sqrt(alpha_bar)."),
    )), lambda d: {"eps_hat": d["eps_hat"], "alpha_bar": d["alpha_bar_t"]})


# ---- public API ------------------------------------------------------------------------------------------
def _get(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ValueError(f"exercise name={name!r} is unknown; allowed: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def list_exercises() -> list[str]:
    """Names of the registered exercises."""
    return list(EXERCISES)


def reference(name: str) -> Callable[..., Tensor]:
    """The reference solution of exercise ``name`` (for instructors)."""
    return _get(name).reference


def describe(name: str) -> None:
    """Print the exercise prompt, the function signature to implement and how it is graded."""
    ex = _get(name)
    lines = [f"Exercise {ex.name!r} ({ex.source})", "", ex.prompt, "", "Implement:", f"    {ex.signature}"]
    lines += [f"        # {a}: {meaning}" for a, meaning in ex.args]
    lines += ["        ...  # return a torch.Tensor of the same shape as the first argument", "",
              f"Graded by exercises.check({ex.name!r}, my_{ex.name}) on {len(TRIAL_SHAPES)} random float64 inputs "
              f"(2D points and 3x32x32 images, DDPM T=1000): "
              f"max|got - expected| <= {RTOL:g} * max|expected| + {ATOL:g}."]
    print("\n".join(lines))


def _trials(name: str, n_trials: int, seed: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    _get(name)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials={n_trials!r} must be a positive integer")
    g = torch.Generator().manual_seed(int(seed))
    draws = [_draw(i, g) for i in range(n_trials)]
    return [(_INPUTS[name](d), d["t"]) for d in draws]


def sample_inputs(name: str, n_trials: int = 5, seed: int = 0) -> list[dict[str, Tensor]]:
    """The inputs ``check`` passes for exercise ``name``, in argument order (same seed -> same inputs)."""
    return [inputs for inputs, _ in _trials(name, n_trials, seed)]


def _describe_inputs(inputs: dict[str, Tensor], t: Tensor) -> str:
    first, x = next(iter(inputs.items()))
    times = f"one shared t = {int(t.item())}" if t.numel() == 1 else f"t = {[int(v) for v in t.tolist()][:8]}"
    return f"{first} of shape {tuple(x.shape)}, {times}"


def _entries(expected: Tensor, got: Tensor, k: int = 3) -> str:
    err = (got - expected).abs().nan_to_num(float("inf")).flatten()
    idx = torch.topk(err, min(k, err.numel())).indices
    rows = []
    for i in idx.tolist():
        pos = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), expected.shape))
        want, have = expected.flatten()[i].item(), got.flatten()[i].item()
        rows.append(f"    at index {pos}: expected {want: .10g}, got {have: .10g}")
    return "\n".join(rows)


def _close(got: Tensor, expected: Tensor) -> tuple[bool, float, float]:
    err = (got.to(torch.float64) - expected).abs().max().item()
    tol = RTOL * expected.abs().max().item() + ATOL
    return err <= tol, err, tol  # NaN error compares False


def check(name: str, student_fn: Callable[..., Tensor], n_trials: int = 5, seed: int = 0) -> bool:
    """Grade ``student_fn`` against the reference of exercise ``name`` on ``n_trials`` random inputs.

    Prints "Correct! ..." or an explanation (failing input, max error, a few entries, a hint); returns
    ``True``/``False``. Never raises for a wrong answer or an exception inside ``student_fn``.
    """
    ex = _get(name)
    if not callable(student_fn):
        print(f"Not a function: check({name!r}, ...) needs the function itself, got {type(student_fn).__name__}. "
              f"Define it as `{ex.signature}` and pass its name without calling it.")
        return False
    arg_names = ", ".join(a for a, _ in ex.args)
    fn_name = getattr(student_fn, "__name__", f"my_{name}")
    fn_name = f"my_{name}" if fn_name == "<lambda>" else fn_name
    for trial, (inputs, t) in enumerate(_trials(name, n_trials, seed)):
        where = f"trial {trial + 1}/{n_trials} ({_describe_inputs(inputs, t)})"
        expected = ex.reference(**{k: v.clone() for k, v in inputs.items()})
        try:
            got = student_fn(*[v.clone() for v in inputs.values()])
        except NotImplementedError:
            print(f"Not implemented yet: {fn_name}({arg_names}) raised NotImplementedError on {where}.\n"
                  f"Replace the body with your formula. Hint: {ex.hint}")
            return False
        except Exception as exc:  # noqa: BLE001 - the student's error is reported, not raised
            tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
            print(f"Your function raised {type(exc).__name__}: {exc}\n  on {where}.\n"
                  f"It is called positionally as f({arg_names}) with float64 torch tensors; the coefficients "
                  f"already broadcast against x (use torch.sqrt, not math.sqrt).\n"
                  f"Traceback (last lines):\n{''.join(tb[-2:]).rstrip()}\nHint: {ex.hint}")
            return False
        if got is None:
            print(f"Your function returned None on {where}: did you forget the `return` statement?")
            return False
        try:
            got = torch.as_tensor(got)
        except Exception:  # noqa: BLE001
            print(f"Your function returned a {type(got).__name__}, which is not a tensor, on {where}. "
                  "Return a torch.Tensor.")
            return False
        if tuple(got.shape) != tuple(expected.shape):
            extra = ""
            if got.ndim > expected.ndim:
                extra = (" A larger shape usually means a coefficient was reshaped or indexed so that it "
                         "broadcasts along a new axis: use the coefficients exactly as given.")
            print(f"Wrong shape on {where}: expected {tuple(expected.shape)} (the shape of the first argument), "
                  f"got {tuple(got.shape)}.{extra}")
            return False
        ok, err, tol = _close(got, expected)
        if ok:
            continue
        msg = [f"Not yet: wrong values on {where}.",
               f"  max |got - expected| = {err:.3g} (allowed {tol:.3g}); the entries that differ most:",
               _entries(expected, got.to(torch.float64))]
        if not torch.isfinite(got).all():
            msg.append("  Your result contains NaN or inf: check for a division by zero "
                       "or the sqrt of a negative number.")
        diagnosis = next((why for wrong, why in ex.mistakes
                          if _close(got, wrong(**{k: v.clone() for k, v in inputs.items()}))[0]), None)
        if diagnosis:
            msg.append(f"  Likely mistake: {diagnosis}")
        elif got.dtype != torch.float64:
            msg.append(f"  Your result is {got.dtype}: keep float64 all the way (no .float() or float32 constants).")
        elif err <= 1e-4 * max(expected.abs().max().item(), 1.0):
            msg.append("  Very close: a rounding-level difference, e.g. a float32 intermediate "
                       "or an approximate constant.")
        msg.append(f"Hint ({ex.source}): {ex.hint}")
        print("\n".join(msg))
        return False
    print(f"Correct! {fn_name} matches the reference ({ex.source}) on {n_trials} random inputs "
          f"(2D points and 3x32x32 images, several t) to rtol {RTOL:g}.")
    return True
