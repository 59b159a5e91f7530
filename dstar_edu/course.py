"""The nbgrader course: generate the student versions of the notebooks and autograde submissions.

The notebooks in ``notebooks/`` are the instructor's source versions: each exercise is a solution cell
(``### BEGIN SOLUTION`` ... ``### END SOLUTION``) and a locked autograder cell that shows the student
``exercises.check`` feedback and, hidden, re-imports the grader and asserts the answer (:data:`HIDDEN_TEST`).

    dstar-edu-course generate [--course DIR]                 # -> DIR/release/dstar_edu/*.ipynb (student versions)
    dstar-edu-course autograde SUBMISSIONS [--course DIR]    # SUBMISSIONS/<student>/NN_*.ipynb -> scores table

(or ``python -m dstar_edu.course ...``). ``DIR`` defaults to ``./course_build``; the nbgrader configuration is
``course/nbgrader_config.py`` (copied into DIR). Autograding prints one row per student and notebook and
writes ``DIR/scores.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import shutil
import sys
from pathlib import Path

__all__ = ["ASSIGNMENT", "HIDDEN_TEST", "REPO", "hidden_test_source", "fresh_grader", "source_notebooks",
           "build_course", "generate", "autograde", "is_exercise_cell", "light_version", "execute", "main"]

ASSIGNMENT = "dstar_edu"
REPO = Path(__file__).resolve().parents[1]

#: the hidden part of every autograder cell: the grader is imported afresh, so nothing a notebook did to the
#: imported ``dstar_edu.exercises`` (a patched comparison, a patched registry) survives into grading
HIDDEN_TEST = """### BEGIN HIDDEN TESTS
import importlib as _importlib, sys as _sys
for _module in [_m for _m in _sys.modules if _m.startswith("dstar_edu.exercises")]:
    del _sys.modules[_module]
_grader = _importlib.import_module("dstar_edu.exercises")
assert _grader.check({name!r}, {fn}), "exercise {name} is not solved yet"
### END HIDDEN TESTS"""


def hidden_test_source(name: str, fn: str) -> str:
    """The hidden autograder test of exercise ``name`` whose answer is the function named ``fn``."""
    return HIDDEN_TEST.format(name=name, fn=fn)


def fresh_grader():
    """``dstar_edu.exercises`` imported afresh (what :data:`HIDDEN_TEST` does inline)."""
    for module in [m for m in sys.modules if m.startswith("dstar_edu.exercises")]:
        del sys.modules[module]
    return importlib.import_module("dstar_edu.exercises")


def source_notebooks(source: Path | None = None) -> list[Path]:
    """The instructor notebooks (``notebooks/NN_*.ipynb`` of the repository unless ``source`` is given)."""
    folder = Path(source) if source is not None else REPO / "notebooks"
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"source={str(folder)!r} holds no NN_*.ipynb notebooks; pass the folder of the "
                                "instructor notebooks (notebooks/ of the dstar_edu repository)")
    return found


def build_course(course: Path, source: Path | None = None, notebooks: list[str] | None = None) -> Path:
    """Create (or refresh) the nbgrader course folder ``course``: the config and ``source/dstar_edu``."""
    course = Path(course)
    paths = source_notebooks(source)
    if notebooks is not None:
        wanted = set(notebooks)
        unknown = wanted - {p.name for p in paths} - {p.stem for p in paths}
        if unknown:
            raise ValueError(f"notebooks={sorted(unknown)!r} are not among {[p.name for p in paths]}")
        paths = [p for p in paths if p.name in wanted or p.stem in wanted]
    target = course / "source" / ASSIGNMENT
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for p in paths:
        shutil.copy2(p, target / p.name)
    shutil.copy2(REPO / "course" / "nbgrader_config.py", course / "nbgrader_config.py")
    return course


@contextlib.contextmanager
def _in_course(course: Path):
    """nbgrader reads its config and resolves relative paths from the working directory."""
    old = Path.cwd()
    os.chdir(course)
    try:
        yield
    finally:
        os.chdir(old)


def _api(course: Path):
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config, PyFileConfigLoader

    config = Config()
    config.merge(PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config())
    config.CourseDirectory.root = str(course)
    return NbGraderAPI(CourseDirectory(config=config), config=config)


def generate(course: Path | str = "course_build", source: Path | None = None,
             notebooks: list[str] | None = None) -> Path:
    """Write the student versions to ``course/release/dstar_edu`` (solutions and hidden tests removed,
    outputs cleared, autograder cells locked) and record the points in ``course/gradebook.db``."""
    course = build_course(Path(course).resolve(), source, notebooks)
    with _in_course(course):
        result = _api(course).generate_assignment(ASSIGNMENT, force=True, create=True)
    if not result["success"]:
        raise RuntimeError(f"nbgrader generate_assignment failed:\n{result.get('error') or result.get('log')}")
    return course / "release" / ASSIGNMENT


