"""The registry of theorem checks shared by the CLI, the test suite and the notebooks.

A check is a function ``fn(dim) -> CheckResult`` registered with an id, a title and the seed
equation it verifies. Results are built with three constructors that fix how "passed" is decided:

* ``identity``: a deterministic identity in float64, ``|lhs - rhs| <= atol + rtol * |rhs|``;
* ``monte_carlo``: an estimate compared with its reference within ``n_sigma`` of its own standard error;
* ``erratum``: the seed's formula *as printed* fails while the corrected formula passes.

Randomness: every check draws from ``check_generator(base_seed)``. A run with ``seed=0`` (the default)
reproduces the registered numbers exactly; another seed re-draws every Monte Carlo sample and every
random test point, so that ``verify(seed=s)`` over many ``s`` measures how often a check's tolerance is
crossed by chance (``bench/bench_mc_flakes.py``).

Power (``dstar-edu verify --power``): a check is only worth what it would catch, so every check also runs a
*counterfactual*, the same computation with one deliberate, meaningful error in the quantity it tests (a sign,
a missing factor, alpha for alpha_bar, a detached term, a wrong time). A check marks that error in place with
``mutate(correct, wrong)``, which returns ``correct`` in a normal run and ``wrong`` when ``run_power`` runs the
check a second time with the counterfactual switched on; ``mutating()`` is the boolean form for a branch.
Nothing else changes between the two runs (same seeds, same tolerance), so the counterfactual's result says by
how much the real check would fail on that error: its *margin* is ``|err| / tol`` for an identity (required
>= ``POWER_IDENTITY`` = 1000) and the z-score ``max|est - ref| / s.e.`` for a Monte Carlo check (required >=
``POWER_SIGMAS`` = 10). A convergence-order check (its tolerance is on a fitted order, details key ``order``)
needs the counterfactual's order off by ``POWER_ORDER`` = 5 tolerances: a wrong formula in a first-order scheme
converges to a wrong limit, so its observed order drops to ~0 (a whole order, 10 tolerances at tol 0.1, less
the O(1/N) remainder of the fit), or its errors stop shrinking (no order: margin inf); 1000x a tolerance on an
order is not a meaningful target.
An erratum check is its own counterfactual: the printed formula's margin is reported. A check whose
counterfactual run calls ``mutate`` zero times has no counterfactual and fails the power test.
"""
from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..validation import check_int

__all__ = ["CheckResult", "Check", "register", "REGISTRY", "identity", "monte_carlo", "erratum",
           "run_check", "run_checks", "select", "base_of", "DIMS", "check_generator", "check_seed", "run_seed", "seeded",
           "NoCheckMatches", "Erratum", "register_errata", "mutate", "mutating", "run_power", "run_power_checks", "POWER_IDENTITY",
           "POWER_SIGMAS", "POWER_ORDER"]

#: the two data dimensions every check that makes sense at both runs at: 2D points and 3x32x32 images
DIMS = (2, 3072)

#: the ``data`` detail of a check on seeded random vectors: kept only where the statement is pointwise algebra
POINTWISE = "seeded random vectors: the statement is pointwise algebra in its inputs, no data distribution enters"


@dataclass
class CheckResult:
    kind: str                      # "identity" | "monte_carlo" | "erratum"
    passed: bool
    abs_err: float
    tol: float
    lhs: str = ""                  # short summaries, JSON-friendly
    rhs: str = ""
    stderr: float | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Check:
    id: str
    title: str
    source: str
    fn: Callable[[int], CheckResult]
    dim: int | None
    printed: str = ""              # erratum checks: the formula as printed in the seed
    corrected: str = ""            # ... and the formula that holds instead
    tags: tuple = ()
    covers: tuple = ()             # dotted names of the library functions the check exercises (verify/covers.py)


REGISTRY: dict[str, Check] = {}

_RUN_SEED = 0


class NoCheckMatches(LookupError):
    """``verify(pattern)`` / ``run_checks(pattern)`` found no check id containing ``pattern``."""


def run_seed() -> int:
    """The seed of the run in progress (0 unless ``run_checks(..., seed=s)`` is running)."""
    return _RUN_SEED


def check_seed(base_seed: int) -> int:
    """The seed a check's ``base_seed`` stands for in this run: itself for run seed 0, a distinct one otherwise."""
    return base_seed if _RUN_SEED == 0 else (base_seed + 1_000_003 * _RUN_SEED) % (2 ** 63)


