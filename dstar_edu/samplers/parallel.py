"""Parallel sampling (Wang talk, "Picard iteration", "Lower bound of Picard iteration = sequential denoising",
"Parareal algorithm" / SRDS): solve the whole sampling ODE trajectory by fixed-point rounds whose predictor calls
are independent (one batched call per round) instead of one call after another.

Both methods take the same one-step solver as the sequential sampler (the deterministic DDIM step of
``objectives.pretrain.ddim_denoise``, handbook Eq. 21, or an Euler step of the PF-ODE drift ``samplers.velocity``),
so their fixed point IS the sequential solution:

* Picard (talk): ``x^{k+1}_{i+1} = x_0 + sum_{j <= i} Delta_j(x^k_j)`` with ``Delta_j(x) = step(x, t_j, t_{j+1}) - x``.
  After round ``k`` the first ``k`` states equal the sequential ones (the talk's "lower bound" argument), so it
  converges exactly in at most ``N`` rounds and stops early once a round changes nothing.
* Parareal (talk, SRDS): ``x^{p+1}_{i+1} = F(x^p_i) + G(x^{p+1}_i) - G(x^p_i)`` with a coarse solver ``G`` (one step
  per coarse interval, sequential sweep) and a fine solver ``F`` (the fine steps of the interval, all intervals in
  parallel). Exact (equal to the sequential fine solution) after ``K`` corrections, ``K`` = number of coarse intervals.

Both return ``(sample, info)``: ``info["rounds"]`` (iterations), ``info["sequential_calls"]`` (predictor calls that
must run one after another: the wall-clock proxy), ``info["nfe"]`` (total predictor evaluations) and
``info["history"]`` (the final state after each round, for plots).
"""
from __future__ import annotations

import torch

from ..objectives.pretrain import ddim_denoise
from ..validation import check_batch, check_choice, check_int
from .common import _check_predictor, check_timesteps
from .diffusion import velocity

Tensor = torch.Tensor

__all__ = ["solver_step", "sequential_solve", "picard", "parareal", "SOLVERS"]

SOLVERS = ("ddim", "euler")


def solver_step(predictor, x: Tensor, t: Tensor, t_next: Tensor, solver: str = "ddim", cond=None) -> Tensor:
    """One deterministic step for a batch with per-sample times: DDIM (Eq. 21, ``ddim_denoise``) or Euler on the
    PF-ODE drift (``x + (t_next - t) v(x, t)``, the talk's Picard discretisation)."""
    if solver == "ddim":
        return ddim_denoise(predictor, x, t, t_next, cond)
    if solver == "euler":
        with torch.no_grad():
            v = velocity(predictor, x, t, cond)
        dt = (t_next - t).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x + dt * v
    raise ValueError(f"solver={solver!r} is unknown; allowed: {SOLVERS}")


def _prep(predictor, timesteps, x_init, solver):
    process = _check_predictor(predictor)
    ts = check_timesteps(timesteps, process)
    x = check_batch(x_init, "x_init")
    check_choice("solver", solver, SOLVERS)
    return ts, x


def _times(ts: Tensor, idx, B: int, dtype) -> Tensor:
    return ts[idx].to(dtype).repeat_interleave(B)


def sequential_solve(predictor, timesteps, x_init: Tensor, solver: str = "ddim", cond=None,
                     return_trajectory: bool = False):
    """The reference: ``x_{i+1} = step(x_i, t_i, t_{i+1})`` one call after another (``N`` sequential calls)."""
    ts, x = _prep(predictor, timesteps, x_init, solver)
    B, traj = x.shape[0], [x]
    for i in range(ts.numel() - 1):
        x = solver_step(predictor, x, _times(ts, [i], B, x.dtype), _times(ts, [i + 1], B, x.dtype), solver, cond)
        traj.append(x)
    return (x, traj) if return_trajectory else x


def _batched_steps(predictor, states: list[Tensor], ts: Tensor, starts: list[int], ends: list[int], solver, cond):
    """``step(states[k], ts[starts[k]], ts[ends[k]])`` for all k in ONE predictor call (per-sample times)."""
    B = states[0].shape[0]
    X = torch.cat(states, 0)
    t0 = torch.cat([_times(ts, [s], B, X.dtype) for s in starts])
    t1 = torch.cat([_times(ts, [e], B, X.dtype) for e in ends])
    c = None if cond is None else torch.cat([torch.as_tensor(cond).expand(B)] * len(states))
    return list(solver_step(predictor, X, t0, t1, solver, c).split(B, 0))