def autograde(submissions: Path | str, course: Path | str = "course_build", source: Path | None = None,
              env: dict | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """Autograde ``submissions/<student>/NN_*.ipynb``: ``{student: {notebook: (score, max_score)}}``.

    Generates the course first when ``course`` has no gradebook. Each notebook is executed by nbgrader (its
    hidden tests restored from the source version, so deleting them gains nothing)."""
    submissions = Path(submissions).resolve()
    students = sorted(p for p in submissions.iterdir() if p.is_dir()) if submissions.is_dir() else []
    if not students:
        raise FileNotFoundError(f"submissions={str(submissions)!r} must be a folder with one sub-folder per student "
                                "holding that student's NN_*.ipynb notebooks")
    course = Path(course).resolve()
    if not (course / "gradebook.db").exists():
        generate(course, source)
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        with _in_course(course):
            api = _api(course)
            for student in students:
                target = course / "submitted" / student.name / ASSIGNMENT
                if target.exists():
                    shutil.rmtree(target)
                target.mkdir(parents=True)
                for nb in sorted(student.glob("*.ipynb")):
                    shutil.copy2(nb, target / nb.name)
                result = api.autograde(ASSIGNMENT, student.name, force=True, create=True)
                if not result["success"]:
                    raise RuntimeError(f"nbgrader autograde failed for student {student.name!r}:\n"
                                       f"{result.get('error') or result.get('log')}")
            from nbgrader.api import Gradebook
            with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
                for student in students:
                    sub = gb.find_submission(ASSIGNMENT, student.name)
                    scores[student.name] = {f"{nb.name}.ipynb": (float(nb.score), float(nb.max_score))
                                           for nb in sub.notebooks}
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with open(course / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "notebook", "score", "max_score"])
        for student, nbs in scores.items():
            for nb, (s, m) in sorted(nbs.items()):
                w.writerow([student, nb, s, m])
    return scores


def is_exercise_cell(cell) -> bool:
    """An nbgrader cell (solution or autograder test) or the ``describe`` cell that introduces one."""
    text = "".join(cell.get("source", ""))
    return "nbgrader" in cell.get("metadata", {}) or (cell.get("cell_type") == "code" and ".describe(" in text
                                                       and len(text.splitlines()) == 1)


def light_version(nb: dict) -> dict:
    """The light profile of a notebook: its first code cell (imports and setup) and every exercise cell, in order.

    The demo cells in between are the same in the source and the student version, and CI already runs them in
    the source version (nbmake); the light profile executes what generating and grading change, in seconds."""
    import copy
    out = copy.deepcopy(nb)
    first = next(i for i, c in enumerate(out["cells"]) if c["cell_type"] == "code")
    out["cells"] = [c for i, c in enumerate(out["cells"]) if i == first or (c["cell_type"] == "code"
                                                                          and is_exercise_cell(c))]
    return out


def execute(nb: dict, cwd: Path | str, timeout: int = 300) -> dict:
    """Execute a notebook (a dict) top to bottom with nbclient; raises on the first exception in a cell."""
    import json

    import nbformat
    from nbclient import NotebookClient
    node = nbformat.reads(json.dumps(nb), as_version=4)
    NotebookClient(node, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dstar-edu-course", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the student versions to COURSE/release/dstar_edu")
    a = sub.add_parser("autograde", help="autograde SUBMISSIONS/<student>/NN_*.ipynb and print the scores")
    a.add_argument("submissions", type=Path)
    for p in (g, a):
        p.add_argument("--course", type=Path, default=Path("course_build"), help="nbgrader course folder")
        p.add_argument("--source", type=Path, default=None, help="instructor notebooks (default: notebooks/)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        out = generate(args.course, args.source)
        print(f"student versions written to {out}")
        return 0
    scores = autograde(args.submissions, args.course, args.source)
    print(f"{'student':<16} {'notebook':<44} score")
    for student, nbs in scores.items():
        for nb, (s, m) in sorted(nbs.items()):
            print(f"{student:<16} {nb:<44} {s:g} / {m:g}")
        total, most = sum(s for s, _ in nbs.values()), sum(m for _, m in nbs.values())
        print(f"{student:<16} {'TOTAL':<44} {total:g} / {most:g}")
    print(f"scores written to {Path(args.course).resolve() / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
