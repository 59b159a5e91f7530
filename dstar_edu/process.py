"""Forward noising processes ``x_t = alpha(t) * x0 + sigma(t) * eps`` (handbook Def. 2.1).

Every process gives ``alpha(t)``, ``sigma(t)``, their time derivatives, its time domain, its prior
and the marginal sample. Nothing else in the library knows which process it is talking to: it asks
``process.at(t, x)`` for one :class:`Coefficients` value (``alpha, sigma, d_alpha, d_sigma``, computed from
float64 ``t`` and shaped to broadcast against ``x``). Each process owns its closed-form inverse time map
``t_from_edm_sigma``; grids and time distributions built on it live in ``dstar_edu.times``.

Notation map (handbook "Demystify notations", Sec. 2.2.1, 2.3, 2.4, 2.5, 2.7), written once here:

=========================  ======================================================================
this library               other papers
=========================  ======================================================================
``alpha(t)``               handbook Def. 2.1 ``a_bar_t``; Sec. 2.7 ``alpha_t``; LCM/DMD ``alpha_t``;
                           DDPM ``sqrt(alpha_bar_t)``; DDIM ``sqrt(alpha_t)``; TrigFlow ``cos t``;
                           rectified flow ``1 - t``.
``sigma(t)``               handbook Def. 2.1 ``b_bar_t``; Sec. 2.7 ``beta_t``; LCM ``sigma_t``;
                           DDPM ``sqrt(1 - alpha_bar_t)``; TrigFlow ``sigma_d sin t``; RF ``t``.
``alpha_bar(t)``           DDPM ``alpha_bar_t`` = DDIM ``alpha_t`` = (LCM ``alpha_t``)^2, for VP;
                           in general alpha^2 / (alpha^2 + sigma^2) (the VP process of x_t/|(a,s)|).
``edm_sigma(t)``           EDM / SiD / SIM / VE noise level ``sigma = sigma(t) / alpha(t)``; inverse
                           ``t_from_edm_sigma``.
``log_snr(t)``             DPM-Solver ``lambda_t = log(alpha_t / sigma_t)`` (half the log-SNR; ``dstar_edu.times``);
                           ``lambda = -log edm_sigma``, so its inverse is ``t_from_edm_sigma(exp(-lambda))``.
``d_alpha``, ``d_sigma``   handbook Sec. 2.7 ``alpha_t'``, ``beta_t'``; flow matching ``d_alpha_t, d_sigma_t``.
=========================  ======================================================================

diffusers convention map: the handbook's discrete DDPM time ``t in {1..T}`` is diffusers'
``timestep = t - 1`` (``scheduler.alphas_cumprod[k] == alpha_bar(k + 1)``); handbook ``t = 0`` is
clean data (``alpha_bar_0 = 1``, diffusers' ``set_alpha_to_one``). FlowMatch sigmas are rectified
flow times ``t``; EDM sigmas are ``VE`` times ``t``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .validation import check_choice, check_int

Tensor = torch.Tensor

__all__ = [
    "Process", "DDPM", "VP", "VE", "RectifiedFlow", "TrigFlow", "make_process", "PROCESSES",
    "time_tensor", "expand_like", "Coefficients",
]


def time_tensor(t, x: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` as a float64 tensor on x's device, either 0-d or shaped ``(batch,)`` matching ``x``.

    Time stays float64 (or exact integers widened to it) whatever x's dtype: casting ``t = 601`` to bf16
    would move it to 600, and ``t = 1000`` to 1000 +- 4 (issue 13). Pass ``dtype`` to override.
    """
    if dtype is None:
        dtype = torch.float64
    device = x.device if isinstance(x, Tensor) else None
    if isinstance(t, Tensor):
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must be real times (a number or a float/int tensor), got a tensor of dtype {t.dtype}")
        t = t.to(dtype=dtype, device=device)
    else:
        if isinstance(t, (str, bytes, complex)) or t is None:
            raise ValueError(f"t={t!r} must be a number, a sequence of numbers or a tensor of times")
        try:
            t = torch.as_tensor(t, dtype=dtype, device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"t={t!r} must be a number, a sequence of numbers or a tensor of times ({err})") from None
    if t.ndim > 1:
        raise ValueError(f"t must be a scalar or a 1-d tensor of shape (batch,), got shape {tuple(t.shape)}")
    if x is not None and t.ndim == 1:
        if x.ndim == 0 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t has shape {tuple(t.shape)} but x_t has shape {tuple(x.shape)}: "
                "t must be a scalar or have one entry per batch element (x_t.shape[0])")
    return t