def check_generator(base_seed: int) -> torch.Generator:
    """A CPU generator for a check's random draws (see the module docstring on seeds)."""
    return torch.Generator().manual_seed(check_seed(base_seed))


def register(base_id: str, title: str, source: str, dims=(None,), printed: str = "", corrected: str = "",
             covers=None):
    """Decorator: register ``fn(dim)`` once per entry of ``dims`` (ids ``base_id.2d``, ``base_id.3072d``).

    ``covers``: the dotted names of the library functions the check exercises; by default its entry in the
    table ``dstar_edu.verify.covers.COVERS`` (keyed by ``base_id``).
    """
    if covers is None:
        from .covers import COVERS
        covers = COVERS.get(base_id, ())
    covers = (covers,) if isinstance(covers, str) else tuple(covers)

    def deco(fn):
        for d in dims:
            cid = base_id if d is None else f"{base_id}.{d}d"
            if cid in REGISTRY:
                raise ValueError(f"check id {cid!r} is registered twice")
            REGISTRY[cid] = Check(cid, title, source, fn, d, printed, corrected, covers=covers)
        return fn
    return deco


def base_of(check: Check) -> str:
    """The id a check was registered under, without its ``.2d`` / ``.3072d`` suffix."""
    return check.id.rsplit(".", 1)[0] if check.dim is not None else check.id


def _summary(x) -> str:
    if isinstance(x, str):
        return x
    x = torch.as_tensor(x).detach()
    if x.numel() == 1:
        return f"{x.item():.6g}"
    return f"tensor{tuple(x.shape)} |.|max={x.abs().max().item():.4g}"


def _max_abs(x) -> float:
    return float(torch.as_tensor(x).detach().abs().max()) if torch.as_tensor(x).numel() else 0.0


def identity(lhs, rhs, rtol: float = 1e-10, atol: float = 1e-12, **details) -> CheckResult:
    """Deterministic identity: passes when ``max|lhs - rhs| <= atol + rtol * max|rhs|``."""
    lhs_t, rhs_t = torch.as_tensor(lhs), torch.as_tensor(rhs)
    if lhs_t.shape != rhs_t.shape:
        raise ValueError(f"lhs shape {tuple(lhs_t.shape)} != rhs shape {tuple(rhs_t.shape)}")
    err = _max_abs(lhs_t - rhs_t)
    tol = atol + rtol * _max_abs(rhs_t)
    ok = math.isfinite(err) and err <= tol
    return CheckResult("identity", ok, err, tol, _summary(lhs_t), _summary(rhs_t), None, details)


def monte_carlo(estimate, reference, stderr, n_sigma: float = 5.0, **details) -> CheckResult:
    """Monte-Carlo statement: passes when ``max|estimate - reference| <= n_sigma * stderr``.

    ``stderr`` is the estimate's own standard error (scalar or elementwise); the tolerance is reported.
    """
    est, ref, se = (torch.as_tensor(v, dtype=torch.float64) for v in (estimate, reference, stderr))
    zs = ((est - ref).abs() / se).broadcast_to(torch.broadcast_shapes(est.shape, ref.shape, se.shape))
    z = zs.max().item()
    err = _max_abs(est - ref)
    tol = float(n_sigma * se.max())
    ok = math.isfinite(z) and z <= n_sigma
    # n_compared: how many standardised errors the max runs over (the chance rate of a false alarm is at
    # most n_compared * P(|Z| > n_sigma) for Gaussian estimates: bench/bench_mc_flakes.py compares the two)
    return CheckResult("monte_carlo", ok, err, tol, _summary(est), _summary(ref), float(se.max()),
                       {"n_sigma": n_sigma, "max_z": z, "n_compared": zs.numel(), **details})


def erratum(printed: CheckResult, corrected: CheckResult, **details) -> CheckResult:
    """Seed formula fails as printed and the corrected one passes: the check passes (the erratum holds)."""
    ok = (not printed.passed) and corrected.passed
    margin, required = power_margin(printed)
    return CheckResult("erratum", ok, corrected.abs_err, corrected.tol, corrected.lhs, corrected.rhs,
                       corrected.stderr,
                       {"printed_abs_err": printed.abs_err, "printed_passed": printed.passed,
                        "printed_margin": margin, "printed_margin_required": required,
                        "corrected_kind": corrected.kind, **corrected.details, **details})