def picard(predictor, timesteps, x_init: Tensor, *, solver: str = "ddim", max_rounds: int | None = None,
           tol: float = 0.0, cond=None, init: str = "constant"):
    """Picard iteration over the whole trajectory (Wang talk). Returns ``(x_N, info)``; ``info["trajectory"]`` is the
    final list of states ``[x_0, ..., x_N]`` and ``info["history"]`` the ``x_N`` of every round.

    ``init="constant"``: every state starts at ``x_init``. A round evaluates the ``N`` increments in one batched call.
    Stops when a round changes no state by more than ``tol`` (``tol = 0``: bitwise fixed point, reached after at most
    ``N`` rounds) or after ``max_rounds`` (default ``N``).
    """
    ts, x0 = _prep(predictor, timesteps, x_init, solver)
    N = ts.numel() - 1
    check_choice("init", init, ("constant",))
    max_rounds = N if max_rounds is None else max_rounds
    check_int("max_rounds", max_rounds, lo=1)
    if not tol >= 0:
        raise ValueError(f"tol={tol!r} must be >= 0")
    states = [x0] * (N + 1)
    history, changes, rounds = [], [], 0
    for _ in range(max_rounds):
        stepped = _batched_steps(predictor, states[:-1], ts, list(range(N)), list(range(1, N + 1)), solver, cond)
        inc = torch.stack([s - x for s, x in zip(stepped, states[:-1])])
        new = [x0] + list(x0[None] + torch.cumsum(inc, 0))
        change = max(float((a - b).abs().max()) for a, b in zip(new, states))
        states, rounds = new, rounds + 1
        history.append(states[-1])
        changes.append(change)
        if change <= tol:
            break
    info = {"rounds": rounds, "sequential_calls": rounds, "nfe": rounds * N, "history": history,
            "changes": changes, "trajectory": states}
    return states[-1], info


def parareal(predictor, timesteps, x_init: Tensor, n_coarse: int, *, solver: str = "ddim",
             max_iters: int | None = None, tol: float = 0.0, cond=None):
    """Parareal (Wang talk, SRDS): the fine grid ``timesteps`` (``n_coarse * M + 1`` times) is cut into ``n_coarse``
    coarse intervals of ``M`` fine steps. ``G``: one solver step across a coarse interval; ``F``: its ``M`` fine steps.

    Initial guess by a coarse sweep; then ``x^{p+1}_{i+1} = F(x^p_i) + G(x^{p+1}_i) - G(x^p_i)``. After ``p`` corrections
    the first ``p`` coarse states are exact, so it equals the sequential fine solution after at most ``n_coarse``
    corrections (stops earlier when a correction changes nothing beyond ``tol``). Returns ``(x, info)``.
    """
    ts, x0 = _prep(predictor, timesteps, x_init, solver)
    Nf = ts.numel() - 1
    if isinstance(n_coarse, bool) or not isinstance(n_coarse, int) or n_coarse < 1 or Nf % n_coarse:
        raise ValueError(f"n_coarse={n_coarse!r} must be a positive integer dividing the {Nf} fine steps")
    M = Nf // n_coarse
    edges = list(range(0, Nf + 1, M))
    max_iters = n_coarse if max_iters is None else max_iters
    check_int("max_iters", max_iters, lo=1)
    B = x0.shape[0]

    def G(x, i):
        return solver_step(predictor, x, _times(ts, [edges[i]], B, x.dtype), _times(ts, [edges[i + 1]], B, x.dtype),
                           solver, cond)

    X, Gx = [x0], []
    for i in range(n_coarse):                       # initial coarse sweep: n_coarse sequential calls
        Gx.append(G(X[-1], i))
        X.append(Gx[-1])
    seq, nfe, history, changes, iters = n_coarse, n_coarse, [X[-1]], [], 0
    for _ in range(max_iters):
        Fx = list(X[:-1])                           # fine solves of all intervals in parallel: M batched rounds
        for j in range(M):
            Fx = _batched_steps(predictor, Fx, ts, [e + j for e in edges[:-1]], [e + j + 1 for e in edges[:-1]],
                                solver, cond)
        new_X, new_Gx = [x0], []
        for i in range(n_coarse):                   # sequential coarse correction sweep
            g_new = G(new_X[-1], i)
            new_X.append(Fx[i] + (g_new - Gx[i]))
            new_Gx.append(g_new)
        change = max(float((a - b).abs().max()) for a, b in zip(new_X, X))
        X, Gx, iters = new_X, new_Gx, iters + 1
        seq, nfe = seq + M + n_coarse, nfe + M * n_coarse + n_coarse
        history.append(X[-1])
        changes.append(change)
        if change <= tol:
            break
    info = {"rounds": iters, "sequential_calls": seq, "nfe": nfe, "history": history, "changes": changes,
            "coarse_states": X, "fine_steps_per_interval": M}
    return X[-1], info