def _out_dtype(t, x) -> torch.dtype:
    """The dtype a coefficient is returned in: x's (floating) dtype, else t's floating dtype, else float64."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return x.dtype
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.dtype
    return torch.float64


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``(batch,)`` to broadcast against ``x`` of shape (batch, *shape)."""
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


class Coefficients:
    """The process at validated times ``t``: ``alpha, sigma`` and their time derivatives (handbook Def. 2.1).

    Built by ``Process.at(t, x)``: computed from float64 ``t`` and cast once to one dtype, each shaped to
    broadcast against ``x`` (``(batch, 1, ..., 1)`` for per-sample times, 0-d for a scalar; ``t``'s own shape
    without ``x``). ``t`` is the validated float64 time. ``d_alpha``/``d_sigma`` are computed on first use
    (``d_sigma = +inf`` where ``sigma = 0`` for the VP processes); ``alpha_bar`` and ``edm_sigma`` follow the
    notation map above. ``to(dtype)`` casts; ``split()`` gives one value per time of a 1-d ``t`` (samplers
    compute a whole grid at once).
    """

    __slots__ = ("process", "t", "alpha", "sigma", "_d")

    def __init__(self, process: "Process", t: Tensor, alpha: Tensor, sigma: Tensor, derivatives):
        self.process, self.t, self.alpha, self.sigma, self._d = process, t, alpha, sigma, derivatives

    def _derivatives(self) -> tuple[Tensor, Tensor]:
        if callable(self._d):
            self._d = self._d()
        return self._d

    @property
    def d_alpha(self) -> Tensor:
        """``d alpha / dt``."""
        return self._derivatives()[0]

    @property
    def d_sigma(self) -> Tensor:
        """``d sigma / dt``."""
        return self._derivatives()[1]

    @property
    def alpha_bar(self) -> Tensor:
        """DDPM ``alpha_bar = alpha^2 / (alpha^2 + sigma^2)`` of the variance-normalised process."""
        return self.process._alpha_bar(self.t).to(self.alpha.dtype).reshape(self.alpha.shape)

    @property
    def edm_sigma(self) -> Tensor:
        """EDM noise level ``sigma / alpha``."""
        return self.sigma / self.alpha

    def to(self, dtype: torch.dtype) -> "Coefficients":
        """The same coefficients cast to ``dtype`` (from their float64 values when they are float64)."""
        da, ds = self._derivatives()
        return Coefficients(self.process, self.t, self.alpha.to(dtype), self.sigma.to(dtype),
                            (da.to(dtype), ds.to(dtype)))

    def split(self) -> list["Coefficients"]:
        """One scalar value per entry of a 1-d ``t`` (built without ``x``)."""
        if self.t.ndim != 1 or self.alpha.shape != self.t.shape:
            raise ValueError(f"split() needs coefficients of a 1-d t built without x, got t of shape "
                             f"{tuple(self.t.shape)} and alpha of shape {tuple(self.alpha.shape)}")
        da, ds = self._derivatives()
        return [Coefficients(self.process, *v[:3], v[3:]) for v in
                zip(self.t.unbind(), self.alpha.unbind(), self.sigma.unbind(), da.unbind(), ds.unbind())]

    def __repr__(self) -> str:
        t = self.t.tolist() if self.t.numel() <= 4 else f"shape {tuple(self.t.shape)}"
        return f"Coefficients({self.process}, t={t}, dtype={self.alpha.dtype})"


