"""One-step generators ``x0 = g_theta(z)`` for score distillation (SIM Sec. 3, App. B.2; Luo talk Diff-Instruct).

Every generator is an ``nn.Module`` with

* ``noise(n, generator)``: the latent ``z ~ p_z`` (seeded by a ``torch.Generator``);
* ``forward(z)``: ``x0 = g_theta(z)``, differentiable in the generator's parameters;
* ``sample(n, generator, return_noise=False)``: ``forward(noise(n, generator))``, shape ``(n, *event_shape)``.

Neural generators: :class:`MLPGenerator` (2D points) and :class:`TeacherInitGenerator`, SIM's construction
``g(z) = d(z, t*)`` from a copy of the teacher's denoiser at the fixed noise level ``sigma(t*) = 2.5``
(SIM Eq. B.4 / B.15, as in SiD).

Exact generators (for the theorem checks): the output distribution ``p_theta,0`` and its diffused marginal
``p_theta,t`` under any process are known in closed form, so the *intractable* quantities of the seeds
(``s_{p_theta,t}`` and its derivative in theta, SIM Eq. 3.5; the exact integral KL, Luo talk Eq. 3.1;
the exact generator velocity, FGM Eq. 4.1) are computable by autograd:

* :class:`AffineGaussianGenerator`: ``x0 = mu + A z`` (full ``A`` in low dimension, diagonal for images),
  ``p_theta,t = N(alpha mu, alpha^2 A A^T + sigma^2 I)``;
* :class:`MixtureGenerator`: a Gaussian mixture with fixed weights and learnable means and log-scales,
  ``x0 = mu_k + exp(log_scale_k) * z``; its diffused score reuses ``toy_data.mixtures.GaussianMixture``
  (built from the live parameters, so it is differentiable in them);
* :class:`DiracGenerator`: a single learnable point (DreamFusion / SDS, Luo talk Corollary 3.4),
  ``p_theta,t = N(alpha g, sigma^2 I)``.

``exact.score_predictor(process)`` returns a :class:`~dstar_edu.predictors.Predictor` (``prediction =
"score"``) whose output depends on the generator's *current* parameters (gradients flow into them);
``score_predictor(process, frozen=True)`` returns a snapshot of ``p_sg[theta],t`` with no parameter
dependence: the exact "fake score" of SIM Eq. 3.7 / Diff-Instruct Thm 3.3.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from .conversions import check_prediction, convert
from .predictors import Predictor
from .process import Process, expand_like
from .validation import check_choice, check_finite, check_int, check_positive, check_type

Tensor = torch.Tensor

__all__ = ["Generator", "MLPGenerator", "TeacherInitGenerator", "ExactGenerator", "AffineGaussianGenerator",
           "MixtureGenerator", "DiracGenerator", "ExactScorePredictor"]


def _event_shape(dim_or_shape) -> tuple[int, ...]:
    if isinstance(dim_or_shape, bool):
        raise ValueError(f"event shape {dim_or_shape!r} must be a positive int or a tuple of positive ints")
    if isinstance(dim_or_shape, int):
        shape = (dim_or_shape,)
    else:
        try:
            shape = tuple(int(s) for s in dim_or_shape)
        except TypeError:
            raise ValueError(f"event shape {dim_or_shape!r} must be a positive int or a tuple of positive ints") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"event shape {dim_or_shape!r} must be a positive int or a tuple of positive ints")
    return shape


def _check_n(n) -> int:
    n = check_int("n", n, lo=1)
    return n


class Generator(nn.Module):
    """Base class: ``noise(n, generator) -> z``, ``forward(z) -> x0``, ``sample(n, generator) -> x0``."""

    event_shape: tuple[int, ...] = ()
    latent_shape: tuple[int, ...] = ()

    def _param_like(self) -> Tensor:
        for p in self.parameters():
            return p
        return torch.zeros((), dtype=torch.float32)

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``z ~ N(0, I)`` of shape ``(n, *latent_shape)`` in the generator's dtype/device."""
        ref = self._param_like()
        check_type("generator", generator, (torch.Generator, None), "a torch.Generator or None")
        return torch.randn((_check_n(n), *self.latent_shape), generator=generator, dtype=ref.dtype, device=ref.device)

    def sample(self, n: int, generator: torch.Generator | None = None, return_noise: bool = False):
        """``n`` generator samples ``x0 = g_theta(z)`` with gradient to the parameters (and ``z`` if asked)."""
        z = self.noise(n, generator)
        x0 = self(z)
        return (x0, z) if return_noise else x0

    def _check_z(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or tuple(z.shape[1:]) != tuple(self.latent_shape) or z.ndim < 1:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z has shape {shape}; {type(self).__name__} expects (batch, *{tuple(self.latent_shape)})")
        return z


class MLPGenerator(Generator):
    """A small MLP ``z -> x0`` for 2D (or any low-dimensional) points: the student of the 2D experiments.

    ``z ~ N(0, I_latent_dim)``; SiLU residual blocks like :class:`~dstar_edu.predictors.MLPPredictor`.
    ``init_scale`` multiplies the output layer at initialisation (the untrained generator's spread).
    """

    def __init__(self, dim: int = 2, latent_dim: int | None = None, hidden: int = 128, depth: int = 3,
                 init_scale: float = 1.0):
        super().__init__()
        latent_dim = dim if latent_dim is None else latent_dim
        for name, v in (("dim", dim), ("latent_dim", latent_dim), ("hidden", hidden), ("depth", depth)):
            check_int(name, v, lo=1)
        check_finite("init_scale", init_scale)
        self.dim, self.latent_dim = dim, latent_dim
        self.event_shape, self.latent_shape = (dim,), (latent_dim,)
        self.inp = nn.Linear(latent_dim, hidden)
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))
        with torch.no_grad():
            self.out[1].weight.mul_(init_scale)
            self.out[1].bias.mul_(init_scale)

    def forward(self, z: Tensor) -> Tensor:
        h = self.inp(self._check_z(z))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class TeacherInitGenerator(Generator):
    """SIM's one-step generator ``x0 = g_theta(z) = d_theta(z, t*)``, ``z ~ N(0, (sigma*)^2 I)`` (SIM Eq. B.4, B.15).

    ``d_theta`` is a *copy* of the teacher's denoiser (its x0-prediction) evaluated at the fixed time ``t*``
    whose EDM noise level ``sigma(t*)/alpha(t*)`` is ``sigma*`` (2.5 for SiD / SIM, Table 5). The copy is
    initialised with the teacher's weights and trained; the teacher is untouched.

    ``z`` is drawn in EDM units, ``z ~ N(0, sigma*^2 I)`` (``latent = sigma* eps``). A process with
    ``alpha(t*) != 1`` (VP, DDPM, rectified flow) expects ``x_t* = alpha(t*) (x0 + sigma* eps)``, so the
    network input is ``alpha(t*) z`` (for EDM/VE, ``alpha = 1`` and the input is ``z``, Eq. B.4).

    Args:
        predictor: the teacher (any :class:`~dstar_edu.predictors.Predictor`, e.g. ``MLPPredictor`` or a
            diffusers UNet wrapper); it is deep-copied.
        t_star: the time of ``predictor.process``; ``None`` solves ``edm_sigma(t*) = sigma_star``
            (rounded to an integer step for a discrete DDPM process, as a UNet is trained on integers).
        sigma_star: EDM noise level used when ``t_star`` is None.
        event_shape: the sample shape; inferred from ``predictor.dim`` (MLP), ``predictor.event_shape`` or a
            wrapped diffusers network's config (``in_channels``, ``sample_size``).
        input_std: standard deviation of the network's input noise, independent of ``t*`` (default
            ``alpha(t*) sigma*``, SIM's choice above). DMD2's one-step SDXL feeds unit-variance noise at
            diffusers step 399 (``input_std=1``), where SIM's rule would give ``sqrt(1 - alpha_bar) = 0.758``.

    ``forward(z, cond=None)`` hands ``cond`` (e.g. a text embedding dict) to the copied denoiser: the
    text-to-image one-step model ``g_theta(z, c)`` (DI* Alg. 1).
    """

    def __init__(self, predictor: Predictor, t_star: float | None = None, *, sigma_star: float = 2.5,
                 event_shape: Sequence[int] | int | None = None, input_std: float | None = None):
        super().__init__()
        check_type("predictor", predictor, Predictor, "a dstar_edu Predictor")
        process = predictor.process
        if t_star is None:
            check_positive("sigma_star", sigma_star, finite=False)  # an EDM noise level
            from .objectives.pretrain import t_from_edm_sigma
            t = float(t_from_edm_sigma(process, sigma_star))
            if process.discrete:
                t = float(round(t))
        else:
            t = float(t_star)
        process.check_t(t)
        sig = process.edm_sigma(t).item()
        if not sig > 0 or not math.isfinite(sig):
            raise ValueError(f"t_star={t:g} gives EDM noise level {sig:g}; it must be positive and finite")
        self.t_star, self.sigma_star = t, sig
        self.alpha_star = float(process.alpha(t))
        if input_std is None:
            self.input_gain = self.alpha_star                      # alpha(t*) z: x_t* of Eq. B.4
        else:
            check_positive("input_std", input_std)  # a standard deviation (or None)
            self.input_gain = float(input_std) / sig              # (input_std / sigma*) z ~ N(0, input_std^2)
        if event_shape is None:
            if hasattr(predictor, "dim") and isinstance(predictor.dim, int):
                event_shape = (predictor.dim,)
            elif hasattr(predictor, "event_shape"):
                event_shape = tuple(predictor.event_shape)
            elif getattr(getattr(predictor, "unet", None), "config", None) is not None and \
                    hasattr(predictor.unet.config, "sample_size") and hasattr(predictor.unet.config, "in_channels"):
                cfg = predictor.unet.config
                size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
                event_shape = (cfg.in_channels, *size)
            else:
                raise ValueError(f"event_shape is needed: it cannot be inferred from {type(predictor).__name__}")
        self.event_shape = self.latent_shape = _event_shape(event_shape)
        self.denoiser = copy.deepcopy(predictor)
        self.denoiser.requires_grad_(True)
        self.denoiser.train()

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``z ~ N(0, sigma*^2 I)`` (SIM Eq. B.4)."""
        return self.sigma_star * super().noise(n, generator)

    def forward(self, z: Tensor, cond=None) -> Tensor:
        z = self._check_z(z)
        t = torch.full((z.shape[0],), self.t_star, dtype=z.dtype, device=z.device)
        return self.denoiser.predict("x0", self.input_gain * z, t, cond)

    def sample(self, n: int, generator: torch.Generator | None = None, return_noise: bool = False, cond=None):
        """``n`` one-step samples ``g_theta(z, cond)`` (``cond`` for conditional denoisers)."""
        z = self.noise(n, generator)
        x0 = self(z, cond)
        return (x0, z) if return_noise else x0


# ---- exact generators -------------------------------------------------------------------------------------
class ExactScorePredictor(Predictor):
    """The exact diffused score of an exact generator's ``p_theta,t`` as a predictor (``prediction="score"``).

    ``frozen=False``: evaluates the generator's live parameters (differentiable in theta).
    ``frozen=True``: a detached snapshot of the parameters at construction (``p_sg[theta],t``).
    """

    def __init__(self, gen: "ExactGenerator", process: Process, frozen: bool):
        super().__init__(process, "score")
        self.frozen = frozen
        # keep the generator out of this module's parameters (and state) in both modes
        object.__setattr__(self, "_gen", copy.deepcopy(gen).requires_grad_(False) if frozen else gen)

    @property
    def generator_model(self) -> "ExactGenerator":
        return self._gen

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        return self._gen.score(x_t, t, self.process)

    def log_prob(self, x_t: Tensor, t) -> Tensor:
        return self._gen.log_prob(x_t, t, self.process)

    def predict(self, target: str, x_t: Tensor, t, cond=None) -> Tensor:
        check_prediction(target)
        return convert(self(x_t, t, cond), "score", target, x_t, t, self.process)


class ExactGenerator(Generator):
    """A generator whose diffused density ``p_theta,t`` is known in closed form (differentiable in theta)."""

    def _batch_coefficients(self, t, x: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` of ``process.at(t)`` as ``(batch,)`` vectors in x's dtype."""
        check_type("process", process, Process, "a dstar_edu Process")
        c, B = process.at(t, x), x.shape[0]
        return c.alpha.reshape(-1).expand(B), c.sigma.reshape(-1).expand(B)

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.event_shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x_t has shape {shape}; expected (batch, *{self.event_shape})")
        return x

    def score(self, x_t: Tensor, t, process: Process) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define score")

    def log_prob(self, x_t: Tensor, t, process: Process) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define log_prob")

    def score_predictor(self, process: Process, frozen: bool = False) -> ExactScorePredictor:
        """The exact score of ``p_theta,t`` as a predictor; ``frozen=True`` snapshots ``p_sg[theta],t``."""
        return ExactScorePredictor(self, process, frozen)


