"""The smallest adapters the scaled runs need on top of the library (each is a candidate to move upstream).

Nothing here computes a loss. Each adapter exists because a library object lacks one small thing at scale:

* :class:`ConditionalTeacherInitGenerator`: ``generators.TeacherInitGenerator.forward(z)`` takes no condition,
  but a text-to-image one-step model is ``g_theta(z, c)`` (DI* Alg. 1; SIM App. B.3 ``g(z) = d(z, t*)`` with the
  prompt passed to the denoiser). Upstream fix: ``forward(z, cond=None)`` passing ``cond`` to ``predict``.
* :class:`PixArtDenoiser`: ``DiffusersUNetPredictor`` calls ``net(sample, timestep, **cond)`` positionally, but
  ``PixArtTransformer2DModel.forward``'s second positional argument is ``encoder_hidden_states``, and PixArt-alpha
  predicts ``2C`` channels (eps and the learned variance); SIM App. B.3 keeps only the image channels.
* :func:`predictor_view`: the same network weights seen through a second predictor object. The online (fake)
  score is trained through its DDP wrapper in its own phase, but must be evaluated through the *unwrapped*
  module inside the generator loss: a DDP forward with grad enabled expects every parameter to receive a
  gradient in the following backward, and the generator loss freezes the fake's parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from dstar_edu.diffusers_interop import DiffusersUNetPredictor
from dstar_edu.generators import TeacherInitGenerator

Tensor = torch.Tensor

__all__ = ["ConditionalTeacherInitGenerator", "PixArtDenoiser", "predictor_view"]


class ConditionalTeacherInitGenerator(TeacherInitGenerator):
    """SIM's teacher-initialised one-step generator with a condition: ``x0 = g_theta(z, c) = d_theta(alpha* z, t*; c)``.

    Same construction, noise and fixed time as :class:`dstar_edu.generators.TeacherInitGenerator` (which it
    subclasses: ``noise``, ``t_star``, ``sigma_star``, ``alpha_star`` are the library's); only ``forward``
    gains the condition ``cond`` that is handed to the copied denoiser (e.g. a dict with
    ``encoder_hidden_states`` and ``added_cond_kwargs``).
    """

    def forward(self, z: Tensor, cond=None) -> Tensor:
        z = self._check_z(z)
        t = torch.full((z.shape[0],), self.t_star, dtype=z.dtype, device=z.device)
        return self.denoiser.predict("x0", self.alpha_star * z, t, cond)

    def sample(self, n: int, generator: torch.Generator | None = None, return_noise: bool = False, cond=None):
        z = self.noise(n, generator)
        x0 = self(z, cond)
        return (x0, z) if return_noise else x0


class PixArtDenoiser(nn.Module):
    """A ``PixArtTransformer2DModel`` called like a UNet, ``net(sample, timestep, **cond)``, returning the
    eps channels only (the learned-variance channels are dropped, SIM App. B.3).

    ``cond`` keys: ``encoder_hidden_states`` (T5 embeddings), ``encoder_attention_mask`` and optionally
    ``added_cond_kwargs`` (``resolution`` / ``aspect_ratio`` for the 1024px model; ``None`` entries otherwise).
    The state dict is the transformer's under the prefix ``transformer.``.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, added_cond_kwargs: dict | None = None) -> Tensor:
        if added_cond_kwargs is None:
            added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        out = self.transformer(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                               added_cond_kwargs=added_cond_kwargs, encoder_attention_mask=encoder_attention_mask,
                               return_dict=False)[0]
        return out[:, : sample.shape[1]]


def predictor_view(predictor: DiffusersUNetPredictor, net: nn.Module) -> DiffusersUNetPredictor:
    """A second ``DiffusersUNetPredictor`` with the same process, prediction and preconditioning over ``net``
    (e.g. the DDP-wrapped or the unwrapped module of the same weights)."""
    if not isinstance(predictor, DiffusersUNetPredictor):
        raise ValueError(f"predictor must be a DiffusersUNetPredictor, got {type(predictor).__name__}")
    return DiffusersUNetPredictor(net, predictor.process, predictor.prediction, timestep_fn=predictor.timestep_fn,
                                  preconditioning=predictor.preconditioning, sigma_data=predictor.sigma_data,
                                  edm_prediction_type=predictor.edm_prediction_type)