class Process:
    """Base class: subclasses implement ``_alpha, _sigma, _d_alpha, _d_sigma`` on validated float64 tensors.

    Everything outside this module reads them through ``at(t, x)`` (a :class:`Coefficients` value) or the
    public ``alpha``/``sigma``/``d_alpha``/``d_sigma``/``alpha_bar``/``edm_sigma`` methods.
    """

    name = "process"
    t_min: float = 0.0
    t_max: float = 1.0
    prior_std: float = 1.0
    discrete = False

    # ---- public API (validates t) -------------------------------------------------------------
    def check_t(self, t, x: Tensor | None = None) -> Tensor:
        """Validate ``t`` against the domain and return it as a float64 tensor (see ``time_tensor``).

        The domain test allows a slack of one unit in the last place of ``t``'s own dtype when ``t`` is a
        lower-precision tensor, so that e.g. float32(pi/2) counts as TrigFlow's t_max; values are then
        clamped into the domain. Coefficients are computed from this float64 time and only then cast.
        """
        src = t.dtype if isinstance(t, Tensor) and t.is_floating_point() else torch.float64
        t = time_tensor(t, x)
        if torch.isnan(t).any():
            raise ValueError(f"t contains NaN; allowed: the time domain [{self.t_min}, {self.t_max}] of {self}")
        slack = torch.finfo(src).eps * max(1.0, abs(self.t_max)) if src != torch.float64 else 0.0
        if t.numel() == 0:
            return t
        lo, hi = t.min().item(), t.max().item()
        if lo < self.t_min - slack or hi > self.t_max + slack:
            bad = lo if lo < self.t_min - slack else hi
            raise ValueError(f"t={bad:g} is outside the time domain [{self.t_min:g}, {self.t_max:g}] of {self}")
        return t.clamp(self.t_min, self.t_max) if slack else t

    def at(self, t, x: Tensor | None = None, dtype: torch.dtype | None = None) -> Coefficients:
        """The coefficients at ``t`` (validated, see ``check_t``) as one :class:`Coefficients` value.

        ``x`` (optional, shape ``(batch, *shape)``): shape them to broadcast against it and check ``t``'s batch
        size. ``dtype``: default x's floating dtype (else t's, else float64); time itself stays float64.
        """
        tt = self.check_t(t, x)
        dt = _out_dtype(t, x) if dtype is None else dtype

        def shaped(c: Tensor) -> Tensor:
            c = c.to(dt)
            return c if x is None else expand_like(c, x)
        return Coefficients(self, tt, shaped(self._alpha(tt)), shaped(self._sigma(tt)),
                            lambda: (shaped(self._d_alpha(tt)), shaped(self._d_sigma(tt))))

    def alpha(self, t, x: Tensor | None = None) -> Tensor:
        """alpha(t), computed from float64 t and returned in x's dtype (t's, or float64)."""
        return self._alpha(self.check_t(t, x)).to(_out_dtype(t, x))

    def sigma(self, t, x: Tensor | None = None) -> Tensor:
        """sigma(t), computed from float64 t and returned in x's dtype (t's, or float64)."""
        return self._sigma(self.check_t(t, x)).to(_out_dtype(t, x))

    def d_alpha(self, t, x: Tensor | None = None) -> Tensor:
        """d alpha / dt."""
        return self._d_alpha(self.check_t(t, x)).to(_out_dtype(t, x))

    def d_sigma(self, t, x: Tensor | None = None) -> Tensor:
        """d sigma / dt (``+inf`` where sigma = 0 for the VP processes: sigma ~ sqrt(t) there)."""
        return self._d_sigma(self.check_t(t, x)).to(_out_dtype(t, x))

    def coefficients(self, t, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` shaped to broadcast against ``x``, computed in float64 and cast to x's dtype."""
        c = self.at(t, x)
        return c.alpha, c.sigma

    def alpha_bar(self, t, x: Tensor | None = None) -> Tensor:
        """DDPM ``alpha_bar`` of the variance-normalised process (= alpha^2 for VP processes)."""
        tt = self.check_t(t, x)
        return self._alpha_bar(tt).to(_out_dtype(t, x))

    def _alpha_bar(self, t: Tensor) -> Tensor:
        a, s = self._alpha(t), self._sigma(t)
        return a * a / (a * a + s * s)

    def edm_sigma(self, t, x: Tensor | None = None) -> Tensor:
        """VE/EDM noise level sigma(t)/alpha(t) of the equivalent variance-exploding process."""
        tt = self.check_t(t, x)
        return (self._sigma(tt) / self._alpha(tt)).to(_out_dtype(t, x))

    def t_from_edm_sigma(self, s) -> Tensor:
        """The time whose EDM noise level ``sigma(t)/alpha(t)`` equals ``s`` (float64; inverse of ``edm_sigma``).

        Closed forms per process (VE ``t = s``, rectified flow ``s/(1+s)``, TrigFlow ``atan(s/sigma_d)``,
        VP: solve ``alpha_bar(t) = 1/(1+s^2)``, DDPM: interpolate its log alpha_bar table); bisection
        otherwise (edm_sigma increases with t). ``s`` must lie in ``[edm_sigma(t_min), edm_sigma(t_max)]``.
        """
        s = torch.as_tensor(s, dtype=torch.float64)
        if torch.isnan(s).any() or (s < 0).any():
            raise ValueError(f"s must be non-negative EDM noise levels, got min {s.min().item():g}")
        lo, hi = self.edm_sigma(self.t_min).item(), self.edm_sigma(self.t_max).item()
        if s.numel() and (s.min().item() < lo * (1 - 1e-12) or s.max().item() > hi * (1 + 1e-12)):
            raise ValueError(f"s has values in [{s.min().item():g}, {s.max().item():g}] but the EDM noise level of "
                             f"{self} only covers [{lo:g}, {hi:g}]")
        return self._t_from_edm_sigma(s).clamp(self.t_min, self.t_max)

    def _t_from_edm_sigma(self, s: Tensor) -> Tensor:
        a = torch.full_like(s, float(self.t_min))
        b = torch.full_like(s, float(self.t_max))
        for _ in range(200):
            mid = 0.5 * (a + b)
            up = self.edm_sigma(mid) < s
            a, b = torch.where(up, mid, a), torch.where(up, b, mid)
        return 0.5 * (a + b)

    def q_sample(self, x0: Tensor, t, eps: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Marginal sample ``x_t = alpha x0 + sigma eps`` (handbook Eq. 6); returns ``(x_t, eps)``."""
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        elif eps.shape != x0.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)} but x0 has shape {tuple(x0.shape)}")
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps, eps

    def prior_sample(self, shape: Sequence[int], generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """Sample the prior at ``t_max``: ``N(0, prior_std^2 I)``."""
        return self.prior_std * torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _AlphaBarProcess(Process):
    """Variance-preserving process specified by ``log alpha_bar(t)``: alpha = sqrt(ab), sigma = sqrt(1-ab)."""

    def _log_alpha_bar(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define _log_alpha_bar")

    def _d_log_alpha_bar(self, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must define _d_log_alpha_bar")

    def _lab(self, t: Tensor) -> Tensor:
        """``log alpha_bar(t)`` clamped to <= 0 and exactly 0 at t_min.

        Vectorised and scalar kernels of log/cos may round one ulp apart, so the raw formula can come out
        as +2.7e-20 at t = 0 (VP cosine on some CPUs; issue 8), and ``sqrt(-expm1(+tiny))`` is NaN.
        """
        lab = self._log_alpha_bar(t).clamp(max=0.0)
        return torch.where(t <= self.t_min, torch.zeros_like(lab), lab)

    def _alpha(self, t):
        return torch.exp(0.5 * self._lab(t))

    def _sigma(self, t):
        return torch.sqrt(0.0 - torch.expm1(self._lab(t)))  # 0.0 - 0.0 = +0.0 at t = 0

    def _alpha_bar(self, t):
        return torch.exp(self._lab(t))

    def _d_alpha(self, t):
        return 0.5 * self._d_log_alpha_bar(t) * self._alpha(t)

    def _d_sigma(self, t):
        # d sqrt(1 - ab)/dt = -ab' / (2 sigma) = -(ab dlogab)/(2 sigma); +inf where sigma = 0 (t = t_min)
        ab = torch.exp(self._lab(t))
        return -0.5 * ab * self._d_log_alpha_bar(t) / self._sigma(t)


def ddpm_betas(T: int, schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> Tensor:
    """Per-step variances beta_1..beta_T (float64). Linear (Ho et al.) or cosine (Nichol & Dhariwal)."""
    check_int("T", T, lo=1)  # number of diffusion steps
    for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (_finite_number(v) and 0 < v < 1):
            raise ValueError(f"{name}={v!r} must be a number in (0, 1)")
    if not (_finite_number(cosine_s) and 0 <= cosine_s < 1):
        raise ValueError(f"cosine_s={cosine_s!r} must be a number in [0, 1) (Nichol & Dhariwal use 0.008)")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":  # Stable Diffusion's schedule
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        ab = f / f[0]
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule={schedule!r} is not supported; allowed: 'linear', 'scaled_linear', 'cosine'")


class DDPM(_AlphaBarProcess):
    """Discrete DDPM (handbook Sec. 2.2.1, Eq. 5-6): ``alpha_t = 1 - beta_t``, ``alpha_bar_t = prod alpha_i``.

    Time is ``t in {0, 1, ..., T}`` with ``alpha_bar_0 = 1`` (clean data). Non-integer ``t`` in [0, T]
    is allowed and interpolates ``log alpha_bar`` linearly between integers: this is the continuous
    VP process whose rate ``beta(t) = -log(alpha_t)`` is constant on each step ``(t-1, t]``, so the
    time derivatives are those of that piecewise-linear interpolant (at an integer ``t`` the slope of
    the step ending at ``t``).
    """

    name = "ddpm"
    discrete = True

    def __init__(self, T: int = 1000, schedule: str = "linear", betas: Tensor | None = None, **kw):
        self.schedule = schedule if betas is None else "custom"
        if betas is None:
            check_int("T", T, lo=1)  # number of diffusion steps
            betas = ddpm_betas(T, schedule, **kw)
        else:
            try:
                betas = torch.as_tensor(betas, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"betas must be a sequence of numbers in (0, 1), got {type(betas).__name__} "
                                 f"({err})") from None
        betas = betas.detach().to(torch.float64).flatten().cpu()
        if betas.numel() == 0:
            raise ValueError("betas is empty; a DDPM needs T >= 1 per-step variances in (0, 1)")
        bad = ~((betas > 0) & (betas < 1))                                   # NaN fails both tests
        if bad.any():
            k = int(bad.nonzero()[0])
            raise ValueError(f"betas must lie in (0, 1); got betas[{k}]={betas[k].item():g} "
                             f"(values in [{betas.min().item():g}, {betas.max().item():g}])")
        self.betas = betas
        self.T = int(betas.numel())
        self.t_max = float(self.T)
        self.log_alphas = torch.log1p(-betas)                                # log alpha_t, t = 1..T
        self.log_alpha_bars = torch.cat([torch.zeros(1, dtype=torch.float64),
                                         torch.cumsum(self.log_alphas, 0)])  # index t = 0..T

    @property
    def alphas(self) -> Tensor:
        """Per-step DDPM ``alpha_t = 1 - beta_t`` for t = 1..T (index t-1)."""
        return 1 - self.betas

    @property
    def alpha_bars(self) -> Tensor:
        """``alpha_bar_t`` for t = 0..T (index t), with ``alpha_bar_0 = 1``."""
        return torch.exp(self.log_alpha_bars)

    def step_alpha(self, t) -> Tensor:
        """Per-step ``alpha_t = alpha_bar_t / alpha_bar_{t-1}`` for integer t in 1..T (Eq. 5)."""
        t = self.check_t(t)
        ti = t.round().long()
        if (ti < 1).any() or (ti.to(t.dtype) != t).any():
            raise ValueError(f"step_alpha needs integer t in 1..{self.T}, got {t.tolist()}")
        return torch.exp(self.log_alphas.to(device=t.device, dtype=t.dtype)[ti - 1])

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lo = torch.clamp(torch.ceil(t) - 1, 0, self.T - 1).long()
        return lo, t - lo.to(t.dtype)

    def _log_alpha_bar(self, t):
        lo, frac = self._segment(t)
        tab = self.log_alpha_bars.to(device=t.device, dtype=t.dtype)
        return tab[lo] + frac * (tab[lo + 1] - tab[lo])

    def _d_log_alpha_bar(self, t):
        lo, _ = self._segment(t)
        return self.log_alphas.to(device=t.device, dtype=t.dtype)[lo]

    def _t_from_edm_sigma(self, s):
        L = torch.log1p(s * s)                                              # -log alpha_bar
        table = -self.log_alpha_bars                                        # increasing, index 0..T
        j = torch.searchsorted(table, L.flatten()).clamp(1, self.T).reshape(L.shape)
        lo_v, hi_v = table[j - 1], table[j]
        return (j - 1).to(torch.float64) + (L - lo_v) / (hi_v - lo_v)

    @classmethod
    def from_diffusers_config(cls, config) -> "DDPM":
        """Build from a diffusers scheduler (or its config): same betas, handbook t = diffusers timestep + 1."""
        cfg = getattr(config, "config", config)
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        T = int(get("num_train_timesteps", 1000))
        trained = get("trained_betas", None)
        if trained is not None:
            return cls(betas=torch.as_tensor(trained, dtype=torch.float64))
        schedule = get("beta_schedule", "linear")
        mapping = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
        check_choice("beta_schedule", schedule, sorted(mapping))
        if mapping[schedule] == "cosine":
            return cls(T, "cosine")
        return cls(T, mapping[schedule], beta_start=float(get("beta_start", 1e-4)),
                   beta_end=float(get("beta_end", 0.02)))

    def __repr__(self):
        return f"DDPM(T={self.T}, schedule={self.schedule!r})"


class VP(_AlphaBarProcess):
    """Continuous variance-preserving process (score SDE, Song et al. 2021; handbook Sec. 2.1).

    ``linear``: ``beta(t) = beta_min + t (beta_max - beta_min)``, ``log alpha_bar = -int_0^t beta``.
    ``cosine``: ``alpha_bar(t) = cos^2((t+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2)``, t in [0, 1 - 1e-3]
    (the cosine schedule reaches alpha = 0 at t = 1, so its domain stops just short).
    """

    name = "vp"

    def __init__(self, schedule: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0,
                 cosine_s: float = 0.008):
        check_choice("schedule", schedule, ("linear", "cosine"))
        if not (_finite_number(beta_min) and _finite_number(beta_max) and 0 < beta_min < beta_max):
            raise ValueError(f"need finite 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        if not (_finite_number(cosine_s) and 0 <= cosine_s < 1):
            raise ValueError(f"cosine_s={cosine_s} must be a number in [0, 1) (Nichol & Dhariwal use 0.008)")
        self.schedule, self.beta_min, self.beta_max, self.s = schedule, beta_min, beta_max, cosine_s
        self.t_max = 1.0 if schedule == "linear" else 1.0 - 1e-3

    def beta(self, t) -> Tensor:
        """SDE rate beta(t) = -d log alpha_bar / dt."""
        return -self._d_log_alpha_bar(self.check_t(t))

    def _t_from_edm_sigma(self, s):
        L = torch.log1p(s * s)                                              # -log alpha_bar
        if self.schedule == "linear":                                       # stable root of (b1-b0)t^2/2 + b0 t = L
            b0, b1 = self.beta_min, self.beta_max
            return 2 * L / (b0 + torch.sqrt(b0 * b0 + 2 * (b1 - b0) * L))
        c = math.pi / (2 * (1 + self.s))
        return torch.acos(math.cos(self.s * c) * torch.exp(-0.5 * L)) / c - self.s

    def _log_alpha_bar(self, t):
        if self.schedule == "linear":
            return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)
        c = math.pi / (2 * (1 + self.s))
        return 2 * (torch.log(torch.cos((t + self.s) * c)) - math.log(math.cos(self.s * c)))

    def _d_log_alpha_bar(self, t):
        if self.schedule == "linear":
            return -(self.beta_min + (self.beta_max - self.beta_min) * t)
        c = math.pi / (2 * (1 + self.s))
        return -2 * c * torch.tan((t + self.s) * c)

    def __repr__(self):
        return f"VP(schedule={self.schedule!r})"


class VE(Process):
    """Variance-exploding / EDM process: ``alpha = 1``, ``sigma = t`` (handbook Sec. 2.3, Karras et al.).

    Time equals the noise level, ``t in [0, sigma_max]``; the prior is ``N(0, sigma_max^2 I)``.
    """

    name = "ve"

    def __init__(self, sigma_max: float = 80.0):
        if not (_finite_number(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max={sigma_max!r} must be a positive finite number (EDM uses 80)")
        self.t_max = float(sigma_max)
        self.prior_std = float(sigma_max)

    def _alpha(self, t):
        return torch.ones_like(t)

    def _t_from_edm_sigma(self, s):
        return s.clone()

    def _sigma(self, t):
        return t.clone()

    def _d_alpha(self, t):
        return torch.zeros_like(t)

    def _d_sigma(self, t):
        return torch.ones_like(t)

    def __repr__(self):
        return f"VE(sigma_max={self.t_max:g})"


class RectifiedFlow(Process):
    """Rectified flow / flow matching (handbook Sec. 2.4): ``alpha = 1 - t``, ``sigma = t``, t in [0, 1].

    The handbook writes ``y_t = t y_1 + (1 - t) y_0`` with ``y_0`` data and ``y_1`` noise: same thing.
    """

    name = "rectified_flow"

    def _alpha(self, t):
        return 1 - t

    def _t_from_edm_sigma(self, s):
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1 + s))

    def _sigma(self, t):
        return t.clone()

    def _d_alpha(self, t):
        return -torch.ones_like(t)

    def _d_sigma(self, t):
        return torch.ones_like(t)

    def __repr__(self):
        return "RectifiedFlow()"


class TrigFlow(Process):
    """TrigFlow (handbook Sec. 2.5, Lu & Song 2024): ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``.

    In our ``alpha, sigma`` form with a standard ``eps``: ``alpha = cos t``, ``sigma = sigma_d sin t``,
    ``t in [0, pi/2]``, prior ``N(0, sigma_d^2 I)``.
    """

    name = "trigflow"

    def __init__(self, sigma_data: float = 0.5):
        if not (_finite_number(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data={sigma_data!r} must be a positive finite number (TrigFlow uses 0.5)")
        self.sigma_data = float(sigma_data)
        self.t_max = math.pi / 2
        self.prior_std = self.sigma_data

    def _cos(self, t):
        # float64 cos(pi/2) is 6e-17, not 0: the end point is the prior, alpha(t_max) = 0 exactly
        return torch.where(t >= self.t_max, torch.zeros_like(t), torch.cos(t).clamp(min=0.0))

    def _alpha(self, t):
        return self._cos(t)

    def _t_from_edm_sigma(self, s):
        return torch.atan(s / self.sigma_data)

    def _sigma(self, t):
        return self.sigma_data * torch.where(t >= self.t_max, torch.ones_like(t), torch.sin(t))

    def _d_alpha(self, t):
        return -torch.where(t >= self.t_max, torch.ones_like(t), torch.sin(t))

    def _d_sigma(self, t):
        return self.sigma_data * self._cos(t)

    def __repr__(self):
        return f"TrigFlow(sigma_data={self.sigma_data:g})"


PROCESSES = {"ddpm": DDPM, "vp": VP, "ve": VE, "edm": VE, "rectified_flow": RectifiedFlow,
             "rf": RectifiedFlow, "trigflow": TrigFlow}


def make_process(name: str, **kwargs) -> Process:
    """Build a process by name (``ddpm``, ``vp``, ``ve``/``edm``, ``rectified_flow``/``rf``, ``trigflow``)."""
    check_choice("process name", name, sorted(PROCESSES))
    return PROCESSES[name](**kwargs)
