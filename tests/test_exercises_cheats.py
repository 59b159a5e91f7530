"""The four ways issue 9 found to game the grader each fail now (and the honest answer still passes)."""
import sys

import torch

from dstar_edu import conversions as cv
from dstar_edu import exercises as ex
from dstar_edu.exercises import core


def honest_tweedie(x_t, eps_hat, alpha_bar):
    return (x_t - torch.sqrt(1 - alpha_bar) * eps_hat) / torch.sqrt(alpha_bar)


def test_honest_answer_passes_on_fresh_printed_seeds(capsys):
    assert ex.check("tweedie_x0", honest_tweedie) and ex.check("tweedie_x0", honest_tweedie)
    seeds = [line.split("seed ")[1].split(" ")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("Grading")]
    # two draws of a 31-bit OS seed coincide with probability 2^-31
    assert len(seeds) == 2 and seeds[0] != seeds[1]


def test_cheat_1_submitting_the_reference_fails(capsys):
    cheat = ex.reference("tweedie_x0")          # allowed outside grading (instructors)...
    assert ex.check("tweedie_x0", cheat) is False
    out = capsys.readouterr().out
    assert "the reference solution refuses to run while exercise 'tweedie_x0' is being graded" in out

    def wraps_reference(x_t, eps_hat, alpha_bar):  # ... and asking for it while graded refuses too
        return ex.reference("tweedie_x0")(x_t, eps_hat, alpha_bar)
    assert ex.check("tweedie_x0", wraps_reference) is False
    assert "exercises.reference refuses to run while exercise 'tweedie_x0' is being graded" in capsys.readouterr().out
    # the reference is restored afterwards: it still computes the right thing for the instructor
    d = ex.sample_inputs("tweedie_x0", 1, seed=3)[0]
    torch.testing.assert_close(cheat(*d.values()), honest_tweedie(*d.values()), rtol=1e-12, atol=0)


def test_cheat_2_calling_the_library_implementation_fails(capsys):
    from dstar_edu.conversions import x0_from_eps as captured    # a reference taken before grading

    def via_module(x_t, eps_hat, alpha_bar):
        return cv.x0_from_eps(x_t, eps_hat, torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar))

    def via_captured(x_t, eps_hat, alpha_bar):
        return captured(x_t, eps_hat, torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar))

    for cheat in (via_module, via_captured):
        assert ex.check("tweedie_x0", cheat) is False
        assert "dstar_edu.conversions.x0_from_eps refuses to run while exercise 'tweedie_x0'" in capsys.readouterr().out
    for name in ("sim_loss", "dpo_loss", "drwr_weights", "pseudo_huber_grad"):
        assert ex.EXERCISES[name].guards, name
    # after grading the library works again
    x = torch.ones(2, 2, dtype=torch.float64)
    half = torch.tensor(0.5)
    torch.testing.assert_close(cv.x0_from_eps(x, x, half, half), x, rtol=0, atol=0)  # (1 - .5) / .5 = 1, exact


def test_cheat_3_lookup_table_from_sample_inputs_fails(capsys):
    table = {}
    for seed in range(5):                               # the student tabulates every seed they can think of
        for d in ex.sample_inputs("tweedie_x0", seed=seed):
            table[d["x_t"].numpy().tobytes()] = honest_tweedie(*d.values())

    def lookup(x_t, eps_hat, alpha_bar):
        return table[x_t.numpy().tobytes()]

    assert ex.check("tweedie_x0", lookup, seed=0) is True      # the table does cover a seed it was built from
    capsys.readouterr()
    # a fresh seed (the default) is one of 2^31: the table misses with probability >= 1 - 5 / 2^31
    assert ex.check("tweedie_x0", lookup) is False
    assert "KeyError" in capsys.readouterr().out


