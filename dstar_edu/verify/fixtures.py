"""Fixtures of the checks: exact data distributions and exact models with closed-form scores, posteriors and laws.

Each returns the object and a label naming the data (the result's ``data`` detail). At ``dim=2`` the data are small
Gaussian mixtures or Gaussians; at ``dim=3072`` the empirical distribution of (or a Gaussian fitted to) real CIFAR-10
test images from the sample packaged with ``toy_data``. Every random draw comes from ``check_generator``, so a run
with another seed re-draws them (``dstar_edu/verify/registry.py``).
"""
from __future__ import annotations

import functools

import torch

from dstar_edu.conversions import from_x0_eps
from dstar_edu.predictors import Predictor
from dstar_edu.process import DDPM, Process
from dstar_edu.verify.registry import DIMS, check_generator as _gen, check_seed, mutate

__all__ = ["exact_data", "noisy_batch", "autograd_score", "exact_data_once", "exact_state", "counterfactual_model",
           "posterior_by_conditioning", "ExactGaussian", "image_stats", "gaussian_data", "cifar_images",
           "eight_gaussians_or_images", "gaussian_or_image_gaussian"]

F64 = torch.float64
Tensor = torch.Tensor


# ---- exact data at both dimensions: a 2D mixture / 32 CIFAR images (``basics``, samplers, guards) ----------
def exact_data(dim: int, process: Process):
    """The exact data distribution for a check at ``dim`` (2 or 3072) and a label saying what it is."""
    from toy_data.cifar import image_dataset_for_checks
    from toy_data.mixtures import EmpiricalDistribution, GaussianMixture
    if dim == 2:
        means = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64)
        A = torch.tensor([[[0.30, 0.10], [0.10, 0.05]], [[0.05, -0.02], [0.0, 0.20]], [[0.2, 0.0], [0.1, 0.1]]],
                         dtype=F64)
        covs = A @ A.transpose(1, 2) + 0.01 * torch.eye(2, dtype=F64)
        return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2], dtype=F64), process=process), \
            "3-component full-covariance 2D mixture"
    if dim == 3072:
        images, source = image_dataset_for_checks(32, generator=_gen(0), dtype=F64)
        return EmpiricalDistribution(images, process=process), f"empirical distribution of 32 images ({source})"
    raise ValueError(f"dim={dim} is not supported by the basics checks; allowed: {DIMS}")


def noisy_batch(dist, process: Process, ts, seed: int):
    """x0 ~ data, eps ~ N(0, I), x_t at the given times (one sample per time)."""
    t = torch.as_tensor(ts, dtype=F64)
    x0 = dist.sample(len(t), generator=_gen(seed))
    x_t, eps = process.q_sample(x0, t, generator=_gen(seed + 1))
    return x0, eps, x_t, t


def autograd_score(dist, x_t, t):
    x = x_t.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dist.log_prob(x, t).sum(), x)
    return g


_DATA: dict = {}


def exact_data_once(dim: int, process: Process):
    """``exact_data`` (2D mixture / 32 CIFAR images), loaded once per dim and re-timed by ``process``."""
    if dim not in _DATA:
        _DATA[dim] = exact_data(dim, DDPM(1000))
    dist, what = _DATA[dim]
    return dist.with_process(process), what


def exact_state(dim: int, process: Process, t, n: int, seed: int):
    """Exact model, x_t ~ p_t (n samples at scalar t), its x0_hat and eps_hat (= -sigma score)."""
    dist, what = exact_data_once(dim, process)
    x0 = dist.sample(n, generator=_gen(seed))
    tt = torch.as_tensor(t, dtype=F64)
    x_t, _ = process.q_sample(x0, tt, generator=_gen(seed + 1))
    a, s = process.coefficients(tt, x_t)
    return dist, what, x_t, dist.posterior_mean(x_t, tt), -s * dist.score(x_t, tt)


def counterfactual_model(dist, factor: float = 0.5):
    """The exact model in a normal run; in a counterfactual run the same model with its noise prediction
    scaled by ``factor`` (a missing factor in eps_hat, i.e. in the score), as an eps-predictor."""
    from dstar_edu.predictors import FunctionPredictor
    return mutate(dist, FunctionPredictor(lambda x, t, cond=None: factor * dist.predict("eps", x, t),
                                          dist.process, "eps"))


def posterior_by_conditioning(ab_s, ab_t, x_t: Tensor, x0: Tensor):
    """``q(x_s | x_t, x0)`` for s < t by conditioning the joint Gaussian of the forward process.

    Given x0: ``x_s = sqrt(ab_s) x0 + sqrt(1-ab_s) e1`` and ``x_t = sqrt(ab_t/ab_s) x_s + sqrt(1-ab_t/ab_s) e2``,
    so ``Cov(x_s, x_t) = sqrt(ab_t/ab_s)(1-ab_s)``, ``Var(x_t) = 1-ab_t`` and the regression gives
    ``mean = sqrt(ab_s) x0 + Cov/Var (x_t - sqrt(ab_t) x0)``, ``var = (1-ab_s) - Cov^2/Var``.
    (A different route from Eq. 8's product of Gaussians.)
    """
    cov = torch.sqrt(ab_t / ab_s) * (1 - ab_s)
    mean = torch.sqrt(ab_s) * x0 + cov / (1 - ab_t) * (x_t - torch.sqrt(ab_t) * x0)
    var = (1 - ab_s) - cov * cov / (1 - ab_t)
    return mean, torch.clamp(var, min=0)

