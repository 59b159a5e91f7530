"""Toy data: 2D distributions, exact mixtures with closed-form diffused marginals, CIFAR-10 loading."""
from .cifar import image_dataset_for_checks, load_cifar10, load_cifar10_sample
from .datasets2d import DATASETS, sample_dataset
from .mixtures import EmpiricalDistribution, GaussianMixture, eight_gaussians_mixture, grid25_mixture

__all__ = ["DATASETS", "sample_dataset", "GaussianMixture", "EmpiricalDistribution", "eight_gaussians_mixture",
           "grid25_mixture", "load_cifar10", "load_cifar10_sample", "image_dataset_for_checks"]
