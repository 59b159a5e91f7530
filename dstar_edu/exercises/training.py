"""Outcome-graded training step (notebook 03): write one step of the 2D denoising loss, the grader trains with it.

The student writes ``denoising_step(eps_model, x0, alpha, sigma, generator)``: draw per-sample times and noise,
build the noisy batch of handbook Eq. 6 and return the epsilon-prediction loss of Sec. 3.1.1 (the last line of
the L_SM derivation, Sec. 2.2.2). ``check`` draws a fresh problem from its printed seed -- a random 3-component 2D
Gaussian mixture and the initial weights of a small MLP -- trains the MLP with the student's loss (Adam, cosine
learning rate, ``STEPS`` steps of batch ``BATCH``, a few seconds on one idle CPU core), and grades what it trained:

1. its samples (the library's DDIM sampler, ``DDIM_STEPS`` steps of the VP process) against the data by the sliced
   Wasserstein distance (``metrics.sliced_wasserstein``) divided by the *noise floor*, the same distance between
   two independent data samples of the same size estimated in the same run: at most ``THRESHOLD``;
2. its noise prediction against the exact one of the mixture (closed form) at ``GRADED_TIMES``: the geometric mean
   of the relative squared errors there at most ``DENOISER_THRESHOLD`` (the geometric mean weighs each time by its
   own scale: a correct network is ~10x more accurate at t = 0.3 than at t = 0.1, a network trained on badly built
   noisy batches is off at every one of them).

Where the thresholds come from (``bench/bench_exercise_denoising_step.py``, measured in this session on a loaded
2-core machine, one process; grading seeds 0-99 and 100-116 for the reference, 1000-1009 for each mistake, 1000-1011
for the noise without its coefficient). The reference reaches SW ratios 0.52-2.46 (median 1.17) and graded denoiser
errors 0.0013-0.012 (median 0.0055), and fails neither criterion on any seed. Its false-fail probability per
grading, from log-normal fits to the 100 values of seeds 0-99 (a union bound over the criteria; the logs have
skewness -0.6 and 0.0 and negative excess kurtosis, so their tails are no heavier than the fitted Gaussian's):
P(ratio > ``THRESHOLD`` = 4.0) = 2e-4 (z = 3.5) and P(error > ``DENOISER_THRESHOLD`` = 0.03) = 2.5e-4 (z = 3.5), so
below 5e-4 in all; 0.03 is 2.6x the largest measured error (0.0116, seed 116, whose error of 0.145 at t = 0.1 failed
the earlier rule). The earlier rule (largest error at the graded times <= 0.1, ratio <= 2.5) failed the reference on
3 of these 117 seeds (errors 0.12-0.15 at t = 0.1, where a correct network is least accurate) with ratios up to 2.46
-- the geometric mean weighs each time by its own scale. Every catalogued mistake fails the denoiser criterion on
every seed measured, most also the SW one: the loss with the wrong sign drives the network to non-finite outputs
(ratios 1.5e15 to inf, errors 2e25-1e26); the target -eps reaches ratios 2e5-1.5e6 (errors 3.9-4.0), the target x0
207-2650 (1.2-3.9), every time t = 1 5.2-32 (0.65-2.3), times only in [0, 0.1] 21-5e13 (0.054-0.14); the noise
without its coefficient reaches ratios 1.3-5.1, overlapping the reference's, but errors 0.072-0.144 (12 seeds): 2.4x
above the threshold at its smallest, and a log-normal fit puts P(error <= 0.03) at 2e-13 (z = 7.2).

A wrong answer is told which property fails, measured without stating the formula: a non-scalar or non-finite
loss, a loss that grows during training, a loss that is not smallest at the exact noise predictor of the mixture
(probed on one batch), the time region where the trained network's noise prediction is far from the exact one,
and the spread and mean of the samples against the data.
"""
from __future__ import annotations

import contextlib

import torch

from ..process import VP
from .core import Exercise, OutcomeTrial, register

Tensor = torch.Tensor
F64 = torch.float64

