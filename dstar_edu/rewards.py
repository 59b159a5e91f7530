"""Reward models ``r(x, cond) -> (batch,)`` for reward fine-tuning and preference alignment.

The contract (DI* Sec. 3 "Problem Setup": a known reward ``r(x0, c)``; handbook Sec. 3.3: ``R(x)``)::

    r = reward(x, cond)        # x: (batch, *shape); cond: whatever the reward needs (label, prompts) or None
    r.shape == (batch,)        # one scalar per sample, differentiable in x where reward.differentiable

Every reward is an ``nn.Module`` (its parameters move with ``.to()``), validates its input and raises
``ValueError`` naming the argument on bad input, and ``FloatingPointError`` when it produces NaN/inf.

* Analytic teaching rewards (any dimension; inputs are flattened per sample): ``RegionReward`` (a
  preferred region, a smooth indicator), ``ClassReward`` (a preferred class: the log-likelihood ratio
  ``log p(x|c) - log p(x)`` of a class-conditional mixture, i.e. the CFG implicit reward of DI* Eq.
  3.7 / Luo talk Eq. 3.8 at one time), ``AestheticReward`` (a smooth saturating "aesthetic" score, a
  linear probe through ``tanh`` like the LAION aesthetic head), and the closed-form ``LinearReward`` /
  ``QuadraticReward`` used by the exact theorem checks.
* ``NegatedReward``: Diffusion-NPO's one-line change ``R_NPO = 1 - R`` (Wang talk).
* ``BradleyTerryReward``: a small MLP trained from pairwise preferences with the Bradley-Terry
  likelihood ``P(a > b) = sigmoid(r(a) - r(b))`` (Wang talk, DPO slide); ``sample_preferences`` draws
  synthetic preferences from a ground-truth reward.
* ``CLIPReward``: a PickScore-style image/text reward ``logit_scale.exp() * cos(image_emb, text_emb)``
  around a transformers ``CLIPModel`` + tokenizer; resizing and normalisation are done in torch (no
  torchvision), so the reward is differentiable with respect to the pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .validation import check_finite, check_int, check_type

Tensor = torch.Tensor

__all__ = ["Reward", "RegionReward", "ClassReward", "AestheticReward", "LinearReward", "QuadraticReward",
           "NegatedReward", "BradleyTerryReward", "sample_preferences", "bradley_terry_loss",
           "fit_bradley_terry", "pairwise_accuracy", "CLIPReward", "CLIP_MEAN", "CLIP_STD", "tiny_clip_reward",
           "TINY_VOCAB"]

#: OpenAI CLIP image normalisation (the ``CLIPImageProcessor`` defaults, also PickScore's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_x(x, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = type(x).__name__ + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else "")
        raise ValueError(f"{name} must be a floating-point tensor of shape (batch, *shape), got {got}")
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch, *shape) with batch >= 1, got shape {tuple(x.shape)}")
    return x


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _as_vector(v, name: str, dim: int | None = None) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be a non-empty finite vector, got {v.tolist()[:8]}")
    if dim is not None and v.numel() != dim:
        raise ValueError(f"{name} has {v.numel()} entries, expected {dim}")
    return v


def _positive(v, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={v!r} must be a positive number") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name}={v!r} must be a positive finite number")
    return f


class Reward(nn.Module):
    """Base class: subclasses implement ``reward(x, cond) -> (batch,)``; ``forward`` validates around it."""

    #: whether ``r`` is differentiable in ``x`` (ReFL, DRaFT, QSM, DI++, DI* need it; DDPO, DRWR do not)
    differentiable: bool = True

    def reward(self, x: Tensor, cond=None) -> Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement reward(x, cond)")

    def forward(self, x: Tensor, cond=None) -> Tensor:
        x = _check_x(x)
        r = self.reward(x, cond)
        if r.shape != (x.shape[0],):
            raise ValueError(f"{type(self).__name__} returned shape {tuple(r.shape)}; a reward must return "
                             f"one value per sample, shape ({x.shape[0]},)")
        if not bool(torch.isfinite(r.detach()).all()):
            raise FloatingPointError(f"{type(self).__name__} produced non-finite rewards "
                                     f"({int((~torch.isfinite(r.detach())).sum())} of {r.numel()})")
        return r

    def grad(self, x: Tensor, cond=None) -> Tensor:
        """``grad_x r(x, cond)`` per sample (shape of ``x``), without a graph (used by QSM, checks)."""
        if not self.differentiable:
            raise ValueError(f"{type(self).__name__} is not differentiable; allowed: a differentiable reward")
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self(xx, cond).sum(), xx)
        return g


class LinearReward(Reward):
    """``r(x) = <w, x> + b`` (any dimension; ``w`` has ``prod(shape)`` entries). Exact checks use it."""

    def __init__(self, w, b: float = 0.0):
        super().__init__()
        self.register_buffer("w", _as_vector(w, "w"))
        check_finite("b", b)
        self.b = float(b)

    def reward(self, x, cond=None):
        xf = _flat(x)
        if xf.shape[1] != self.w.numel():
            raise ValueError(f"x has {xf.shape[1]} entries per sample but w has {self.w.numel()}")
        return xf @ self.w.to(x.dtype) + self.b


class QuadraticReward(Reward):
    """``r(x) = -||x - center||^2 / (2 scale^2)``: prefers samples near ``center`` (closed-form tests)."""

    def __init__(self, center, scale: float = 1.0):
        super().__init__()
        self.register_buffer("center", _as_vector(center, "center"))
        self.scale = _positive(scale, "scale")

    def reward(self, x, cond=None):
        xf = _flat(x)
        if xf.shape[1] != self.center.numel():
            raise ValueError(f"x has {xf.shape[1]} entries per sample but center has {self.center.numel()}")
        return -((xf - self.center.to(x.dtype)) ** 2).sum(1) / (2 * self.scale ** 2)


class RegionReward(Reward):
    """A preferred region: ``r(x) = sigmoid((radius - ||x - center||) / temperature)`` in (0, 1).

    About 1 inside the ball ``||x - center|| < radius``, about 0 far outside, smooth across the
    boundary (width ``temperature``), so its gradient exists everywhere (ReFL, DRaFT, DI*).
    """

    def __init__(self, center, radius: float, temperature: float = 0.1):
        super().__init__()
        self.register_buffer("center", _as_vector(center, "center"))
        self.radius = _positive(radius, "radius")
        self.temperature = _positive(temperature, "temperature")

    def reward(self, x, cond=None):
        xf = _flat(x)
        if xf.shape[1] != self.center.numel():
            raise ValueError(f"x has {xf.shape[1]} entries per sample but center has {self.center.numel()}")
        # sqrt(r + tiny) keeps the gradient finite at x = center
        dist = torch.sqrt(((xf - self.center.to(x.dtype)) ** 2).sum(1) + 1e-12)
        return torch.sigmoid((self.radius - dist) / self.temperature)


class AestheticReward(Reward):
    """A smooth "aesthetic" score: ``r(x) = tanh((<w, x> - offset) / scale)`` with unit ``w``.

    Like the LAION aesthetic predictor (a probe on features), it prefers one direction of the data
    space and saturates, so pushing further brings no more reward; in 2D it prefers a half-plane.
    """

    def __init__(self, direction, offset: float = 0.0, scale: float = 1.0):
        super().__init__()
        w = _as_vector(direction, "direction")
        n = float(w.norm())
        if n == 0:
            raise ValueError("direction must be a non-zero vector")
        self.register_buffer("w", w / n)
        self.offset = float(offset)
        self.scale = _positive(scale, "scale")

    def reward(self, x, cond=None):
        xf = _flat(x)
        if xf.shape[1] != self.w.numel():
            raise ValueError(f"x has {xf.shape[1]} entries per sample but direction has {self.w.numel()}")
        return torch.tanh((xf @ self.w.to(x.dtype) - self.offset) / self.scale)


class ClassReward(Reward):
    """A preferred class: ``r(x) = log p_t(x | label) - log p_t(x)`` of a class-conditional mixture.

    This is ``log p(label | x) - log p(label)`` (Bayes), the classifier that classifier guidance adds,
    and at diffusion time ``t`` it is the integrand of the CFG implicit reward (DI* Eq. 3.7, Luo talk
    Eq. 3.8): ``grad_x r = s(x | label) - s(x)``, the CFG direction. ``t=None`` scores clean samples.
    ``cond`` may override the label per call (an int or a (batch,) tensor of labels).
    """

    def __init__(self, mixture, label: int, t=None):
        super().__init__()
        labels = getattr(mixture, "labels", None)
        if labels is None:
            raise ValueError("mixture must be class-conditional (a GaussianMixture built with labels=...)")
        allowed = sorted(set(labels.tolist()))
        if int(label) not in allowed:
            raise ValueError(f"label={label!r} is not a class of the mixture; allowed: {allowed}")
        self.mixture, self.label, self.t = mixture, int(label), t

    def reward(self, x, cond=None):
        label = self.label if cond is None else cond
        return self.mixture.log_prob(x, self.t, label) - self.mixture.log_prob(x, self.t)


class NegatedReward(Reward):
    """Diffusion-NPO (Wang talk): ``R_NPO(x, c) = offset - R(x, c)`` (the talk's ``1 - R`` for R in [0, 1]).

    Training on the negated reward gives the *negative* model ``eps_neg`` used in place of the
    unconditional branch of CFG, ``(w + 1) eps_pos(x, c) - w eps_neg(x, c)``.
    """

    def __init__(self, base: Reward, offset: float = 1.0):
        super().__init__()
        check_type("base", base, Reward, "a dstar_edu Reward")
        self.base, self.offset = base, float(offset)
        self.differentiable = base.differentiable

    def reward(self, x, cond=None):
        return self.offset - self.base(x, cond)


# ---- Bradley-Terry reward model --------------------------------------------------------------------------
class BradleyTerryReward(Reward):
    """A small MLP reward ``r_phi(x)`` (input flattened) trained with the Bradley-Terry likelihood.

    Bradley-Terry (the DPO derivation in the Wang talk): ``P(a > b) = sigmoid(r(a) - r(b))``. A reward
    is identified only up to an additive constant; ``fit_bradley_terry`` trains it.
    """

    def __init__(self, dim: int, hidden: int = 64, depth: int = 2, generator: torch.Generator | None = None):
        super().__init__()
        dim = check_int("dim", dim, lo=1)
        hidden = check_int("hidden", hidden, lo=1)
        depth = check_int("depth", depth, lo=1)
        layers, d = [], dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        self.dim = dim
        if generator is not None:  # seeded initialisation (torch's default init draws from the global RNG)
            with torch.no_grad():
                for m in self.net:
                    if isinstance(m, nn.Linear):
                        bound = 1.0 / math.sqrt(m.in_features)
                        m.weight.copy_((torch.rand(m.weight.shape, generator=generator) * 2 - 1) * bound)
                        m.bias.copy_((torch.rand(m.bias.shape, generator=generator) * 2 - 1) * bound)

    def reward(self, x, cond=None):
        xf = _flat(x)
        if xf.shape[1] != self.dim:
            raise ValueError(f"x has {xf.shape[1]} entries per sample but this reward model takes dim={self.dim}")
        p = next(self.net.parameters())
        return self.net(xf.to(p.dtype)).squeeze(1).to(x.dtype)


def sample_preferences(reward: Reward, x_a: Tensor, x_b: Tensor, *, temperature: float = 1.0,
                       generator: torch.Generator | None = None, cond=None) -> Tensor:
    """Synthetic labels ``y = 1[a preferred over b]`` with ``P(y = 1) = sigmoid((r(a) - r(b)) / temperature)``.

    ``temperature -> 0`` gives noiseless labels from the ground-truth reward (Bradley-Terry model).
    """
    _check_x(x_a, "x_a")
    _check_x(x_b, "x_b")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a has shape {tuple(x_a.shape)} but x_b has shape {tuple(x_b.shape)}")
    temperature = _positive(temperature, "temperature")
    with torch.no_grad():
        p = torch.sigmoid((reward(x_a, cond) - reward(x_b, cond)) / temperature)
        u = torch.rand(p.shape, generator=generator, dtype=p.dtype)
    return (u < p).to(x_a.dtype)


def bradley_terry_loss(reward: Reward, x_a: Tensor, x_b: Tensor, prefs: Tensor, cond=None) -> Tensor:
    """Negative Bradley-Terry log-likelihood ``-mean[y log s(d) + (1 - y) log s(-d)]``, ``d = r(a) - r(b)``."""
    _check_x(x_a, "x_a")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a has shape {tuple(x_a.shape)} but x_b has shape {tuple(x_b.shape)}")
    prefs = torch.as_tensor(prefs, dtype=x_a.dtype)
    if prefs.shape != (x_a.shape[0],) or bool(((prefs < 0) | (prefs > 1)).any()):
        raise ValueError(f"prefs must be a ({x_a.shape[0]},) tensor of probabilities/labels in [0, 1]")
    d = reward(x_a, cond) - reward(x_b, cond)
    loss = -(prefs * F.logsigmoid(d) + (1 - prefs) * F.logsigmoid(-d)).mean()
    if not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError("bradley_terry_loss is not finite; lower the learning rate")
    return loss


def fit_bradley_terry(model: BradleyTerryReward, x_a: Tensor, x_b: Tensor, prefs: Tensor, *, steps: int = 500,
                      lr: float = 1e-2, batch_size: int = 256, weight_decay: float = 0.0,
                      generator: torch.Generator | None = None) -> list[float]:
    """Train ``model`` on preference pairs with Adam (minibatches drawn with ``generator``); returns the losses."""
    steps = check_int("steps", steps, lo=1)
    batch_size = check_int("batch_size", batch_size, lo=1)
    opt = torch.optim.Adam(model.parameters(), lr=_positive(lr, "lr"), weight_decay=weight_decay)
    n, losses = x_a.shape[0], []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss = bradley_terry_loss(model, x_a[idx], x_b[idx], prefs[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def pairwise_accuracy(reward: Reward, truth: Reward, x: Tensor, n_pairs: int = 2000,
                      generator: torch.Generator | None = None) -> float:
    """Share of random pairs of ``x`` that ``reward`` orders like ``truth`` (ties in truth skipped)."""
    n = x.shape[0]
    i = torch.randint(0, n, (n_pairs,), generator=generator)
    j = torch.randint(0, n, (n_pairs,), generator=generator)
    with torch.no_grad():
        r, t = reward(x), truth(x)
    dt = t[i] - t[j]
    keep = dt != 0
    return float(((r[i] - r[j])[keep].sign() == dt[keep].sign()).double().mean())


# ---- CLIP / PickScore-style image reward ----------------------------------------------------------------
class CLIPReward(Reward):
    """PickScore-style reward ``logit_scale.exp() * cos(E_img(x), E_txt(c))`` with a transformers CLIPModel.

    Args:
        model: a ``transformers.CLIPModel`` (a tiny random one in tests, PickScore/CLIP weights in
            ``scaled_runs``). With ``freeze=True`` its parameters stop requiring gradients and it is put
            in eval mode (the reward is fixed; gradients still flow to the pixels).
        tokenizer: the matching tokenizer (e.g. ``CLIPTokenizer``); must have more than 2 tokens
            (an offline ``from_pretrained`` of an uncached hub id silently returns a 2-token one).
        image_size: side of the model's input (default ``model.config.vision_config.image_size``).
        input_range: range of the pixels given to the reward (default ``(-1, 1)``, diffusion images).
        mean, std: per-channel normalisation after mapping to [0, 1] (CLIP's defaults).
        use_logit_scale: multiply the cosine by ``logit_scale.exp()`` (PickScore); else the plain cosine.

    ``cond``: a prompt string, a list of ``batch`` prompts (or one prompt for all), or already
    tokenized ``input_ids`` (``(batch, L)`` or ``(1, L)`` tensor). Images ``(batch, C, H, W)`` are resized
    in torch like ``CLIPImageProcessor`` (shortest side to ``image_size`` with bicubic antialiasing,
    then a centre crop) and normalised; the whole path is differentiable.
    """

    def __init__(self, model, tokenizer, *, image_size: int | None = None, input_range=(-1.0, 1.0),
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, use_logit_scale: bool = True,
                 max_length: int | None = None, freeze: bool = True):
        super().__init__()
        for attr in ("get_image_features", "get_text_features", "logit_scale"):
            if not hasattr(model, attr):
                raise ValueError(f"model must be a transformers CLIPModel-like module (missing .{attr}), "
                                 f"got {type(model).__name__}")
        try:
            n_tok = len(tokenizer)
        except TypeError:
            raise ValueError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}") from None
        if n_tok <= 2:
            raise ValueError(f"tokenizer has len(tokenizer)={n_tok} <= 2 tokens: it is broken (an offline "
                             "from_pretrained of an uncached hub id returns such a tokenizer); build it from a "
                             "vocab.json + merges.txt or download it first")
        self.model, self.tokenizer = model, tokenizer
        if freeze:
            model.requires_grad_(False)
            model.eval()
        vcfg = getattr(getattr(model, "config", None), "vision_config", None)
        self.image_size = int(image_size if image_size is not None else getattr(vcfg, "image_size", 224))
        self.num_channels = int(getattr(vcfg, "num_channels", len(mean)))
        if len(mean) != self.num_channels or len(std) != self.num_channels:
            raise ValueError(f"mean and std need {self.num_channels} entries (the model's channels), "
                             f"got {len(mean)} and {len(std)}")
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ValueError(f"input_range={input_range!r} must be (low, high) with high > low")
        self.input_range = (lo, hi)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).reshape(1, -1, 1, 1))
        self.use_logit_scale = bool(use_logit_scale)
        self.max_length = max_length if max_length is not None else getattr(tokenizer, "model_max_length", 77)
        if self.max_length is None or self.max_length > 10_000:  # tokenizers without a limit report 1e30
            self.max_length = 77

    # ---- pieces (public so tests and notebooks can look inside) --------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """Pixels in ``input_range`` -> the model's normalised ``pixel_values`` (differentiable)."""
        if images.ndim != 4 or images.shape[1] != self.num_channels:
            raise ValueError(f"images must have shape (batch, {self.num_channels}, H, W), got {tuple(images.shape)}")
        lo, hi = self.input_range
        x = (images - lo) / (hi - lo)
        H, W = x.shape[-2:]
        S = self.image_size
        if (H, W) != (S, S):
            scale = S / min(H, W)
            h, w = max(S, round(H * scale)), max(S, round(W * scale))
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
            top, left = (h - S) // 2, (w - S) // 2
            x = x[:, :, top:top + S, left:left + S]
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _features(self, out) -> Tensor:
        # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding
        return out if isinstance(out, Tensor) else out.pooler_output

    def tokenize(self, prompts, batch: int) -> dict:
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, Tensor):
            ids = prompts.long()
            if ids.ndim != 2 or ids.shape[0] not in (1, batch):
                raise ValueError(f"cond as input_ids must have shape (1 or {batch}, L), got {tuple(ids.shape)}")
            return {"input_ids": ids}
        if isinstance(prompts, dict):
            return prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"cond must be a prompt string, a list of strings, a tokenized dict or input_ids; "
                             f"got {type(prompts).__name__}")
        if len(prompts) not in (1, batch):
            raise ValueError(f"cond has {len(prompts)} prompts for a batch of {batch}; allowed: 1 or {batch}")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok.get("attention_mask")}

    def text_embeddings(self, prompts, batch: int = 1) -> Tensor:
        """Unit-norm text embeddings, shape ``(n_prompts, d)``."""
        device = self.mean.device
        tok = {k: v.to(device) for k, v in self.tokenize(prompts, batch).items() if v is not None}
        emb = self._features(self.model.get_text_features(**tok))
        return emb / emb.norm(dim=-1, keepdim=True)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings, shape ``(batch, d)``."""
        p = next(self.model.parameters())
        emb = self._features(self.model.get_image_features(pixel_values=self.preprocess(images).to(p.dtype)))
        return emb / emb.norm(dim=-1, keepdim=True)

    def reward(self, x, cond=None):
        if cond is None:
            raise ValueError("CLIPReward needs cond: the prompt(s) to score the images against")
        img = self.image_embeddings(x)
        txt = self.text_embeddings(cond, x.shape[0]).to(img.dtype)
        cos = (img * txt).sum(-1)
        if self.use_logit_scale:
            cos = self.model.logit_scale.exp().to(cos.dtype) * cos
        return cos.to(x.dtype)


#: words of the offline tokenizer built by ``tiny_clip_reward``
TINY_VOCAB = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "car", "house", "painting", "sky")


def tiny_clip_reward(workdir, *, words: Sequence[str] = TINY_VOCAB, image_size: int = 16, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> CLIPReward:
    """A randomly initialised tiny ``CLIPModel`` + an offline byte-level ``CLIPTokenizer`` as a ``CLIPReward``.

    For tests, notebooks and CPU smoke runs (the real PickScore weights are for ``scaled_runs``). The
    tokenizer is built from a ``vocab.json`` + ``merges.txt`` written to ``workdir`` for ``words`` (every
    character and every listed word is a token; other words fall back to characters). Seeded; ~80k
    parameters; the global RNG state is restored.
    """
    import json
    from pathlib import Path
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    if not words or not all(isinstance(w, str) and w.isalpha() and w.islower() for w in words):
        raise ValueError(f"words={words!r} must be a non-empty list of lower-case alphabetic words")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for w in words:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merges.append(f"{toks[0]} {toks[1]}")
            vocab.setdefault(toks[0] + toks[1], len(vocab))
            toks = [toks[0] + toks[1]] + toks[2:]
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    max_len = 16
    tokenizer = CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=max_len)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=max_len, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    finally:
        torch.random.set_rng_state(state)
    return CLIPReward(model.to(dtype), tokenizer)
