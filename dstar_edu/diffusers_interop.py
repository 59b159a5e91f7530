"""diffusers networks as dstar_edu predictors, and diffusers schedulers as dstar_edu processes.

Convention map (diffusers 0.42; the rows are tested in ``tests/test_diffusers_interop.py`` and, for the
scheduler steps, in the registered checks ``samplers.diffusers_*``):

========================================  ===========================================================
diffusers                                 dstar_edu (handbook)
========================================  ===========================================================
DDPM/DDIM ``timestep = k`` (0..T-1)       ``DDPM`` time ``t = k + 1`` (1..T); ``t = 0`` is clean data
``alphas_cumprod[k]``                     ``alpha_bar(k + 1)`` (diffusers builds it in float32:
                                          relative difference <= 2 t 2^-24, check basics.notation_diffusers)
``set_alpha_to_one=True``                 the last DDIM step lands on ``t = 0`` (``alpha_bar_0 = 1``)
``set_alpha_to_one=False``                the last DDIM step lands on ``t = 1`` (``alphas_cumprod[0]``);
                                          from ``t = 1`` it is the identity, so the run equals our
                                          grid ending at ``t = 1``
DDIM ``prev_timestep = k - T // N``       ``diffusers_ddim_transitions``: equals the next entry of
                                          ``samplers.subsequence`` only for ``leading`` spacing (and
                                          ``trailing`` when N divides T); ``linspace`` N=10 steps
                                          999 -> 899, not to the listed 888
``DDIMScheduler.step(eta)``               ``samplers.diffusion.ddim_step`` (handbook Eq. 14)
``DDPMScheduler.step``, "fixed_small"     ``ddpm_step(variance="posterior")`` (Eq. 8/10);
                                          "fixed_large" is ``variance="beta"``
``clip_sample=True`` (the default)        not done here: clamps x0_hat to [-1, 1]; turn it off to compare
noise ``randn_tensor(shape, generator)``  ``torch.randn(shape, generator=...)``: same numbers on CPU;
                                          DDPM draws when ``k > 0``, DDIM on every step when eta > 0
``prediction_type="epsilon"``             ``"eps"``
``prediction_type="v_prediction"``        ``"v_bar"`` (diffusers' v = sqrt(ab) eps - sqrt(1-ab) x0 = -v
                                          of handbook Sec. 2.6.2)
``prediction_type="sample"``              ``"x0"``
FlowMatchEulerDiscrete ``sigma``          ``RectifiedFlow`` time ``t = sigma``, model ``timestep = 1000 t``,
                                          prediction ``"velocity"`` (eps - x0); ``shift`` only warps the
                                          grid ``t' = s t / (1 + (s - 1) t)``, not the process (its steps
                                          are cross-checked in ``samplers.rf_diffusers``)
EDMEuler ``sigma``                        ``VE`` time ``t = sigma``; the network sees
                                          ``c_in x = x / sqrt(sigma^2 + sigma_data^2)`` and
                                          ``c_noise = log(sigma) / 4``; ``x0 = c_skip x + c_out F``
                                          (``preconditioning="edm"``, prediction ``"x0"``)
EDMEuler ``step``                         ``pf_ode_step(method="euler")`` on VE (Eq. 4 with f = 0, g^2 = 2t).
                                          diffusers casts the *sample* to float32 inside ``step``:
                                          states representable in float32 agree to float64 rounding
SCMScheduler (TrigFlow) ``timestep``      ``TrigFlow`` angle ``t``, ``sigma_data`` from its config (its steps
                                          are cross-checked in ``samplers.scm_diffusers``)
========================================  ===========================================================

Model time for other processes (``timestep_fn`` overrides it): ``VP`` and ``TrigFlow``:
``1000 t / t_max`` (the same range as ``MLPPredictor``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .conversions import check_prediction
from .predictors import Predictor
from .process import DDPM, VE, Process, RectifiedFlow, TrigFlow
from .validation import check_choice, check_type

Tensor = torch.Tensor

__all__ = ["DiffusersUNetPredictor", "process_from_scheduler", "prediction_from_diffusers",
           "default_timestep_fn", "diffusers_ddim_transitions", "edm_preconditioning", "tiny_unet"]

_PREDICTION_MAP = {"epsilon": "eps", "v_prediction": "v_bar", "sample": "x0", "flow_prediction": "velocity"}


def prediction_from_diffusers(prediction_type: str) -> str:
    """diffusers ``prediction_type`` -> dstar_edu prediction name (ours pass through unchanged)."""
    if prediction_type in _PREDICTION_MAP:
        return _PREDICTION_MAP[prediction_type]
    try:
        return check_prediction(prediction_type)
    except ValueError:
        raise ValueError(f"prediction={prediction_type!r} is unknown; allowed: diffusers names "
                         f"{sorted(_PREDICTION_MAP)} or dstar_edu names") from None


def default_timestep_fn(process: Process) -> Callable[[Tensor], Tensor]:
    """The model-time convention of the module docstring for ``process``."""
    if isinstance(process, DDPM):
        return lambda t: t - 1
    if isinstance(process, VE):
        return lambda t: 0.25 * torch.log(t)
    if isinstance(process, RectifiedFlow):
        return lambda t: 1000.0 * t
    return lambda t, _tm=process.t_max: 1000.0 * t / _tm


def edm_preconditioning(sigma: Tensor, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
    """EDM (Karras et al. 2022, Table 1) ``c_in, c_noise, c_skip, c_out`` at noise level sigma, as diffusers'
    EDMEulerScheduler computes them (``v_prediction`` flips the sign of ``c_out``)."""
    check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))  # the EDM ones
    r = torch.sqrt(sigma * sigma + sigma_data ** 2)
    c_out = sigma * sigma_data / r
    return 1 / r, 0.25 * torch.log(sigma), sigma_data ** 2 / r ** 2, (c_out if prediction_type == "epsilon" else -c_out)


class DiffusersUNetPredictor(Predictor):
    """A diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, a transformer, or any module
    called as ``net(sample, timestep, **kwargs)``) as a dstar_edu predictor.

    Args:
        unet: the network; its output may be a tensor, a tuple, or an object with ``.sample``.
        process: the process whose time ``t`` the sampler uses.
        prediction: diffusers ``prediction_type`` ("epsilon", "v_prediction", "sample") or a dstar_edu
            name; ignored (set to "x0") with ``preconditioning="edm"``.
        timestep_fn: ``t -> model timestep`` (default: ``default_timestep_fn(process)``).
        preconditioning: ``None`` or ``"edm"`` (VE only): the network sees ``c_in x`` and ``c_noise``,
            the predictor returns ``x0 = c_skip x + c_out F``.
        sigma_data, edm_prediction_type: EDM constants (diffusers' EDMEulerScheduler config).

        learned_variance: the network predicts ``2C`` channels (the prediction and a learned variance, e.g.
            PixArt-alpha, DiT, IF); only the first ``C`` are used (SIM App. B.3). Without it a ``2C`` output
            is refused.

    The network is called ``net(sample, timestep=..., **cond)``: the timestep by keyword (a transformer's
    second positional argument is ``encoder_hidden_states``) and always in float32 (float64 for a float64
    network), never in the network's dtype: a bf16 teacher would otherwise see DDPM step 399 as 400 and 998
    as 1000 (bf16 keeps 8 significant bits). DDPM steps are integers < 2^24, exact in float32; diffusers
    computes the sinusoidal embedding in float32 and casts it to the sample dtype itself.

    ``cond`` is passed through: a dict is used as keyword arguments (e.g. ``encoder_hidden_states``,
    ``added_cond_kwargs``); a tensor becomes ``encoder_hidden_states`` for networks with a
    ``cross_attention_dim`` and ``class_labels`` otherwise. The sample is cast to the network's dtype
    and the output back to the input's dtype.
    """

    def __init__(self, unet: nn.Module, process: Process, prediction: str = "epsilon", *,
                 timestep_fn: Callable[[Tensor], Tensor] | None = None, preconditioning: str | None = None,
                 sigma_data: float = 0.5, edm_prediction_type: str = "epsilon", learned_variance: bool = False):
        check_choice("preconditioning", preconditioning, (None, "edm"))
        if preconditioning == "edm" and not isinstance(process, VE):
            raise ValueError(f"preconditioning='edm' needs a VE process (t = sigma), got process={process!r}")
        super().__init__(process, "x0" if preconditioning == "edm" else prediction_from_diffusers(prediction))
        self.unet = unet
        self.timestep_fn = timestep_fn or default_timestep_fn(process)
        self.preconditioning = preconditioning
        self.sigma_data, self.edm_prediction_type = float(sigma_data), edm_prediction_type
        check_type("learned_variance", learned_variance, bool, "True or False")
        self.learned_variance = learned_variance
        if preconditioning == "edm":
            edm_preconditioning(torch.ones(()), sigma_data, edm_prediction_type)   # validates the type

    def with_net(self, net: nn.Module) -> "DiffusersUNetPredictor":
        """The same predictor (process, prediction, time map, preconditioning, channels) over ``net``: e.g. the
        DDP/FSDP-wrapped module of the same weights, for a phase that must run through the wrapper while
        another phase evaluates the unwrapped module."""
        return DiffusersUNetPredictor(net, self.process, self.prediction, timestep_fn=self.timestep_fn,
                                      preconditioning=self.preconditioning, sigma_data=self.sigma_data,
                                      edm_prediction_type=self.edm_prediction_type,
                                      learned_variance=self.learned_variance)

    def _net_dtype(self, x: Tensor) -> torch.dtype:
        p = next(self.unet.parameters(), None)
        return p.dtype if p is not None else x.dtype

    def _cond_kwargs(self, cond) -> dict:
        if cond is None:
            return {}
        if isinstance(cond, dict):
            return dict(cond)
        cfg = getattr(self.unet, "config", None)
        if cfg is not None and getattr(cfg, "cross_attention_dim", None) is not None:
            return {"encoder_hidden_states": cond}
        return {"class_labels": cond}

    def forward(self, x_t: Tensor, t, cond=None) -> Tensor:
        t = self.process.check_t(torch.as_tensor(t, dtype=torch.float64, device=x_t.device))   # float64 times
        if t.ndim == 1 and (x_t.ndim == 0 or t.shape[0] != x_t.shape[0]):
            raise ValueError(f"t has shape {tuple(t.shape)} but x_t has shape {tuple(x_t.shape)}: t must be a scalar "
                             "or have one entry per batch element")
        t_b = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        dtype = self._net_dtype(x_t)
        x_in, c_skip, c_out = x_t, None, None
        if self.preconditioning == "edm":
            c_in, c_noise, c_skip, c_out = edm_preconditioning(t_b, self.sigma_data, self.edm_prediction_type)
            c_in, c_skip, c_out = (c.reshape(-1, *[1] * (x_t.ndim - 1)).to(x_t.dtype) for c in (c_in, c_skip, c_out))
            x_in, timestep = x_t * c_in, c_noise
        else:
            timestep = self.timestep_fn(t_b)
        t_dtype = torch.float64 if dtype == torch.float64 else torch.float32      # never the network's bf16
        out = self.unet(x_in.to(dtype), timestep=timestep.to(t_dtype), **self._cond_kwargs(cond))
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
        out = out.to(x_t.dtype)
        if self.learned_variance and x_t.ndim >= 2 and out.ndim == x_t.ndim and out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        if out.shape != x_t.shape:
            hint = (" (a 2C-channel output: pass learned_variance=True to keep the first C channels)"
                    if out.ndim == x_t.ndim and x_t.ndim >= 2 and out.shape[1] == 2 * x_t.shape[1] else "")
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input shape {tuple(x_t.shape)}{hint}")
        return c_skip * x_t + c_out * out if self.preconditioning == "edm" else out


def _config_of(scheduler_or_config):
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    name = (type(scheduler_or_config).__name__ if hasattr(scheduler_or_config, "config")
            else (cfg.get("_class_name") if hasattr(cfg, "get") else None))
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    return cfg, str(name or ""), get


def process_from_scheduler(scheduler_or_config) -> Process:
    """The dstar_edu process of a diffusers scheduler (instance or config with ``_class_name``).

    FlowMatch* -> ``RectifiedFlow``; EDM* -> ``VE(sigma_max)``; SCM -> ``TrigFlow(sigma_data)``;
    any scheduler with a ``beta_schedule`` (DDPM, DDIM, DPMSolver*, Euler*, LCM, TCD, ...) -> ``DDPM``
    with the same betas (``DDPM.from_diffusers_config``).
    """
    cfg, name, get = _config_of(scheduler_or_config)
    if "FlowMatch" in name:
        return RectifiedFlow()
    if "EDM" in name:
        return VE(float(get("sigma_max", 80.0)))
    if "SCM" in name:
        return TrigFlow(float(get("sigma_data", 0.5)))
    if get("beta_schedule", None) is not None or get("trained_betas", None) is not None:
        return DDPM.from_diffusers_config(cfg)
    raise ValueError(f"scheduler {name or type(scheduler_or_config).__name__!r} is not supported; allowed: "
                     "FlowMatch*, EDM*, SCMScheduler, or a scheduler with beta_schedule / trained_betas")


def diffusers_ddim_transitions(T: int, n_steps: int, spacing: str = "leading", steps_offset: int = 0,
                               set_alpha_to_one: bool = True) -> list[tuple[int, int]]:
    """The ``(t, t_prev)`` pairs, in handbook time, that diffusers' DDIMScheduler steps through.

    diffusers steps from timestep ``k`` to ``k - T // n_steps`` (alpha_bar of the final step:
    1 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``), whatever the listed timesteps are.
    """
    from .samplers.common import subsequence
    listed = subsequence(T, n_steps, spacing, steps_offset)[:-1].long().tolist()
    pairs = []
    for t in listed:
        prev = (t - 1) - T // n_steps
        pairs.append((t, prev + 1 if prev >= 0 else (0 if set_alpha_to_one else 1)))
    return pairs


def tiny_unet(sample_size: int = 32, channels: int = 3, seed: int = 0, **overrides) -> nn.Module:
    """A tiny randomly initialised ``UNet2DModel`` (channels (16, 32), one layer per block, 8 groups)
    for tests, notebooks and benchmarks (seeded, float32, ~0.2M parameters)."""
    from diffusers import UNet2DModel
    kw = dict(sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
              layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D"))
    kw.update(overrides)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DModel(**kw)
    finally:
        torch.random.set_rng_state(state)
    return unet.eval()