# ---- Gaussian data with a closed-form denoiser and exact laws (sampler law and rate checks) -------------
class ExactGaussian(Predictor):
    """Closed-form denoiser of Gaussian data ``N(mean, diag(var))`` under any process (float64).

    ``E[x0 | x_t] = mean + a var / (a^2 var + s^2) (x_t - a mean)`` and ``E[eps | x_t] = s / (a^2 var + s^2)
    (x_t - a mean)``: both finite at ``sigma = 0``, so the velocity is defined at ``t = 0`` too. ``predict``
    converts from this exact pair (no round trip through the declared prediction).
    """

    def __init__(self, mean: Tensor, var: Tensor, process: Process, prediction: str = "x0"):
        super().__init__(process, prediction)
        self.mean, self.var = mean.to(F64), var.to(F64)

    def pair(self, x_t: Tensor, t) -> tuple[Tensor, Tensor]:
        a, s = self.process.coefficients(t, x_t)
        d = x_t - a * self.mean
        c = a * a * self.var + s * s
        return self.mean + a * self.var / c * d, s / c * d

    def predict(self, target: str, x_t: Tensor, t, cond=None) -> Tensor:
        x0, eps = self.pair(x_t, t)
        if target == "x0":
            return x0
        if target == "eps":
            return eps
        if target == "instaflow_v":
            return x0 - eps
        return from_x0_eps(target, x0, eps, x_t, t, self.process)

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        return self.predict(self.prediction, x_t, t)

    def law(self, t) -> tuple[Tensor, Tensor]:
        """The exact marginal ``N(a mean, a^2 var + s^2)`` at ``t`` (mean and variance shaped ``(1, *shape)``)."""
        a, s = float(self.process.alpha(t)), float(self.process.sigma(t))
        return (a * self.mean)[None], (a * a * self.var + s * s)[None]

    def as_mixture(self):
        from toy_data.mixtures import GaussianMixture
        return GaussianMixture(self.mean[None], self.var[None], process=self.process)


def image_stats():
    """Per-pixel mean, variance (>= 0.01) and source of 64 CIFAR images, drawn with this run's seed."""
    return _image_stats_for_seed(check_seed(0))


@functools.lru_cache(maxsize=4)
def _image_stats_for_seed(seed: int):
    from toy_data.cifar import image_dataset_for_checks
    images, source = image_dataset_for_checks(64, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return images.mean(0), images.var(0).clamp_min(1e-2), source


def gaussian_data(dim: int, process: Process, prediction: str = "x0") -> tuple[ExactGaussian, str]:
    """Gaussian data for law checks: 2D ``N((0.7, -0.4), diag(0.3, 1.6))``, or a 3x32x32 per-pixel Gaussian."""
    if dim == 2:
        mean, var = torch.tensor([0.7, -0.4], dtype=F64), torch.tensor([0.3, 1.6], dtype=F64)
        return ExactGaussian(mean, var, process, prediction), "2D Gaussian N((0.7,-0.4), diag(0.3,1.6))"
    if dim == 3072:
        mean, var, source = image_stats()
        return (ExactGaussian(mean, var, process, prediction),
                f"3x32x32 Gaussian with the per-pixel mean/variance (>= 0.01) of 64 images ({source})")
    raise ValueError(f"dim={dim} is not supported; allowed: {DIMS}")

# ---- trajectory-distillation data: the 8-Gaussian mixture, a Gaussian with a closed-form flow map -----
def cifar_images(n: int = 32):
    from toy_data.cifar import image_dataset_for_checks
    return image_dataset_for_checks(n, generator=_gen(0), dtype=F64)


def eight_gaussians_or_images(dim: int, process, labels: bool = False):
    """(exact teacher, data label): the 8-Gaussian 2D mixture or the empirical set of 32 CIFAR images.
    ``labels=True`` makes it class-conditional (2D: 4 classes of 2 modes; images: label = index mod 2)."""
    from toy_data.mixtures import EmpiricalDistribution, GaussianMixture, eight_gaussians_mixture
    if dim == 2:
        base = eight_gaussians_mixture(process)
        if labels:
            return GaussianMixture(base.means, base.eigvals[:, 0], labels=torch.arange(8) // 2,
                                   process=process), "8-Gaussian mixture, 4 classes of 2 modes"
        return base, "8-Gaussian mixture"
    if dim == 3072:
        images, source = cifar_images()
        lab = torch.arange(images.shape[0]) % 2 if labels else None
        return EmpiricalDistribution(images, process=process, labels=lab), \
            f"empirical distribution of 32 images ({source})" + (", labels = index mod 2" if labels else "")
    raise ValueError(f"dim={dim} is not supported by the trajectory checks; allowed: {DIMS}")


def gaussian_or_image_gaussian(dim: int, process):
    """(one-component Gaussian, label): full-covariance 2D Gaussian, or the diagonal Gaussian fitted to 32 CIFAR images
    (per-pixel mean and variance + 1e-3): data whose PF-ODE flow map is closed form."""
    from toy_data.mixtures import GaussianMixture
    if dim == 2:
        cov = torch.tensor([[0.30, 0.12], [0.12, 0.20]], dtype=F64)
        return GaussianMixture(torch.tensor([[0.4, -0.3]], dtype=F64), cov[None], process=process), "2D Gaussian"
    if dim == 3072:
        images, source = cifar_images()
        return (GaussianMixture(images.mean(0, keepdim=True), (images.var(0) + 1e-3)[None], process=process),
                f"diagonal Gaussian fitted to 32 images ({source})")
    raise ValueError(f"dim={dim} is not supported by the trajectory checks; allowed: {DIMS}")
