"""``dstar-edu verify`` alone catches broken seed formulas: a fast sample of ``mutation_harness.MUTATIONS``
(the full list with its catch rate: ``bench/bench_mutations.py``)."""
import pytest

from mutation_harness import MUTATIONS, Mutation, run_mutation

FAST = ("alpha_bar of a process = alpha^2", "NPO guidance weight omega on the positive branch",
        "TrigFlow diffusion target sign")


@pytest.mark.parametrize("name", FAST)
def test_verify_catches_mutation(name):
    (m,) = [m for m in MUTATIONS if m.name == name]
    res = run_mutation(m, timeout=300)
    assert res["caught"], f"verify -k {m.patterns} did not catch '{name}': {res['runs']}"


def test_unmutated_copy_passes():
    """Control: the same harness with a no-op replacement reports no failure (so a 'catch' means the mutation)."""
    (m,) = [m for m in MUTATIONS if m.name == FAST[0]]
    res = run_mutation(Mutation("no-op", m.path, m.old, m.old, m.patterns), timeout=300)
    assert not res["caught"] and res["runs"][0]["returncode"] == 0, res


def test_every_mutation_applies_once():
    """Each listed mutation's text occurs exactly once in the current sources (else the list is stale)."""
    from mutation_harness import ROOT
    for m in MUTATIONS:
        assert (ROOT / m.path).read_text().count(m.old) == 1, m.name
