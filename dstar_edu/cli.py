"""Command line: ``dstar-edu verify [-k SUBSTRING] [--json PATH]``, ``dstar-edu list``, ``dstar-edu errata``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dstar-edu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="run the registered theorem checks")
    p_verify.add_argument("-k", dest="pattern", default=None, help="only checks whose id contains this substring")
    p_verify.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    p_verify.add_argument("--power", action="store_true",
                          help="also run each check's counterfactual (one deliberate error) and report its margin")
    p_list = sub.add_parser("list", help="list check ids and their seed sources")
    p_list.add_argument("-k", dest="pattern", default=None)
    sub.add_parser("errata", help="print the errata list (Markdown) generated from the registry")
    args = parser.parse_args(argv)

    from .verify import errata_markdown, run_and_report, run_checks, select
    if args.command == "verify" and args.power:
        from .verify.registry import run_power_checks
        from .verify.report import run_and_report_power
        results = run_power_checks(args.pattern, progress=sys.stderr.isatty())
        if not results:
            print(f"no check id contains {args.pattern!r}; see 'dstar-edu list'", file=sys.stderr)
            return 2
        return run_and_report_power(results, args.json_path)
    if args.command == "verify":
        results = run_checks(args.pattern, progress=sys.stderr.isatty())
        if not results:
            print(f"no check id contains {args.pattern!r}; see 'dstar-edu list'", file=sys.stderr)
            return 2
        return run_and_report(results, args.json_path)
    if args.command == "list":
        for c in select(args.pattern):
            print(f"{c.id:55} {c.source}")
        return 0
    print(errata_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
