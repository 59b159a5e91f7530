"""Measurement helpers of the checks: exact laws of affine steps, local and global orders of convergence, Richardson
extrapolation, and quadratures exact for the degree they are used at. (Observed orders with an Aitken-extrapolated
tolerance are in ``rates.py``.)

Each helper states where its accuracy comes from, so that the check using it can state its tolerance.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dstar_edu.process import Process
from dstar_edu.verify.registry import CheckResult, identity

__all__ = ["law_step", "law_error", "pf_ode_flow_rk4", "local_order", "local_order_result", "richardson2",
           "fit_log_slope", "sigma_points", "gauss_hermite", "gauss_hermite_grid", "trapezoid_rule_2d",
           "gaussian_kl_full"]

F64 = torch.float64
Tensor = torch.Tensor



# ---- exact laws of sampler steps on Gaussian data ---------------------------------------------------------
def law_step(step, m: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Exact law after ``x' = step(x, z)`` for ``x ~ N(m, diag V)``, ``z ~ N(0, I)`` independent.

    Valid when ``step`` is affine in ``x`` and ``z`` coordinate by coordinate (every sampler step with an
    ``ExactGaussian`` or ``GaussianFlowMap`` model): three evaluations give the offset, the gain on ``x``
    and the gain on ``z``.
    """
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    out = step(torch.cat([m, m + 1, m]), torch.cat([zero, zero, one]))
    base = out[:1]
    gain, noise_gain = out[1:2] - base, out[2:3] - base
    return base, gain * gain * V + noise_gain * noise_gain


def law_error(m: Tensor, V: Tensor, m_ref: Tensor, V_ref: Tensor) -> float:
    """Largest standardised mean error ``|m - m_ref| / sqrt(V_ref)`` or relative variance error."""
    return max(float(((m - m_ref).abs() / V_ref.sqrt()).max()), float((V / V_ref - 1).abs().max()))

# ---- orders of convergence and extrapolation ----------------------------------------------------------------
def pf_ode_flow_rk4(dist, process: Process, x: Tensor, t0: float, t1: float, n_sub: int = 8) -> Tensor:
    """PF-ODE flow from t0 to t1 by classical RK4 on the exact drift ``alpha' E[x0|x] + sigma' E[eps|x]``."""
    def v(y, t):
        tt = torch.tensor(t, dtype=F64)
        a, s = process.coefficients(tt, y)
        x0 = dist.posterior_mean(y, tt)
        return process.d_alpha(tt) * x0 + process.d_sigma(tt) * (y - a * x0) / s
    h = (t1 - t0) / n_sub
    t = t0
    for _ in range(n_sub):
        k1 = v(x, t)
        k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = v(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t + h
    return x


def local_order(step, dist, process, x, t0, hs) -> dict:
    """Local errors e(h) = rms_i |step(x_i, t0, t0 - h) - flow(x_i)| for the h in ``hs`` (each half the last),
    observed orders p_k = log2(e_k / e_{k+1}) and the Richardson-extrapolated order 2 p_K - p_{K-1}."""
    errs = []
    for h in hs:
        ref = pf_ode_flow_rk4(dist, process, x, t0, t0 - h)
        d = (step(x, t0, t0 - h) - ref).reshape(x.shape[0], -1)
        errs.append(float(d.norm(dim=1).pow(2).mean().sqrt()))
    p = [math.log2(errs[k] / errs[k + 1]) for k in range(len(errs) - 1)]
    return {"h": list(hs), "local_err": errs, "orders": p, "order_extrapolated": 2 * p[-1] - p[-2],
            "richardson_err": abs(p[-1] - p[-2])}


def local_order_result(info: dict, expected: float, **details) -> CheckResult:
    """The extrapolated order equals ``expected`` within the size of the last Richardson correction."""
    return identity(torch.tensor(info["order_extrapolated"]), torch.tensor(float(expected)), rtol=0.0,
                    atol=info["richardson_err"], order=float(expected), **info, **details)


def richardson2(gs):
    """Two Richardson levels for a first-order sequence at halving steps: the last value and its a-posteriori error."""
    R = [2 * gs[i + 1] - gs[i] for i in range(len(gs) - 1)]
    R2 = [(4 * R[i + 1] - R[i]) / 3 for i in range(len(R) - 1)]
    return R, R2, float((R2[-1] - R2[-2]).abs().max())


def fit_log_slope(dts, means, ses):
    """Weighted least-squares slope of log|mean| on log dt (weights from the relative standard errors)."""
    x = torch.log(torch.tensor(dts, dtype=F64))
    y = torch.log(torch.tensor(means, dtype=F64).abs())
    sy = torch.tensor(ses, dtype=F64) / torch.tensor(means, dtype=F64).abs()
    w = 1 / sy ** 2
    xm, ym = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    slope = (w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum()
    return float(slope), float(torch.sqrt(1 / (w * (x - xm) ** 2).sum()))

# ---- quadratures and closed forms for Gaussians ------------------------------------------------------------
def sigma_points(mean: Tensor, cov: Tensor) -> Tensor:
    """The ``2n`` points ``mean +- sqrt(n) L e_i`` (``cov = L L^T``): with equal weights ``1/(2n)`` they
    reproduce all moments of ``N(mean, cov)`` up to degree 3 (odd ones by symmetry, second ones since
    ``sum_i (sqrt(n) L e_i)(sqrt(n) L e_i)^T / n = L L^T``)."""
    n = mean.numel()
    L = torch.linalg.cholesky(cov)
    offs = math.sqrt(n) * L.T                                  # rows: sqrt(n) L e_i
    return torch.cat([mean + offs, mean - offs])


def gauss_hermite(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for N(0, 1): exact for polynomials of degree <= 2n - 1."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x, dtype=F64), torch.tensor(w / math.sqrt(2 * math.pi), dtype=F64)


def gauss_hermite_grid(n: int, d: int) -> tuple[Tensor, Tensor]:
    """Tensor-product Gauss-Hermite rule for N(0, I_d): nodes (n^d, d), weights (n^d,)."""
    x, w = gauss_hermite(n)
    nodes = torch.cartesian_prod(*([x] * d)).reshape(-1, d)
    weights = torch.cartesian_prod(*([w] * d)).reshape(-1, d).prod(1)
    return nodes, weights


def trapezoid_rule_2d(h: float, half_width: float = 8.0) -> tuple[Tensor, Tensor]:
    """Uniform tensor grid of spacing h on [-half_width, half_width]^2 with weights phi(u) h^2 (N(0, I_2)).

    For integrands analytic in a strip around the real axis the trapezoid rule converges like
    exp(-2 pi d / h) (d: the strip's half-width); the Gaussian factor makes the truncation error
    below phi(8) ~ 1e-14."""
    x = torch.arange(-half_width, half_width + h / 2, h, dtype=F64)
    u = torch.cartesian_prod(x, x)
    w = torch.exp(-0.5 * (u * u).sum(1)) / (2 * math.pi) * h * h
    return u, w


def gaussian_kl_full(m1, S1, m2, S2):
    """``KL(N(m1, S1) || N(m2, S2))`` for full covariances, in closed form."""
    D = m1.numel()
    S2i = torch.linalg.inv(S2)
    dm = m2 - m1
    return 0.5 * (torch.trace(S2i @ S1) + dm @ S2i @ dm - D + torch.logdet(S2) - torch.logdet(S1))