@dataclass(frozen=True)
class Erratum:
    """A seed formula that fails as printed, as data; ``register_errata`` turns it into a check.

    The inputs are a list of rows (dicts of tensors, e.g. one per time step) and a data label. For each row,
    ``reference(**row)`` is the quantity computed by an independent route, ``as_printed(**row)`` the seed's
    formula as printed, and ``library(**row)`` the corrected value *computed by the library* (the corrected
    formula is not re-typed in the check). The check passes when the printed side misses the reference and the
    library side meets it (``identity`` within ``rtol``/``atol``). ``report(**row)``, when given, adds values
    of other readings of the printed text to the details (``{name: tensor}``, reported as ``|err|``).
    """
    id: str
    title: str
    source: str
    printed: str            # the formula as printed in the seed (the text of ERRATA.md)
    corrected: str          # what holds instead (text)
    inputs: Callable        # dim -> (rows, data label)
    reference: Callable
    as_printed: Callable
    library: Callable
    dims: tuple = DIMS
    rtol: float = 1e-10
    atol: float = 1e-12
    report: Callable | None = None

    def check(self, dim=None) -> CheckResult:
        rows, data = self.inputs(dim)
        ref, printed, corrected = (torch.stack([f(**r) for r in rows])
                                   for f in (self.reference, self.as_printed, self.library))
        extra = {}
        if self.report is not None:
            others = [self.report(**r) for r in rows]
            extra = {f"{name}_abs_err": identity(torch.stack([o[name] for o in others]), ref, self.rtol, self.atol).abs_err
                     for name in others[0]}
        return erratum(identity(printed, ref, self.rtol, self.atol), identity(corrected, ref, self.rtol, self.atol),
                       data=data, **extra)


def register_errata(*errata: Erratum) -> None:
    """Register each erratum record as a check (ids ``id.2d`` / ``id.3072d`` as for ``register``)."""
    for e in errata:
        register(e.id, e.title, e.source, dims=e.dims, printed=e.printed, corrected=e.corrected)(e.check)


def run_check(check: Check) -> dict:
    """Run one check (single-threaded: see below); an exception is a failure whose message is kept.

    Checks work on small float64 tensors, where torch's intra-op threads only add synchronisation:
    measured on 2 idle cores, the whole registry takes 22 s with one thread and 79 s with two.
    """
    from dstar_edu.training import cpu_threads
    start = time.perf_counter()
    try:
        with cpu_threads(1):
            res = check.fn(check.dim) if check.dim is not None else check.fn()
        if not isinstance(res, CheckResult):
            raise TypeError(f"check {check.id} returned {type(res).__name__}, not CheckResult")
        error = None
    except Exception as exc:  # noqa: BLE001 - a crashing check is reported, not hidden
        res = CheckResult("identity", False, math.nan, math.nan)
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    out = {"id": check.id, "title": check.title, "source": check.source, "kind": res.kind,
           "dim": check.dim, "passed": bool(res.passed), "abs_err": res.abs_err, "tol": res.tol,
           "stderr": res.stderr, "seconds": time.perf_counter() - start, "lhs": res.lhs, "rhs": res.rhs,
           "details": res.details}
    if check.printed or check.corrected:
        out["printed"], out["corrected"] = check.printed, check.corrected
    if error:
        out["error"] = error
    return out


def select(pattern: str | None = None) -> list[Check]:
    """Registered checks whose id contains ``pattern`` (all when None), in registration order."""
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string or None, got {type(pattern).__name__} {pattern!r}")
    _load_all()
    return [c for cid, c in REGISTRY.items() if pattern is None or pattern in cid]


def _validate_seed(seed) -> int:
    check_int("seed", seed, lo=0)  # 0 = the registered draws
    return seed


@contextlib.contextmanager
def seeded(seed: int):
    """Within this block, checks draw with ``seed`` (see the module docstring); restores the previous seed."""
    global _RUN_SEED
    previous, _RUN_SEED = _RUN_SEED, _validate_seed(seed)
    try:
        yield
    finally:
        _RUN_SEED = previous


def run_checks(pattern: str | None = None, progress: bool = False, seed: int = 0) -> list[dict]:
    """Run the checks whose id contains ``pattern``; raise ``NoCheckMatches`` when there is none.

    ``seed`` re-draws every random input (0 = the registered numbers; see the module docstring).
    """
    return _run_selected(pattern, progress, seed, "verify", run_check)


