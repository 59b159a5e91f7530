"""Graded classroom exercises: a student writes a function, ``check`` grades it and explains what went wrong.

One registry for every area, each area a module that only defines and registers its exercises:

* ``basics``: the handbook's DDPM formulas (Tweedie, the DDPM posterior mean, v-prediction, ...), by value;
* ``distill``: SIM's distances ``d'(y)`` by value and SIM's generator loss by its gradient;
* ``align``: the CFG implicit-reward loss by its gradient, the guided score, DPO and DRWR weights by value;
* ``samplers``: whole DDIM and rectified-flow Euler loops, graded by their outcome against the exact flow map;
* ``formulas``: Sec. 2.7's unified velocity, consistency / LCM / TrigFlow parameterisations, InstaFlow's y-space,
  the DSM target, DDPO's log-density and advantages, by value;
* ``trajectory``: trajectory distillation (notebook 07): the PD target, the m-step CD target with a CFG teacher
  (handbook Eq. 21-23, 47) and ECT's mapping function r(t, iters), by value;
* ``training``: one step of the 2D denoising loss (notebook 03), graded by the outcome of training with it (the
  sliced Wasserstein distance of the trained model's samples to the data against its noise floor).

Grading draws fresh problems from a printed OS seed, and while a student's function runs the library functions
that implement its answer (``Exercise.guards``) and ``reference`` refuse to run (see ``core``).

``core`` holds the grading machinery they share (see its docstring for how answers are graded)::

    >>> from dstar_edu import exercises
    >>> exercises.list_exercises("basics")
    ['tweedie_x0', 'posterior_mean_ddpm', 'v_prediction', 'x0_from_v', 'score_from_eps']
    >>> exercises.describe("tweedie_x0")          # prompt + signature
    >>> exercises.check("tweedie_x0", my_tweedie)  # True / False, with a printed explanation

Wrong answers never raise; ``check`` returns ``True``/``False``.
"""
from .core import (ATOL, EXERCISES, GRADED_BY, RTOL, Exercise, GradientTrial, GradingGuardError, OutcomeTrial, Trial,
                   check, describe, list_exercises, reference, register, sample_inputs)

# importing an area registers its exercises; this order is list_exercises()'s
from . import basics  # noqa: E402, F401
from . import distill  # noqa: E402, F401
from . import align  # noqa: E402, F401
from . import samplers  # noqa: E402, F401
from . import formulas  # noqa: E402, F401
from . import trajectory  # noqa: E402, F401
from . import training  # noqa: E402, F401
from .basics import ddpm_posterior_mean  # noqa: E402

__all__ = ["Exercise", "Trial", "GradientTrial", "OutcomeTrial", "GradingGuardError", "EXERCISES", "RTOL", "ATOL",
           "GRADED_BY", "register", "check",
           "describe", "list_exercises", "reference", "sample_inputs", "ddpm_posterior_mean"]