#: training budget of one grading run (a fresh problem each run)
STEPS, BATCH, LR, HIDDEN, DEPTH = 800, 256, 1e-2, 64, 2
#: samples for the distance (and for each of the two data samples of the noise floor), DDIM steps, projections
N_SAMPLES, DDIM_STEPS, N_PROJECTIONS, REPEATS = 1000, 50, 512, 2
#: pass when SW(samples, data) <= THRESHOLD * SW(data, data'); basis in the module docstring
THRESHOLD = 4.0
#: the mixture: K components with means uniform in [-2, 2]^2 and a common standard deviation
K, SPREAD, STD = 3, 2.0, 0.35
#: times at which the trained network's noise prediction is compared with the exact one of the mixture: all of
#: them in the feedback; GRADED_TIMES also grade (geometric mean of their relative squared errors at most
#: DENOISER_THRESHOLD)
PROBE_TIMES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0)
GRADED_TIMES = (0.1, 0.2, 0.3)
DENOISER_THRESHOLD = 0.03
PROCESS = VP()


def _mixture(g: torch.Generator):
    from toy_data.mixtures import GaussianMixture
    means = SPREAD * (2 * torch.rand(K, 2, generator=g, dtype=F64) - 1)
    return GaussianMixture(means, STD ** 2, process=PROCESS)


def _alpha(t: Tensor) -> Tensor:
    return PROCESS.alpha(t).reshape(-1, 1)


def _sigma(t: Tensor) -> Tensor:
    return PROCESS.sigma(t).reshape(-1, 1)


def _model(seed: int):
    from ..predictors import MLPPredictor
    with torch.random.fork_rng(devices=[]):      # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        return MLPPredictor(PROCESS, "eps", dim=2, hidden=HIDDEN, depth=DEPTH).to(F64)


def _scalar_problem(loss) -> str | None:
    """Why ``loss`` cannot be trained on, or None."""
    if not isinstance(loss, Tensor):
        return f"your function returned a {type(loss).__name__}, not a tensor: return the loss as a torch scalar."
    if loss.numel() != 1:
        return (f"your loss has shape {tuple(loss.shape)}: return one number for the whole batch (reduce over the "
                "batch and the coordinates).")
    if not loss.requires_grad:
        return ("your loss does not depend on the network (no gradient): compute it from eps_model's output "
                "without detaching it.")
    return None


