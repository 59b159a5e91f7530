"""Exact models: Gaussian mixtures and empirical point sets with closed-form diffused marginals.

Under any process ``x_t = alpha x0 + sigma eps`` a mixture ``sum_k w_k N(mu_k, Sigma_k)`` diffuses to
``sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, so the density, the score, the component
responsibilities and the posterior mean ``E[x0 | x_t]`` (Tweedie, handbook Eq. 7) are exact. An
empirical distribution (a finite point set such as a batch of CIFAR images) is the mixture with
``Sigma_k = 0``. Both are predictors (``prediction = "score"``) so the same theorem checks and losses
run on them and on neural networks. Shapes: parameters ``(K, *event_shape)``, inputs
``(batch, *event_shape)``; 2D points and 3x32x32 images go through the same code.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dstar_edu.conversions import check_prediction, convert
from dstar_edu.predictors import Predictor
from dstar_edu.process import Process
from dstar_edu.validation import check_int, check_type

from .datasets2d import EIGHT_GAUSSIANS_STD, GRID25_STD, eight_gaussians_means, grid25_means

Tensor = torch.Tensor

__all__ = ["GaussianMixture", "EmpiricalDistribution", "eight_gaussians_mixture", "grid25_mixture"]


class GaussianMixture(Predictor):
    """Gaussian mixture with fixed weights, in any dimension, optionally class-conditional.

    Args:
        means: ``(K, *event_shape)``.
        covs: a float (shared isotropic variance), ``(K,)`` isotropic variances, ``(K, *event_shape)``
            diagonal variances, or ``(K, D, D)`` full covariances (``D = prod(event_shape)``).
        weights: ``(K,)`` non-negative, summing to one (default uniform).
        labels: optional ``(K,)`` integer class of each component; ``cond`` then selects a class.
        process: the forward process that defines ``t`` (needed for diffused quantities).
    """

    def __init__(self, means: Tensor, covs=1.0, weights: Tensor | None = None, labels: Tensor | None = None,
                 process: Process | None = None, *, _allow_zero_cov: bool = False):
        nn.Module.__init__(self)
        self.prediction = "score"
        check_type("process", process, (Process, None), "a dstar_edu Process (e.g. VP()) or None")
        self.process = process
        name = "points" if _allow_zero_cov else "means"
        try:
            means = torch.as_tensor(means, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a tensor of shape (K, *event_shape), got {type(means).__name__} "
                             f"({err})") from None
        if means.ndim < 2:
            raise ValueError(f"{name} must have shape (K, *event_shape), got shape {tuple(means.shape)}")
        if means.shape[0] == 0 or means[0].numel() == 0:
            raise ValueError(f"{name} has no components (shape {tuple(means.shape)}); need K >= 1 "
                             f"{'points' if _allow_zero_cov else 'components'} of dimension >= 1")
        if not bool(torch.isfinite(means).all()):
            k = int((~torch.isfinite(means)).reshape(means.shape[0], -1).any(1).nonzero()[0])
            raise ValueError(f"{name} must be finite; {name}[{k}] contains NaN or inf")
        K = means.shape[0]
        self.event_shape = tuple(means.shape[1:])
        D = math.prod(self.event_shape)
        self.K, self.D = K, D
        self.means = means.reshape(K, D)
        self.weights = _check_weights(weights, K)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).flatten()
        if self.labels is not None and self.labels.numel() != K:
            raise ValueError(f"labels has {self.labels.numel()} entries but there are K={K} components")
        self.eigvecs = None  # (K, D, D) for full covariances
        try:
            covs = torch.as_tensor(covs, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"covs must be a number or a tensor of variances/covariances ({err})") from None
        if torch.isinf(covs).any():
            raise ValueError("covs must be finite; got an infinite variance (a component with infinite spread "
                             "has no density)")
        if covs.ndim == 0 or tuple(covs.shape) == (K,):
            lam = covs.reshape(-1, 1).expand(K, D)
            self.cov_type = "isotropic"
        elif tuple(covs.shape) in ((K, D), (K, *self.event_shape)):
            lam = covs.reshape(K, D)
            self.cov_type = "diagonal"
        elif tuple(covs.shape) == (K, D, D):
            asym = (covs - covs.transpose(1, 2)).abs().max().item()
            if asym > 1e-10 * max(1.0, covs.abs().max().item()):
                raise ValueError(f"covs must be symmetric; max |Sigma - Sigma^T| = {asym:.3g}")
            lam, self.eigvecs = torch.linalg.eigh(covs)
            self.cov_type = "full"
        else:
            raise ValueError(f"covs has shape {tuple(covs.shape)}; allowed: scalar, (K,)=({K},), "
                             f"(K, *event_shape)={(K, *self.event_shape)}, or (K, D, D)=({K}, {D}, {D})")
        bad = ((lam < 0) if _allow_zero_cov else (lam <= 0)).any(1) | torch.isnan(lam).any(1)
        if bad.any():
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"covs[{k}] is not positive definite (smallest eigenvalue "
                             f"{lam[k].min().item():.3g}); covariances must be positive definite")
        self.eigvals = lam.contiguous()

    # ---- construction helpers ---------------------------------------------------------------------
    def with_process(self, process: Process) -> "GaussianMixture":
        """A copy of this distribution whose ``t`` is measured by ``process``."""
        new = copy.copy(self)
        new.process = process
        return new

    def conditional(self, label: int) -> "GaussianMixture":
        """The mixture restricted to the components of one class."""
        if self.labels is None:
            raise ValueError("this mixture has no labels; pass labels=... to make it class-conditional")
        keep = self.labels == label
        if not keep.any():
            raise ValueError(f"label={label} is not a class of this mixture; allowed: {sorted(set(self.labels.tolist()))}")
        new = copy.copy(self)
        new.means, new.eigvals = self.means[keep], self.eigvals[keep]
        new.eigvecs = None if self.eigvecs is None else self.eigvecs[keep]
        new.weights = self.weights[keep] / self.weights[keep].sum()
        new.labels, new.K = self.labels[keep], int(keep.sum())
        return new

    # ---- data distribution --------------------------------------------------------------------------
    def mean(self) -> Tensor:
        return (self.weights @ self.means).reshape(self.event_shape)

    def sample(self, n: int, generator: torch.Generator | None = None, cond=None,
               dtype: torch.dtype = torch.float64, return_components: bool = False):
        """``n`` samples of x0 (seeded by ``generator``); ``cond`` restricts to one class."""
        check_int("n", n, lo=1)
        logw = self._log_weights(cond, n)
        k = torch.multinomial(torch.softmax(logw, -1), 1, replacement=True, generator=generator).squeeze(1)
        z = torch.randn(n, self.D, generator=generator, dtype=torch.float64)
        scaled = self.eigvals[k].sqrt() * z
        if self.eigvecs is not None:
            scaled = torch.einsum("bij,bj->bi", self.eigvecs[k], scaled)
        x = (self.means[k] + scaled).to(dtype).reshape(n, *self.event_shape)
        return (x, k) if return_components else x

    # ---- diffused marginal -------------------------------------------------------------------------
    def _batch_coefficients(self, t, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` of ``process.at(t)`` as ``(batch,)`` vectors in x's dtype; ``t=None`` is the data."""
        B = x.shape[0]
        if t is None:
            return torch.ones(B, dtype=x.dtype), torch.zeros(B, dtype=x.dtype)
        if self.process is None:
            raise ValueError("this mixture has no process: build it with process=... or use .with_process(p)")
        c = self.process.at(t, x)
        return c.alpha.reshape(-1).expand(B), c.sigma.reshape(-1).expand(B)

    def _log_weights(self, cond, B: int) -> Tensor:
        logw = torch.log(self.weights).expand(B, self.K).clone()
        if cond is None:
            return logw
        if self.labels is None:
            raise ValueError("cond was given but this mixture has no labels (pass labels=...)")
        cond = torch.as_tensor(cond, dtype=torch.long).expand(B)
        unknown = set(cond.tolist()) - set(self.labels.tolist())
        if unknown:
            raise ValueError(f"cond contains labels {sorted(unknown)}; allowed: {sorted(set(self.labels.tolist()))}")
        mask = self.labels[None, :] == cond[:, None]
        logw = logw.masked_fill(~mask, -math.inf)
        return logw - torch.logsumexp(logw, -1, keepdim=True)

    def _stats(self, x_t: Tensor, t, cond, need_post: bool):
        """Per-sample log p_t, responsibilities, score and (optionally) posterior mean, all exact."""
        if not isinstance(x_t, Tensor) or not x_t.is_floating_point() or x_t.ndim < 1:
            got = type(x_t).__name__ + (f" of dtype {x_t.dtype}, shape {tuple(x_t.shape)}"
                                        if isinstance(x_t, Tensor) else "")
            raise ValueError(f"x_t must be a floating tensor of shape (batch, *{self.event_shape}), got {got}")
        if x_t.shape[1:] != self.event_shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (batch, *{self.event_shape})")
        dtype = x_t.dtype if x_t.dtype == torch.float64 else torch.float32
        x = x_t.reshape(x_t.shape[0], self.D).to(dtype)
        a, s = self._batch_coefficients(t, x)                                        # (B,)
        mu, lam = self.means.to(dtype), self.eigvals.to(dtype)         # (K,D)
        if self.cov_type == "isotropic":
            return self._stats_isotropic(x, a, s, mu, lam[:, 0], cond, need_post)
        c = a[:, None, None] ** 2 * lam[None] + s[:, None, None] ** 2  # (B,K,D) marginal eigenvalues
        _check_positive(c)
        inv_c = 1.0 / c
        if self.eigvecs is None:  # diagonal covariances: elementwise in the standard basis
            diff = x[:, None, :] - a[:, None, None] * mu[None]
            log_norm = -0.5 * ((inv_c * diff ** 2).sum(-1) + torch.log(c).sum(-1) + self.D * math.log(2 * math.pi))
        else:                     # full covariances: work in each component's eigenbasis
            U = self.eigvecs.to(dtype)                                  # (K,D,D)
            z = torch.einsum("kdj,bkd->bkj", U, x[:, None, :] - a[:, None, None] * mu[None])
            log_norm = -0.5 * ((z * z * inv_c).sum(-1) + torch.log(c).sum(-1) + self.D * math.log(2 * math.pi))
        logw = self._log_weights(cond, x.shape[0]).to(dtype)
        joint = logw + log_norm
        log_p = torch.logsumexp(joint, -1)
        r = torch.softmax(joint, -1)                                     # (B,K)
        post = None
        if self.eigvecs is None:
            w = r[:, :, None] * inv_c
            score = -(w * diff).sum(1)
            if need_post:
                post = r @ mu + a[:, None] * (w * lam[None] * diff).sum(1)
        else:
            g = z * inv_c                                                # C^-1 diff in eigenbasis
            score = -torch.einsum("bk,kdj,bkj->bd", r, U, g)
            if need_post:
                post = r @ mu + a[:, None] * torch.einsum("bk,kdj,bkj->bd", r, U, g * lam[None])
        return log_p, r, score, post

    def _stats_isotropic(self, x, a, s, mu, lam, cond, need_post):
        """Isotropic components (and point sets): expand |x - a mu_k|^2 with matrix products, no (B,K,D) tensor."""
        c = a[:, None] ** 2 * lam[None] + s[:, None] ** 2               # (B,K)
        _check_positive(c)
        sq = ((x * x).sum(1, keepdim=True) - 2 * a[:, None] * (x @ mu.T)
              + a[:, None] ** 2 * (mu * mu).sum(1)[None]).clamp_min(0)  # |x - a mu_k|^2
        log_norm = -0.5 * (sq / c + self.D * torch.log(c) + self.D * math.log(2 * math.pi))
        joint = self._log_weights(cond, x.shape[0]).to(x.dtype) + log_norm
        log_p = torch.logsumexp(joint, -1)
        r = torch.softmax(joint, -1)
        w = r / c                                                        # responsibilities / variance
        score = -(x * w.sum(1, keepdim=True) - a[:, None] * (w @ mu))
        post = None
        if need_post:
            wl = w * lam[None]
            post = r @ mu + a[:, None] * (x * wl.sum(1, keepdim=True) - a[:, None] * (wl @ mu))
        return log_p, r, score, post

    def log_prob(self, x_t: Tensor, t=None, cond=None) -> Tensor:
        """Exact ``log p_t(x_t)`` (``t=None``: the data density)."""
        return self._stats(x_t, t, cond, False)[0]

    def responsibilities(self, x_t: Tensor, t=None, cond=None) -> Tensor:
        """``p(component k | x_t)``, shape (batch, K)."""
        return self._stats(x_t, t, cond, False)[1]

    def score(self, x_t: Tensor, t=None, cond=None) -> Tensor:
        """Exact ``grad_x log p_t(x)`` (handbook Eq. 15 with the posterior expectation)."""
        return self._stats(x_t, t, cond, False)[2].reshape(x_t.shape).to(x_t.dtype)

    def posterior_mean(self, x_t: Tensor, t, cond=None) -> Tensor:
        """Exact ``E[x0 | x_t]`` by Gaussian conditioning inside each component."""
        return self._stats(x_t, t, cond, True)[3].reshape(x_t.shape).to(x_t.dtype)

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        return self.score(x_t, t, cond)

    def denoise(self, x_t: Tensor, t, cond=None, *, coefs=None) -> tuple[Tensor, Tensor]:
        """Exact ``(E[x0 | x_t], (x_t - alpha E[x0 | x_t]) / sigma)``: one evaluation, defined where alpha(t) = 0
        (rectified flow at t = 1, TrigFlow at pi/2); needs sigma(t) > 0."""
        c = self.process.at(t, x_t) if coefs is None else coefs
        x0 = self.posterior_mean(x_t, t, cond)
        return x0, (x_t - c.alpha * x0) / c.sigma

    def predict(self, target: str, x_t: Tensor, t, cond=None) -> Tensor:
        check_prediction(target, "target")
        if target == "score":
            return self.score(x_t, t, cond)
        x0 = self.posterior_mean(x_t, t, cond)
        return x0 if target == "x0" else convert(x0, "x0", target, x_t, t, self.process)

    def __repr__(self):
        return (f"{type(self).__name__}(K={self.K}, event_shape={self.event_shape}, cov_type={self.cov_type!r}, "
                f"process={self.process})")