class AffineGaussianGenerator(ExactGenerator):
    """``x0 = mu + A z``, ``z ~ N(0, I)``: ``p_theta,t = N(alpha mu, alpha^2 A A^T + sigma^2 I)`` (exact).

    Args:
        dim_or_shape: ``D`` or an event shape such as ``(3, 32, 32)``.
        structure: ``"full"`` (``A`` is ``D x D``; default when ``D <= 64``) or ``"diagonal"`` (``A`` is a
            vector of per-coordinate scales, the default for larger ``D``: ``D x D`` at 3072 would be 9.4M).
        mean, A: initial values (default ``mu = 0``, ``A = I``).
        dtype: parameter dtype (float64 by default: the checks are in float64).

    A learnable *scale* (not only a location) matters for the checks: with ``x0 = mu + z`` the
    reparameterisation derivative ``dx_t/dtheta`` is constant and some wrong gradient-flow choices of the
    SIM loss happen to have the right expectation.
    """

    def __init__(self, dim_or_shape, *, structure: str | None = None, mean: Tensor | None = None,
                 A: Tensor | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.event_shape = self.latent_shape = _event_shape(dim_or_shape)
        D = math.prod(self.event_shape)
        self.D = D
        if structure is None:
            structure = "full" if D <= 64 else "diagonal"
        check_choice("structure", structure, ("full", "diagonal"))
        self.structure = structure
        mu = torch.zeros(D, dtype=dtype) if mean is None else torch.as_tensor(mean, dtype=dtype).reshape(-1)
        if mu.numel() != D:
            raise ValueError(f"mean has {mu.numel()} entries; expected D={D}")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError(f"mean must be finite, got {mu.tolist()[:8]}")
        if structure == "full":
            a = torch.eye(D, dtype=dtype) if A is None else torch.as_tensor(A, dtype=dtype)
            if tuple(a.shape) != (D, D):
                raise ValueError(f"A has shape {tuple(a.shape)}; structure='full' needs ({D}, {D})")
        else:
            a = torch.ones(D, dtype=dtype) if A is None else torch.as_tensor(A, dtype=dtype).reshape(-1)
            if a.numel() != D:
                raise ValueError(f"A has {a.numel()} entries; structure='diagonal' needs D={D} scales")
        self.mu = nn.Parameter(mu.clone())
        self.A = nn.Parameter(a.clone())

    def forward(self, z: Tensor) -> Tensor:
        z = self._check_z(z).reshape(z.shape[0], self.D)
        x = self.mu + (z @ self.A.T if self.structure == "full" else z * self.A)
        return x.reshape(z.shape[0], *self.event_shape)

    def covariance(self) -> Tensor:
        """``A A^T`` (``D x D``) for ``full``, or the vector of variances ``A^2`` for ``diagonal``."""
        return self.A @ self.A.T if self.structure == "full" else self.A * self.A

    def marginal(self, t, process: Process, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean ``alpha mu`` (shape ``(B, D)``) and covariance of ``p_theta,t``: ``(B, D, D)`` or ``(B, D)``."""
        if x is None:
            tt = torch.as_tensor(t)
            x = torch.zeros(tt.shape[0] if tt.ndim == 1 else 1, *self.event_shape, dtype=self.mu.dtype)
        a, s = self._batch_coefficients(t, x, process)
        mean = a[:, None] * self.mu
        if self.structure == "full":
            eye = torch.eye(self.D, dtype=self.mu.dtype, device=self.mu.device)
            cov = a[:, None, None] ** 2 * self.covariance() + s[:, None, None] ** 2 * eye
        else:
            cov = a[:, None] ** 2 * self.covariance() + s[:, None] ** 2
        return mean, cov

    def _diff(self, x_t, t, process):
        x = self._check_x(x_t).reshape(x_t.shape[0], self.D)
        mean, cov = self.marginal(t, process, x_t)
        return x - mean, cov

    def score(self, x_t: Tensor, t, process: Process) -> Tensor:
        """``-(alpha^2 A A^T + sigma^2 I)^{-1} (x_t - alpha mu)``."""
        diff, cov = self._diff(x_t, t, process)
        if self.structure == "full":
            out = -torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)
        else:
            out = -diff / cov
        return out.reshape(x_t.shape)

    def log_prob(self, x_t: Tensor, t, process: Process) -> Tensor:
        diff, cov = self._diff(x_t, t, process)
        if self.structure == "full":
            L = torch.linalg.cholesky(cov)
            sol = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
            maha = (sol * sol).sum(-1)
            logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        else:
            maha = (diff * diff / cov).sum(-1)
            logdet = torch.log(cov).sum(-1)
        return -0.5 * (maha + logdet + self.D * math.log(2 * math.pi))


class MixtureGenerator(ExactGenerator):
    """Fixed-weight Gaussian mixture with learnable means and log-scales, in any event shape.

    ``x0 = mu_k + exp(log_scale_k) * z`` with ``k ~ Categorical(weights)`` (fixed) and ``z ~ N(0, I)``.
    ``scale="isotropic"``: one log-scale per component, shape ``(K,)``; ``"diagonal"``: per coordinate,
    ``(K, *event_shape)``. The diffused score ``p_theta,t = sum_k w_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2)``
    is computed by :class:`toy_data.mixtures.GaussianMixture` built from the live parameters, so it is
    exact and differentiable in the means and scales.

    ``noise`` draws the component index and ``z`` together: the latent is ``(n, 1 + D)`` with the index in
    column 0 (stored as a float), so ``forward(noise)`` is deterministic in ``theta``.
    """

    def __init__(self, K: int, event_shape, *, weights: Tensor | None = None, means: Tensor | None = None,
                 log_scales: Tensor | None = None, scale: str = "isotropic", dtype: torch.dtype = torch.float64,
                 init_generator: torch.Generator | None = None):
        super().__init__()
        check_int("K", K, lo=1)  # components
        self.K = K
        self.event_shape = _event_shape(event_shape)
        D = math.prod(self.event_shape)
        self.D = D
        self.latent_shape = (1 + D,)
        check_choice("scale", scale, ("isotropic", "diagonal"))
        self.scale = scale
        if weights is None:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if w.numel() != K or (w < 0).any() or abs(w.sum().item() - 1) > 1e-6:
                raise ValueError(f"weights={w.tolist()[:8]} must be K={K} non-negative numbers summing to one")
        self.register_buffer("weights", w)
        if means is None:
            m = torch.randn(K, D, generator=init_generator, dtype=dtype)
        else:
            m = torch.as_tensor(means, dtype=dtype).reshape(K, -1)
            if m.shape[1] != D:
                raise ValueError(f"means has shape {tuple(torch.as_tensor(means).shape)}; expected (K, *event_shape)="
                                 f"{(K, *self.event_shape)}")
        ls_shape = (K,) if scale == "isotropic" else (K, D)
        ls = torch.zeros(ls_shape, dtype=dtype) if log_scales is None else torch.as_tensor(log_scales, dtype=dtype)
        if ls.numel() != math.prod(ls_shape):
            raise ValueError(f"log_scales has {ls.numel()} entries; scale={scale!r} needs shape {ls_shape}")
        self.means = nn.Parameter(m.clone())
        self.log_scales = nn.Parameter(ls.reshape(ls_shape).clone())

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        n = _check_n(n)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return torch.cat([k.to(z.dtype)[:, None], z], 1)

    def forward(self, z: Tensor) -> Tensor:
        z = self._check_z(z)
        k = z[:, 0].round().long()
        if (k < 0).any() or (k >= self.K).any():
            raise ValueError(f"the component column z[:, 0] must hold indices in 0..{self.K - 1}")
        scale = torch.exp(self.log_scales)[k]
        scale = scale[:, None] if self.scale == "isotropic" else scale
        x = self.means[k] + scale * z[:, 1:]
        return x.reshape(z.shape[0], *self.event_shape)

    def mixture(self, process: Process | None = None):
        """The ``GaussianMixture`` of the current parameters (differentiable in them)."""
        from toy_data.mixtures import GaussianMixture
        var = torch.exp(2 * self.log_scales)
        covs = var if self.scale == "isotropic" else var.reshape(self.K, *self.event_shape)
        return GaussianMixture(self.means.reshape(self.K, *self.event_shape), covs, self.weights, process=process)

    def score(self, x_t: Tensor, t, process: Process) -> Tensor:
        return self.mixture(process).score(self._check_x(x_t), t)

    def log_prob(self, x_t: Tensor, t, process: Process) -> Tensor:
        return self.mixture(process).log_prob(self._check_x(x_t), t)


class DiracGenerator(ExactGenerator):
    """A single learnable point ``x0 = g`` (``p_theta,0 = delta_g``): DreamFusion's SDS setting (Luo talk Cor. 3.4).

    ``p_theta,t = N(alpha g, sigma^2 I)``: its score at ``x_t = alpha g + sigma eps`` is the conditional score
    ``-eps / sigma``. The latent is empty (``latent_shape = (0,)``); ``sample(n)`` repeats ``g``.
    """

    def __init__(self, event_shape, point: Tensor | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.event_shape = _event_shape(event_shape)
        self.latent_shape = (0,)
        p = torch.zeros(self.event_shape, dtype=dtype) if point is None else torch.as_tensor(point, dtype=dtype)
        if tuple(p.shape) != self.event_shape:
            raise ValueError(f"point has shape {tuple(p.shape)}; expected {self.event_shape}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError("point must be finite (it contains NaN or inf)")
        self.point = nn.Parameter(p.clone())

    def forward(self, z: Tensor) -> Tensor:
        z = self._check_z(z)
        return self.point.expand(z.shape[0], *self.event_shape)

    def score(self, x_t: Tensor, t, process: Process) -> Tensor:
        x = self._check_x(x_t)
        a, s = self._batch_coefficients(t, x, process)
        if (s <= 0).any():
            raise ValueError("the diffused Dirac has no density at sigma(t) = 0; use t with sigma(t) > 0")
        return -(x - expand_like(a, x) * self.point) / expand_like(s, x) ** 2

    def log_prob(self, x_t: Tensor, t, process: Process) -> Tensor:
        x = self._check_x(x_t)
        a, s = self._batch_coefficients(t, x, process)
        diff = (x - expand_like(a, x) * self.point).reshape(x.shape[0], -1)
        D = diff.shape[1]
        return -0.5 * ((diff * diff).sum(1) / s ** 2 + 2 * D * torch.log(s) + D * math.log(2 * math.pi))