def _direction(loss_fn, model, x0: Tensor, seed: int) -> Tensor:
    """The unit gradient of ``loss_fn`` at ``model`` on one batch (a scale-free fingerprint of a loss)."""
    loss = loss_fn(lambda x, t: model(x, t), x0.clone(), _alpha, _sigma, torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    flat = torch.cat([q.reshape(-1) for q in grads])
    return flat / flat.norm()


def train_with(step_fn, mix, seed: int):
    """Train ``_model(seed)`` for ``STEPS`` Adam steps on ``step_fn``'s loss over batches of ``mix``; returns
    ``(model, losses, problem)`` -- ``problem`` says why training stopped early (a non-scalar, gradient-free or
    non-finite loss), else None."""
    from ..training import cpu_threads
    model = _model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with cpu_threads(1):
        for k in range(STEPS):
            x0 = mix.sample(BATCH, generator=gen)
            loss = step_fn(lambda x, t: model(x, t), x0, _alpha, _sigma, gen)
            problem = _scalar_problem(loss)
            if problem is None and not bool(torch.isfinite(loss)):
                problem = f"your loss became {float(loss.detach())} at training step {k}."
            if problem is not None:
                return model, losses, problem
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    return model, losses, None


def sample_distance(model, mix, gen: torch.Generator):
    """``(samples, data, sw, floor)``: ``N_SAMPLES`` DDIM samples of ``model``, ``REPEATS + 1`` data samples of
    that size, the mean sliced Wasserstein distance of the samples to the data and the noise floor (the mean
    distance between consecutive data samples); ``sw`` and ``floor`` are NaN for non-finite samples."""
    from ..metrics import sliced_wasserstein
    from ..samplers.common import uniform_grid
    from ..samplers.diffusion import ddim
    from ..training import cpu_threads
    x_T = torch.randn(N_SAMPLES, 2, generator=gen, dtype=F64)
    data = [mix.sample(N_SAMPLES, generator=gen) for _ in range(REPEATS + 1)]
    try:
        with torch.no_grad(), cpu_threads(1):
            samples = ddim(model, uniform_grid(PROCESS, DDIM_STEPS), x_T)
    except FloatingPointError:           # the sampler stops on non-finite states: a network that blew up
        samples = torch.full_like(x_T, float("nan"))
    if not bool(torch.isfinite(samples).all()):
        return samples, data, float("nan"), float("nan")
    sw = sum(sliced_wasserstein(samples, data[r], N_PROJECTIONS, gen) for r in range(REPEATS)) / REPEATS
    floor = sum(sliced_wasserstein(data[r], data[r + 1], N_PROJECTIONS, gen) for r in range(REPEATS)) / REPEATS
    return samples, data, sw, floor


def graded_error(errs: dict[float, float]) -> float:
    """The denoiser statistic that grades: the geometric mean of ``errs`` over ``GRADED_TIMES``."""
    return float(torch.tensor([errs[t] for t in GRADED_TIMES], dtype=F64).log().mean().exp())


def denoiser_errors(model, mix, gen: torch.Generator, n: int = 4000) -> dict[float, float]:
    """For each of ``PROBE_TIMES``: ``E||eps_model(x_t, t) - eps*(x_t, t)||^2 / E||eps*(x_t, t)||^2`` over
    ``x_t ~ q_t``, where ``eps*`` is the exact noise predictor of the mixture (closed form)."""
    x0 = mix.sample(n, generator=gen)
    errs = {}
    for t in PROBE_TIMES:
        x_t, _ = PROCESS.q_sample(x0, t, generator=gen)
        with torch.no_grad():
            exact, got = mix.predict("eps", x_t, t), model(x_t, torch.full((n,), t, dtype=F64))
        errs[t] = ((got - exact) ** 2).sum(1).mean().item() / (exact ** 2).sum(1).mean().item()
    return errs


def _trial(trial: int, g: torch.Generator) -> OutcomeTrial:
    from ..training import cpu_threads
    seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
    mix = _mixture(g)
    state: dict = {}

    def exact_eps(x, t):
        return mix.predict("eps", x, t)

    def run(step_fn) -> Tensor:
        """Train a fresh MLP with the student's loss; returns the loss curve (stops at the first bad loss)."""
        model, losses, problem = train_with(step_fn, mix, seed)
        state["model"] = model
        if problem is not None:
            state["problem"] = problem
        with cpu_threads(1):
            # property probe, still under the guards: is the loss smallest at the exact noise predictor?
            if "problem" not in state:
                x0 = mix.sample(4 * BATCH, generator=torch.Generator().manual_seed(seed + 1))
                candidates = (("exact", exact_eps),
                              ("the exact one times 1.3", lambda x, t: 1.3 * exact_eps(x, t)),
                              ("the exact one times 0.7", lambda x, t: 0.7 * exact_eps(x, t)),
                              ("the exact one with the opposite sign", lambda x, t: -exact_eps(x, t)))
                with torch.no_grad(), contextlib.suppress(Exception):   # a probe that fails says nothing
                    state["minimiser"] = {
                        name: float(step_fn(m, x0.clone(), _alpha, _sigma, torch.Generator().manual_seed(seed + 2)))
                        for name, m in candidates}
        return torch.tensor(losses, dtype=F64)

    def probe(fn) -> Tensor:
        return _direction(fn, _model(seed), mix.sample(BATCH, generator=torch.Generator().manual_seed(seed + 3)),
                          seed + 4)

    def judge(curve: Tensor) -> str | None:
        if "problem" in state:
            return state.pop("problem")
        model = state.pop("model").eval()
        gen = torch.Generator().manual_seed(seed + 5)
        samples, data, sw, floor = sample_distance(model, mix, gen)
        finite = bool(torch.isfinite(samples).all())
        errs = denoiser_errors(model, mix, gen) if finite else {}
        if not finite:
            parts = ["the samples of your trained network contain NaN or inf: training made its noise prediction "
                     "blow up."]
        else:
            ratio, worst = sw / floor, graded_error(errs)
            if ratio <= THRESHOLD and worst <= DENOISER_THRESHOLD:
                state.clear()
                return None
            parts = []
            if ratio > THRESHOLD:
                parts.append(f"after {STEPS} training steps with your loss, the DDIM samples of the network are "
                             f"{sw:.3g} from the data (sliced Wasserstein), {ratio:.3g} times the noise floor "
                             f"{floor:.3g} (two data samples of the same size); a correct loss reaches at most "
                             f"{THRESHOLD} times.")
            if worst > DENOISER_THRESHOLD:
                parts.append(f"after {STEPS} training steps with your loss, the network's noise prediction at t = "
                             f"{list(GRADED_TIMES)} is off from the exact one of this mixture by a relative "
                             f"squared error of {worst:.2g} (geometric mean over these times); a correct loss "
                             f"reaches at most {DENOISER_THRESHOLD}.")
            spread = (samples.std(0) / data[0].std(0)).mean().item()
            if abs(spread - 1) > 0.15:
                parts.append(f"The spread of the samples is {spread:.3g} times the data's (a scale property).")
            shift = (samples.mean(0) - data[0].mean(0)).norm().item() / data[0].std(0).mean().item()
            if shift > 0.25:
                parts.append(f"The mean of the samples is off by {shift:.3g} data standard deviations.")
        n = curve.numel()
        if n >= 100 and curve[-50:].mean() > curve[:50].mean():
            parts.append(f"Your loss grew during training (mean of the first 50 steps {curve[:50].mean():.3g}, of "
                         f"the last 50 {curve[-50:].mean():.3g}): the optimiser minimises what you return.")
        at = state.pop("minimiser", None)
        if at is not None:
            beaten = [name for name, v in at.items() if name != "exact" and v < at["exact"]]
            if beaten:
                parts.append(f"On one batch your loss is smaller for {', '.join(beaten)} than for the exact noise "
                             "predictor of this mixture: a loss whose minimiser is the exact denoiser is smallest "
                             "there (look at what you regress onto and how the noisy batch is built).")
        if errs:
            bad = [t for t, e in errs.items() if e > 0.3]
            table = ", ".join(f"t={t:g}: {e:.2g}" for t, e in errs.items())
            if bad and len(bad) < len(errs):
                parts.append(f"The trained network's noise prediction is far from the exact one at t = {bad} "
                             f"(relative squared error by time: {table}): which times does your loss train on?")
            elif bad:
                parts.append(f"The trained network's noise prediction is far from the exact one at every time "
                             f"(relative squared error by time: {table}).")
        state.clear()
        return " ".join(parts)

    label = (f"a {K}-component 2D Gaussian mixture, an MLP trained {STEPS} steps (batch {BATCH}) from seed {seed}, "
             f"{N_SAMPLES} DDIM samples")
    return OutcomeTrial(label, {"seed": seed}, judge, run=run, probe=probe)


# ---- the reference and the catalogued mistakes (all draw the times first, then the noise) -------------------
def _draw(x0: Tensor, generator, *, times: str = "uniform"):
    u = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
    t = {"uniform": u, "one": torch.ones_like(u), "low": 0.1 * u}[times]
    return t, torch.randn(x0.shape, generator=generator, dtype=x0.dtype)


def _step(eps_model, x0, alpha, sigma, generator, *, sign=1.0, target="eps", noise_scale=True, times="uniform"):
    t, eps = _draw(x0, generator, times=times)
    x_t = alpha(t) * x0 + (sigma(t) if noise_scale else 1.0) * eps
    goal = {"eps": eps, "-eps": -eps, "x0": x0}[target]
    return sign * ((eps_model(x_t, t) - goal) ** 2).sum(1).mean()


def denoising_step(eps_model, x0, alpha, sigma, generator):
    """The reference: eps-prediction loss on one noisy batch (handbook Eq. 6, Sec. 3.1.1)."""
    return _step(eps_model, x0, alpha, sigma, generator)


register(Exercise(
    name="denoising_step", area="training",
    source="handbook Eq. 6 and Sec. 3.1.1 (the epsilon-prediction loss, the last line of L_SM in Sec. 2.2.2)",
    guards=("dstar_edu.objectives.pretrain:denoising_loss", "dstar_edu.process:Process.q_sample",
            "dstar_edu.training:train_2d"),
    prompt=("Write one training step of a 2D denoiser: the loss the grader backpropagates. For the batch x0, draw "
            "one time per sample, uniformly on [0, 1], then standard-normal noise shaped like x0 (in this order, "
            "both from `generator`, so the grader can reproduce your batch), build the noisy batch x_t of the VP "
            "process (handbook Eq. 6) from alpha(t) and sigma(t), and return the Monte-Carlo estimate of the "
            "epsilon-prediction loss of Sec. 3.1.1 on this batch (one number; any positive constant factor is "
            "fine). The grader trains a small MLP with your loss and samples it."),
    args=(("eps_model", "eps_model(x_t, t) -> predicted noise, shape (batch, 2); t a (batch,) tensor in [0, 1]"),
          ("x0", "clean data, shape (batch, 2), float64"),
          ("alpha", "alpha(t) -> the VP signal coefficient, shape (batch, 1)"),
          ("sigma", "sigma(t) -> the VP noise coefficient, shape (batch, 1)"),
          ("generator", "a torch.Generator: draw every random number from it")),
    returns="mean over the batch of ||eps_model(alpha(t) x0 + sigma(t) eps, t) - eps||^2",
    return_note="a scalar tensor: the loss on this batch, differentiable in eps_model's weights",
    reference=denoising_step,
    hint=("Eq. 6 gives x_t from x0 and noise with the two coefficients; the network is asked for the noise that "
          "was added, so the regression target is that noise."),
    hints=("torch.rand(n, generator=generator, dtype=x0.dtype) draws the times and torch.randn(x0.shape, "
           "generator=generator, dtype=x0.dtype) the noise.",
           "average the squared error over the batch; the network sees x_t and t, never x0 directly."),
    draw=lambda trial, g: _trial(trial, g), graded_by="outcome", n_trials=1,
    covers="a random 2D Gaussian mixture",
    grading=(f"the grader trains an MLP with your loss ({STEPS} Adam steps, batch {BATCH}, seeded from the printed "
             f"seed), samples {N_SAMPLES} points with the library's DDIM sampler and passes when their sliced "
             f"Wasserstein distance to the data is at most {THRESHOLD} times the noise floor (the distance between "
             "two independent data samples of the same size, measured in the same run) and the network's noise "
             f"prediction at t = {list(GRADED_TIMES)} is within a relative squared error of {DENOISER_THRESHOLD} "
             "of the exact one of the mixture (geometric mean over these times)."),
    mistakes=(
        (lambda m, x0, a, s, g: _step(m, x0, a, s, g, sign=-1.0),
         "your loss has the wrong sign: the optimiser minimises what you return, so it pushes the prediction away "
         "from the target."),
        (lambda m, x0, a, s, g: _step(m, x0, a, s, g, target="-eps"),
         "the regression target has the wrong sign: the network is asked for the noise that was added."),
        (lambda m, x0, a, s, g: _step(m, x0, a, s, g, target="x0"),
         "you regress onto the clean data: this network (and the sampler) predicts the noise."),
        (lambda m, x0, a, s, g: _step(m, x0, a, s, g, noise_scale=False),
         "the noise enters x_t without its coefficient: Eq. 6 scales it by sigma(t)."),
        (lambda m, x0, a, s, g: _step(m, x0, a, s, g, times="one"),
         "every sample uses t = 1 (pure noise): draw one time per sample, uniformly on [0, 1]."),
        (lambda m, x0, a, s, g: _step(m, x0, a, s, g, times="low"),
         "your times cover only [0, 0.1]: draw them uniformly on the whole of [0, 1]."),
    )))