def _check_positive(c: Tensor) -> None:
    if (c <= 0).any():
        raise ValueError("the diffused covariance is singular at this t (sigma(t)=0 with a zero "
                         "covariance component); use t > t_min")


class EmpiricalDistribution(GaussianMixture):
    """Uniform mixture of Diracs at ``points`` (e.g. CIFAR images): the exact optimal denoiser of a data set.

    Its diffused score is that of ``(1/N) sum_i N(alpha x_i, sigma^2 I)``; ``E[x0 | x_t]`` is a
    softmax-weighted average of the points (handbook Eq. 7 with the empirical data law). Undefined at
    ``sigma(t) = 0``.

    Built for full data sets (all 50 000 CIFAR-10 training images): the points are kept as given (no
    float64 copy; a float32 set stays float32), and the softmax over points runs in chunks with a running
    log-sum-exp, so memory grows with ``batch x chunk`` rather than ``batch x N`` or ``N x D`` temporaries.
    Sums run in float64 for float64 queries (the points are converted one chunk at a time) and in float32
    otherwise, as for any mixture. ``chunk_size`` (default: about 4M batch-by-point entries per chunk)
    only trades memory for speed; the result does not depend on it beyond round-off.
    """

    _MAX_ENTRIES = 1 << 22           # batch x chunk entries per temporary (32 MiB in float64)
    _MAX_CONVERTED = 1 << 23         # chunk x D entries converted to the query dtype at a time (64 MiB)

    def __init__(self, points: Tensor, process: Process | None = None, labels: Tensor | None = None,
                 chunk_size: int | None = None):
        nn.Module.__init__(self)
        points = torch.as_tensor(points)
        if not points.is_floating_point():
            points = points.to(torch.float64)
        if points.ndim < 2:
            raise ValueError(f"points must have shape (K, *event_shape) (one row per point), got shape "
                             f"{tuple(points.shape)}")
        if points.shape[0] == 0:
            raise ValueError(f"points has no components (shape {tuple(points.shape)}); need K >= 1 points")
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, lo=1)  # or None
        self.prediction, self.process, self.chunk_size = "score", process, chunk_size
        K = points.shape[0]
        self.event_shape = tuple(points.shape[1:])
        self.K, self.D = K, math.prod(self.event_shape)
        self.means = points.reshape(K, self.D)                         # a view: the data is not copied
        # |x_i|^2 in float64, block by block into one preallocated vector (no float64 copy of a block: holding
        # many short-lived blocks fragmented the heap and kept ~1 GiB resident for 50 000 CIFAR images)
        rows = max(1, (1 << 20) // self.D)
        self._sq_norms = torch.empty(K, dtype=torch.float64, device=points.device)
        for i in range(0, K, rows):
            block = self.means[i:i + rows]
            if not torch.isfinite(block).all():
                bad = i + int((~torch.isfinite(block)).any(1).nonzero()[0])
                raise ValueError(f"points must be finite; points[{bad}] contains NaN or inf")
            self._sq_norms[i:i + rows] = torch.linalg.vector_norm(block, dim=1, dtype=torch.float64) ** 2
        self.weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).flatten()
        if self.labels is not None and self.labels.numel() != K:
            raise ValueError(f"labels has {self.labels.numel()} entries but there are K={K} points")
        self.eigvecs, self.cov_type = None, "isotropic"
        self.eigvals = torch.zeros(1, 1, dtype=torch.float64).expand(K, self.D)   # Dirac components, no memory

    def conditional(self, label: int) -> "EmpiricalDistribution":
        """The empirical distribution of the points of one class."""
        new = super().conditional(label)
        keep = self.labels == label
        new._sq_norms = self._sq_norms[keep]
        new.eigvals = self.eigvals[:1].expand(new.K, self.D)
        return new

    def mean(self) -> Tensor:
        rows = max(1, self._MAX_CONVERTED // self.D)
        total = sum(self.means[i:i + rows].to(torch.float64).sum(0) for i in range(0, self.K, rows))
        return (total / self.K).reshape(self.event_shape)

    def _chunk(self, batch: int, dtype: torch.dtype) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        n = max(1, self._MAX_ENTRIES // max(batch, 1))
        if self.means.dtype != dtype:
            n = min(n, max(1, self._MAX_CONVERTED // self.D))
        return n

    def _stats(self, x_t: Tensor, t, cond, need_post: bool):
        """Exact log p_t, score and posterior mean by a running log-sum-exp over chunks of points.

        Responsibilities (a batch x N matrix) are not formed here: ``responsibilities`` asks for them.
        """
        if x_t.shape[1:] != self.event_shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)}; expected (batch, *{self.event_shape})")
        dtype = x_t.dtype if x_t.dtype == torch.float64 else torch.float32
        B = x_t.shape[0]
        x = x_t.reshape(B, self.D).to(dtype)
        a, s = self._batch_coefficients(t, x)                                          # (B,)
        c = s * s
        _check_positive(c)
        logw = None if cond is None else self._log_weights(cond, B).to(dtype)
        log_uniform = -math.log(self.K)
        # logit_i = log w_i - |x - a x_i|^2 / (2c) + |x|^2 / (2c): the dropped |x|^2/(2c) is the same for every
        # point (it cancels in the softmax and is added back to log p), so no cancellation-prone |x - a x_i|^2
        gain = (a / c)[:, None]                                          # (B, 1)
        half_a2_c = (0.5 * a * a / c)[:, None]
        xs = x * gain
        m = torch.full((B,), -math.inf, dtype=dtype)                     # running max of the logits
        total = torch.zeros(B, dtype=dtype)                              # running sum of exp(logit - m)
        moment = torch.zeros(B, self.D, dtype=dtype)                     # running sum of exp(logit - m) x_i
        step = self._chunk(B, dtype)
        for i in range(0, self.K, step):
            mu = self.means[i:i + step].to(dtype)
            bias = half_a2_c * self._sq_norms[i:i + step].to(dtype)[None]
            logit = torch.addmm(bias.neg_().add_(log_uniform if logw is None else logw[:, i:i + step]), xs, mu.T)
            m_new = torch.maximum(m, logit.max(1).values)
            finite = torch.isfinite(m_new)
            shift = torch.where(finite, m_new, torch.zeros_like(m_new))
            scale = torch.where(finite, torch.exp(m - shift), torch.ones_like(m))
            p = logit.sub_(shift[:, None]).exp_()
            total = total * scale + p.sum(1)
            moment = torch.addmm(moment * scale[:, None], p, mu)
            m = m_new
        post = moment / total[:, None]
        log_p = (m + torch.log(total) - 0.5 * (x * x).sum(1) / c
                 - 0.5 * self.D * (torch.log(c) + math.log(2 * math.pi)))
        score = -(x - a[:, None] * post) / c[:, None]
        return log_p, None, score, (post if need_post else None)

    def responsibilities(self, x_t: Tensor, t=None, cond=None) -> Tensor:
        """``p(point i | x_t)``, shape (batch, N): the softmax of ``-|x_t - alpha x_i|^2 / (2 sigma^2)``."""
        dtype = x_t.dtype if x_t.dtype == torch.float64 else torch.float32
        x = x_t.reshape(x_t.shape[0], self.D).to(dtype)
        a, s = self._batch_coefficients(t, x)
        _check_positive(s * s)
        step = self._chunk(x.shape[0], dtype)
        logits = torch.cat([
            -0.5 * ((x * x).sum(1, keepdim=True) - 2 * a[:, None] * (x @ self.means[i:i + step].to(dtype).T)
                    + (a * a)[:, None] * self._sq_norms[i:i + step].to(dtype)[None]).clamp_min(0) / (s * s)[:, None]
            for i in range(0, self.K, step)], dim=1)
        if cond is not None:
            logits = logits + self._log_weights(cond, x.shape[0]).to(dtype)
        return torch.softmax(logits, -1)


def _check_weights(weights, K: int) -> Tensor:
    if weights is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != K:
        raise ValueError(f"weights has {w.numel()} entries but there are K={K} components")
    if (w < 0).any() or torch.isnan(w).any():
        raise ValueError(f"weights must be non-negative, got {w.tolist()[:8]}")
    if abs(w.sum().item() - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to one, got sum(weights)={w.sum().item():.6g}")
    return w


def eight_gaussians_mixture(process: Process | None = None) -> GaussianMixture:
    """The ``eight_gaussians`` toy data set as an exact mixture (same means and std)."""
    return GaussianMixture(eight_gaussians_means(), EIGHT_GAUSSIANS_STD ** 2, process=process)


def grid25_mixture(process: Process | None = None) -> GaussianMixture:
    """The ``grid25`` toy data set ({-2,...,2}^2) as an exact mixture."""
    return GaussianMixture(grid25_means(), GRID25_STD ** 2, process=process)