def test_cheat_4_patching_the_grader_fails_after_the_hidden_tests_reimport(capsys):
    from dstar_edu.course import fresh_grader, hidden_test_source

    def my_tweedie(x_t, eps_hat, alpha_bar):
        return x_t

    original = core._close
    saved = {k: v for k, v in sys.modules.items() if k.startswith("dstar_edu.exercises")}
    core._close = lambda got, expected, atol=0: (True, 0.0, 0.0)    # the student's monkeypatch
    try:
        assert ex.check("tweedie_x0", my_tweedie) is True             # fools the grader it patched...
        namespace = {"my_tweedie": my_tweedie}
        try:                                                          # ... not the autograder's hidden test
            exec(hidden_test_source("tweedie_x0", "my_tweedie"), namespace)  # noqa: S102
        except AssertionError as failed:
            assert "exercise tweedie_x0 is not solved yet" in str(failed)
        else:
            raise AssertionError("the hidden test passed a wrong answer under a patched grader")
        assert namespace["_grader"] is not ex and namespace["_grader"].check("tweedie_x0", honest_tweedie)
    finally:
        core._close = original
        fresh_grader()
        sys.modules.update(saved)                # later tests keep the modules they imported
        import dstar_edu
        dstar_edu.exercises = saved["dstar_edu.exercises"]


def test_every_exercise_guards_a_swappable_library_function():
    # a guard that does not resolve, or a function with a closure (whose code cannot be swapped), would let the
    # library answer through silently
    for name, exercise in ex.EXERCISES.items():
        assert exercise.guards, name
        for target in exercise.guards:
            fn = core._resolve(target)
            assert callable(fn) and fn.__code__.co_freevars == (), (name, target)


def test_cheats_fail_on_the_outcome_graded_training_step(capsys):
    """The training-step exercise of notebook 03 (graded by the model it trains) resists the same cheats: the
    reference and the library loss refuse while graded, and patched thresholds (both) do not survive the hidden
    test's re-import. A lookup table is moot: the grader calls the loss on batches it draws during training."""
    from dstar_edu.course import fresh_grader, hidden_test_source
    from dstar_edu.exercises import training

    assert ex.check("denoising_step", ex.reference("denoising_step")) is False                    # cheat 1
    assert "the reference solution refuses to run while exercise 'denoising_step'" in capsys.readouterr().out

    def via_library(eps_model, x0, alpha, sigma, generator):                                       # cheat 2
        from dstar_edu.objectives import denoising_loss
        from dstar_edu.predictors import FunctionPredictor
        pred = FunctionPredictor(lambda x, t, c: eps_model(x, t), training.PROCESS, "eps")
        return denoising_loss(pred, x0, generator=generator)
    assert ex.check("denoising_step", via_library) is False
    assert "denoising_loss refuses to run while exercise 'denoising_step'" in capsys.readouterr().out

    def regress_x0(eps_model, x0, alpha, sigma, generator):                                        # a wrong answer
        t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return ((eps_model(alpha(t) * x0 + sigma(t) * eps, t) - x0) ** 2).sum(1).mean()

    saved = {k: v for k, v in sys.modules.items() if k.startswith("dstar_edu.exercises")}
    original = training.THRESHOLD, training.DENOISER_THRESHOLD
    training.THRESHOLD = training.DENOISER_THRESHOLD = float("inf")                               # cheat 4
    try:
        assert ex.check("denoising_step", regress_x0) is True          # fools the grader it patched...
        namespace = {"regress_x0": regress_x0}
        try:                                                           # ... not the autograder's hidden test
            exec(hidden_test_source("denoising_step", "regress_x0"), namespace)  # noqa: S102
        except AssertionError as failed:
            assert "exercise denoising_step is not solved yet" in str(failed)
        else:
            raise AssertionError("the hidden test passed a wrong training step under patched thresholds")
    finally:
        training.THRESHOLD, training.DENOISER_THRESHOLD = original
        fresh_grader()
        sys.modules.update(saved)
        import dstar_edu
        dstar_edu.exercises = saved["dstar_edu.exercises"]
