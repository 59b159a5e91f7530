"""dstar-edu: run and browse the registered theorem checks of the seed documents.

  dstar-edu verify                 run every check (exit 0 all pass, 1 a check failed, 2 usage error)
  dstar-edu verify -k tweedie      only the checks whose id contains "tweedie"
  dstar-edu verify --seed 7        re-draw every random input (0 = the registered numbers)
  dstar-edu verify --json out.json also write the results as JSON
  dstar-edu verify --power         also run each check's counterfactual and report its margin
  dstar-edu list [-k SUBSTRING]    check ids, titles and seed sources
  dstar-edu list --covers "Eq. 14" the library functions that checks citing Eq. 14 exercise, and those checks
  dstar-edu list --function dstar_edu.samplers.diffusion.ddim
                                   the checks that exercise a library function (a unique name suffix will do)
  dstar-edu errata                 the errata list (Markdown), generated from the registry
"""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="dstar-edu", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_verify = sub.add_parser("verify", help="run the registered theorem checks", formatter_class=fmt,
                              description="Run the registered theorem checks and print one line per check.")
    p_verify.add_argument("-k", dest="pattern", default=None, metavar="SUBSTRING",
                          help="only checks whose id contains SUBSTRING")
    p_verify.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                          help="also write the results as JSON to PATH (checked before any check runs)")
    p_verify.add_argument("--power", action="store_true",
                          help="also run each check's counterfactual (one deliberate error) and report its margin")
    p_verify.add_argument("--seed", type=int, default=0, metavar="N",
                          help="re-draw every Monte Carlo sample and random input with seed N "
                               "(default 0: the registered numbers)")
    p_list = sub.add_parser("list", help="list check ids, titles and seed sources",
                            description="List check ids, titles and seed sources (reads a static index: fast).")
    p_list.add_argument("-k", dest="pattern", default=None, metavar="SUBSTRING",
                        help="only checks whose id contains SUBSTRING")
    by = p_list.add_mutually_exclusive_group()
    by.add_argument("--covers", dest="citation", default=None, metavar="CITATION",
                        help='a seed citation, e.g. "Eq. 14" or "SIM Thm 3.1": the library functions exercised by the '
                             "checks that cite it (in their source or title), each with those checks")
    by.add_argument("--function", dest="function", default=None, metavar="NAME",
                        help="a library function's dotted name, e.g. dstar_edu.samplers.diffusion.ddim (or a unique "
                             "suffix such as diffusion.ddim): the checks that exercise it")
    sub.add_parser("errata", help="print the errata list (Markdown) generated from the registry",
                   description="Print the errata list (Markdown) generated from the registry.")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dstar-edu")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown"


def _open_json(path: str, parser: argparse.ArgumentParser):
    """Open the --json target now, so that a bad path fails before minutes of checks, not after."""
    try:
        return open(path, "w")
    except OSError as err:
        parser.error(f"--json {path!r} cannot be written: {err.strerror or err}")


def _run(args, parser) -> int:
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "list":
        return _list(args)
    if args.command == "errata":
        from .verify import errata_markdown
        print(errata_markdown())
        return 0
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    json_file = _open_json(args.json_path, parser) if args.json_path else None
    from .verify import NoCheckMatches, run_and_report, run_checks
    from .verify.registry import run_power_checks
    from .verify.report import run_and_report_power
    try:
        if args.power:
            results = run_power_checks(args.pattern, progress=sys.stderr.isatty(), seed=args.seed)
        else:
            results = run_checks(args.pattern, progress=sys.stderr.isatty(), seed=args.seed)
    except NoCheckMatches:
        if json_file is not None:
            json_file.close()
            os.unlink(args.json_path)
        print(f"no check id contains {args.pattern!r}; see 'dstar-edu list'", file=sys.stderr)
        return 2
    return (run_and_report_power if args.power else run_and_report)(results, json_file)


def _list(args) -> int:
    """``dstar-edu list``: the static index, optionally by citation (--covers) or by library function (--function)."""
    from .verify.index import read_index
    from .verify.lookup import NoMatch, by_citation, by_function
    entries = [e for e in read_index() if args.pattern is None or args.pattern in e["id"]]
    if not entries:
        print(f"no check id contains {args.pattern!r}", file=sys.stderr)
        return 2
    try:
        if args.citation is not None:
            groups = by_citation(entries, args.citation)
        elif args.function is not None:
            groups = by_function(entries, args.function)
        else:
            groups = {None: entries}
    except NoMatch as err:
        print(err, file=sys.stderr)
        return 2
    if args.citation is not None:
        n_checks = len({e["id"] for es in groups.values() for e in es})
        print(f"{args.citation!r} is cited by {n_checks} check{'s' * (n_checks != 1)}; they exercise {len(groups)} "
              f"library function{'s' * (len(groups) != 1)}:")
    width = max(len(e["id"]) for es in groups.values() for e in es)
    for name, es in groups.items():
        indent = ""
        if name is not None and (args.citation is not None or len(groups) > 1):
            print(name)
            indent = "  "
        for e in es:
            print(f"{indent}{e['id']:{width}}  {e['title']}  [{e['source']}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = _run(args, parser)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # the reader closed the pipe (``dstar-edu errata | head``): stop quietly, as a pipeline expects
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
