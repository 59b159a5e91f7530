"""Objectives (DESIGN.md block 3): losses as functions of tensors and predictors, no training loop inside.

``pretrain``: diffusion / flow / score-matching / consistency losses of handbook Sec. 2.2-2.5 and 3.1.
``distances``: per-sample distances ``d(x, y)`` (l2, pseudo-Huber) shared with the distillation losses.
"""
from .distances import PAIR_DISTANCES, get_pair_distance, l2, pseudo_huber, squared_norm
from .pretrain import (T_SAMPLERS, WEIGHTINGS, consistency_distillation_loss, consistency_function,
                       consistency_training_loss, ddim_denoise, denoising_loss, divergence,
                       explicit_score_matching_loss, flow_matching_loss, implicit_score_matching_loss, loss_weight,
                       make_t_sampler, sample_t, t_from_edm_sigma, trigflow_ct_gradient_surrogate,
                       trigflow_diffusion_loss)

__all__ = [
    "PAIR_DISTANCES", "get_pair_distance", "l2", "pseudo_huber", "squared_norm",
    "T_SAMPLERS", "WEIGHTINGS", "consistency_distillation_loss", "consistency_function", "consistency_training_loss",
    "ddim_denoise", "denoising_loss", "divergence", "explicit_score_matching_loss", "flow_matching_loss",
    "implicit_score_matching_loss", "loss_weight", "make_t_sampler", "sample_t", "t_from_edm_sigma",
    "trigflow_ct_gradient_surrogate", "trigflow_diffusion_loss",
]
