"""What a student reads (issue 9, item 3): ``describe`` points to the seed equation and says what to compute, but
never prints the answer's formula; hints start with the pointer to the seed equation and get more specific."""
import re

import pytest

from dstar_edu import exercises as ex
from dstar_edu.exercises import core

SEED_POINTER = re.compile(r"\b(Eq|Sec|Alg|Thm|Table|Fig|App)\.? ?\d|\btalk\b")   # the talks number no equations


def _formula(returns: str) -> str:
    """The right-hand side of an instructor's ``returns`` line ("x0_hat = (x_t - ...)" -> "(x_t - ...)")."""
    return returns.split(" = ", 1)[1] if re.match(r"^[\w'()\[\] ]+ = ", returns) else returns


@pytest.mark.parametrize("name", list(ex.EXERCISES))
def test_describe_points_to_the_seed_and_hides_the_formula(name, capsys):
    exercise = ex.EXERCISES[name]
    ex.describe(name)
    shown = capsys.readouterr().out
    assert SEED_POINTER.search(exercise.source), exercise.source
    assert exercise.source in shown
    formula = _formula(exercise.returns)
    if formula != exercise.return_note:
        assert formula not in shown, f"describe({name!r}) prints the formula {formula!r}"


@pytest.mark.parametrize("name", list(ex.EXERCISES))
def test_hints_are_progressive(name, monkeypatch):
    exercise = ex.EXERCISES[name]
    monkeypatch.setattr(core, "_FAILURES", {})
    first = core._hint_lines(exercise)
    assert first[0].startswith(f"Hint 1 (re-read {exercise.source})") and not any("Hint 2" in x for x in first)
    core._FAILURES[name] = 1 + len(exercise.hints)
    last = core._hint_lines(exercise)
    levels = [int(re.match(r"Hint (\d+)", x).group(1)) for x in last if x.startswith("Hint")]
    assert levels == list(range(1, 3 + len(exercise.hints)))
