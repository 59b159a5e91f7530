"""How often do the Monte Carlo checks fail by chance? Run them over many seeds and compare with their tolerances.

    python bench/bench_mc_flakes.py [--seeds 50] [--json out.json] [-k SUBSTRING [-k SUBSTRING ...]]

Every Monte Carlo check (and every erratum whose corrected side is a Monte Carlo statement) is re-run with
``verify --seed s`` for s = 1..N: each seed re-draws every sample. A check compares ``n_compared``
standardised errors with ``n_sigma`` (5) standard errors, so for Gaussian estimates its chance of failing
is at most ``n_compared * P(|Z| > n_sigma)`` (about 5.7e-7 per comparison at 5 sigma): the implied rate.
The report gives, per check and in total, the observed failures against that rate, and the distribution
of the largest z-score (for a correct estimator ``max z`` should look like the maximum of ``n_compared``
half-normal draws; a check whose z-scores run systematically high has an underestimated standard error).
The checks are run single-threaded, as ``dstar-edu verify`` runs them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm.auto import tqdm  # noqa: E402

from dstar_edu.verify.registry import REGISTRY, run_check, run_checks, seeded  # noqa: E402


def is_monte_carlo(result: dict) -> bool:
    return result["kind"] == "monte_carlo" or result["details"].get("corrected_kind") == "monte_carlo"


def tail(n_sigma: float) -> float:
    """P(|Z| > n_sigma) for a standard normal Z."""
    return math.erfc(n_sigma / math.sqrt(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=1, help="seeds run from here (to split a long run)")
    ap.add_argument("-k", dest="patterns", action="append", default=None,
                    help="run the checks whose id contains this substring (repeat for a union; default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    start = time.perf_counter()
    seen, base = set(), []
    for pattern in args.patterns or [None]:
        for r in run_checks(pattern):
            if is_monte_carlo(r) and r["id"] not in seen:
                seen.add(r["id"])
                base.append(r)
    ids = [r["id"] for r in base]
    rows = {r["id"]: {"failures": 0, "runs": 0, "max_z": [], "n_compared": r["details"].get("n_compared", 1),
                      "n_sigma": r["details"].get("n_sigma", 5.0)} for r in base}
    failed_runs = []
    def save():
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "failed_runs": failed_runs,
                                                   "seconds": time.perf_counter() - start}, indent=1))

    for seed in tqdm(range(args.first_seed, args.first_seed + args.seeds), desc="seeds", unit="seed"):
        with seeded(seed):                             # what run_checks(seed=...) does, one check at a time
            for cid in ids:
                r = run_check(REGISTRY[cid])
                row = rows[cid]
                row["runs"] += 1
                row["max_z"].append(r["details"].get("max_z", math.nan))
                if not r["passed"]:
                    row["failures"] += 1
                    failed_runs.append({"id": cid, "seed": seed, "max_z": r["details"].get("max_z"),
                                        "error": (r.get("error") or "")[:200]})
        save()                                         # after every seed, so a long run can be inspected
    elapsed = time.perf_counter() - start

    total_runs = sum(r["runs"] for r in rows.values())
    total_fail = sum(r["failures"] for r in rows.values())
    implied = sum(r["runs"] * min(1.0, r["n_compared"] * tail(r["n_sigma"])) for r in rows.values())
    print(f"{len(ids)} Monte Carlo checks x {args.seeds} seeds = {total_runs} runs in {elapsed:.0f} s")
    print(f"{'id':48} {'n_cmp':>6} {'fail':>5} {'implied':>9} {'median z':>9} {'max z':>7}")
    for cid, r in rows.items():
        zs = sorted(z for z in r["max_z"] if math.isfinite(z))
        med = zs[len(zs) // 2] if zs else math.nan
        print(f"{cid:48} {r['n_compared']:>6} {r['failures']:>5} "
              f"{r['runs'] * min(1.0, r['n_compared'] * tail(r['n_sigma'])):9.1e} {med:9.2f} "
              f"{(zs[-1] if zs else math.nan):7.2f}")
    print(f"observed failures: {total_fail} of {total_runs} runs ({total_fail / max(total_runs, 1):.2e} per run); "
          f"implied by the tolerances: {implied:.2e} expected failures ({implied / max(total_runs, 1):.2e} per run)")
    for f in failed_runs:
        print("  failed:", f)
    save()


if __name__ == "__main__":
    main()