def _run_selected(pattern, progress: bool, seed: int, desc: str, run) -> list[dict]:
    """``run(check)`` for each selected check under ``seed``; ``NoCheckMatches`` when none is selected."""
    seed = _validate_seed(seed)
    checks = select(pattern)
    if not checks:
        raise NoCheckMatches(f"no check id contains pattern={pattern!r}; 'dstar-edu list' shows the ids")
    if progress:
        from tqdm.auto import tqdm
        checks = tqdm(checks, desc=desc, unit="check", leave=False)
    with seeded(seed):
        results = [run(c) for c in checks]
    if seed:
        for r in results:
            r["seed"] = seed
    return results


def _load_all() -> None:
    """Import every check module so that its ``@register`` decorators run."""
    from . import checks  # noqa: F401



# ---- power: the counterfactual of every check ---------------------------------------------------------------
#: required margins of a counterfactual: |err|/tol of an identity, z of a Monte Carlo check, and for a
#: convergence-order check (tolerance on the fitted order) the order's miss in tolerances
POWER_IDENTITY, POWER_SIGMAS, POWER_ORDER = 1000.0, 10.0, 5.0


class _Counterfactual:
    active = False      # True while run_power runs a check's counterfactual
    used = 0            # mutate()/mutating() calls seen during that run


def mutate(correct, wrong):
    """The check's deliberate error: ``correct`` in a normal run, ``wrong`` in its counterfactual run."""
    if not _Counterfactual.active:
        return correct
    _Counterfactual.used += 1
    return wrong


def mutating() -> bool:
    """True inside a counterfactual run (and counted as its mutation): for errors that are a code branch."""
    if _Counterfactual.active:
        _Counterfactual.used += 1
    return _Counterfactual.active


def power_margin(res: CheckResult) -> tuple[float, float]:
    """``(margin, required)`` of a *failing* result: by how much it misses, in the unit its kind is judged in."""
    if res.kind == "erratum":
        return float(res.details.get("printed_margin", math.nan)), float(
            res.details.get("printed_margin_required", math.nan))
    if res.kind == "monte_carlo":
        z = res.details.get("max_z")
        if z is None:
            z = res.abs_err / res.stderr if res.stderr else math.nan
        return float(z), POWER_SIGMAS
    if "order" in res.details:      # a NaN order is the checks' verdict "the errors stop shrinking": no order at all
        return (res.abs_err / res.tol if math.isfinite(res.abs_err) else math.inf), POWER_ORDER
    return res.abs_err / res.tol if res.tol > 0 else math.inf, POWER_IDENTITY


def run_power(check: Check, result: dict | None = None) -> dict:
    """The check's counterfactual margin (an erratum check: its printed formula's margin, from ``result`` or a
    normal run). ``ok`` when the check has a counterfactual that misses by at least the required margin."""
    from dstar_edu.training import cpu_threads
    start = time.perf_counter()
    error, used = None, 0
    try:
        if check.printed or check.corrected:
            res = result if result is not None else run_check(check)
            margin = float(res["details"].get("printed_margin", math.nan))
            required = float(res["details"].get("printed_margin_required", math.nan))
            kind, used = "erratum", 1
        else:
            _Counterfactual.active, _Counterfactual.used = True, 0
            try:
                with cpu_threads(1):
                    cf = check.fn(check.dim) if check.dim is not None else check.fn()
            finally:
                used, _Counterfactual.active = _Counterfactual.used, False
            margin, required = power_margin(cf)
            kind = cf.kind
    except Exception as exc:  # noqa: BLE001 - a crashing counterfactual has no margin
        margin, required, kind = math.nan, math.nan, "error"
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    ok = used > 0 and math.isfinite(required) and not math.isnan(margin) and margin >= required
    out = {"id": check.id, "kind": kind, "margin": margin, "required": required, "mutations": used, "ok": ok,
           "seconds": time.perf_counter() - start}
    if error:
        out["error"] = error
    return out


def run_power_checks(pattern: str | None = None, progress: bool = False, seed: int = 0) -> list[dict]:
    """Each selected check and its counterfactual: the normal result with a ``power`` entry added.

    Raises ``NoCheckMatches`` when no id contains ``pattern``; ``seed`` as for ``run_checks``.
    """
    def run(c: Check) -> dict:
        r = run_check(c)
        r["power"] = run_power(c, r)
        return r
    return _run_selected(pattern, progress, seed, "verify --power", run)
