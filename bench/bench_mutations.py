"""Benchmark: how many broken seed formulas does ``dstar-edu verify`` alone catch? (issue 14, item 2)

Runs every mutation of ``tests/mutation_harness.MUTATIONS`` (one textual change of a library formula in a
temporary copy of the package, then ``verify -k`` on the checks that guard it) and prints each verdict and the
catch rate. One subprocess per verify run; about 5-10 s per mutation on one core.

    PYTHONPATH=. python bench/bench_mutations.py [--json out.json] [-k NAME_SUBSTRING]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mutation_harness import MUTATIONS, run_mutation  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the per-mutation results here")
    ap.add_argument("-k", dest="pattern", default=None, help="only mutations whose name contains this")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if args.pattern is None or args.pattern in m.name]
    try:
        from tqdm import tqdm
        todo_iter = tqdm(todo, desc="mutations", unit="mutation")
    except ImportError:
        todo_iter = todo
    results, start = [], time.perf_counter()
    for m in todo_iter:
        t0 = time.perf_counter()
        res = run_mutation(m)
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        print(f"{'caught' if res['caught'] else 'MISSED':7} {m.name:60} verify -k {' / '.join(m.patterns)}", flush=True)
    caught = sum(r["caught"] for r in results)
    print(f"catch rate of `verify` alone: {caught}/{len(results)} mutations "
          f"({100 * caught / max(len(results), 1):.0f}%) in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
