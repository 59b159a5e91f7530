"""Rewards r(x, cond) -> (batch,): analytic 2D rewards, the Bradley-Terry reward model and the CLIP adapter."""
import json
import math

import pytest
import torch

from dstar_edu.process import DDPM
from dstar_edu.rewards import (AestheticReward, BradleyTerryReward, CLIPReward, ClassReward, LinearReward,
                               NegatedReward, QuadraticReward, RegionReward, bradley_terry_loss, fit_bradley_terry,
                               pairwise_accuracy, sample_preferences)
from toy_data.mixtures import GaussianMixture

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _fd_grad(fn, x, h=1e-5):
    """Central finite differences of sum(fn(x)) (each sample's reward depends on its own x only)."""
    g = torch.zeros_like(x)
    flat = x.reshape(x.shape[0], -1)
    for j in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, j] = h
        g.reshape(x.shape[0], -1)[:, j] = (fn((flat + e).reshape(x.shape)) - fn((flat - e).reshape(x.shape))) / (2 * h)
    return g


def _mixture():
    means = torch.tensor([[-1.5, 0.0], [-1.0, 1.2], [1.2, 0.3], [1.0, -1.1]], dtype=F64)
    return GaussianMixture(means, 0.1, torch.tensor([0.3, 0.2, 0.25, 0.25], dtype=F64),
                           labels=torch.tensor([0, 0, 1, 1]), process=DDPM(1000))


ANALYTIC = [
    lambda: RegionReward([1.0, 0.5], radius=0.7, temperature=0.2),
    lambda: AestheticReward([1.0, 2.0], offset=0.3, scale=0.8),
    lambda: LinearReward([0.5, -1.0], b=0.2),
    lambda: QuadraticReward([0.3, -0.2], scale=0.7),
    lambda: ClassReward(_mixture(), 1),
    lambda: ClassReward(_mixture(), 0, t=300.0),
    lambda: NegatedReward(RegionReward([0.0, 0.0], radius=1.0)),
]


@pytest.mark.parametrize("make", ANALYTIC)
def test_analytic_rewards_shape_and_gradient_match_finite_differences(make):
    r = make()
    x = 1.2 * torch.randn(7, 2, generator=_g(0), dtype=F64)
    out = r(x)
    assert out.shape == (7,) and out.dtype == F64
    # central differences: truncation h^2 f''' / 6 and rounding eps |f| / h, both < 1e-8 here
    torch.testing.assert_close(r.grad(x), _fd_grad(r, x), rtol=1e-6, atol=1e-7)


def test_rewards_take_images_too():
    x = torch.randn(3, 3, 8, 8, generator=_g(1), dtype=F64)
    w = torch.randn(3 * 8 * 8, generator=_g(2), dtype=F64)
    assert LinearReward(w)(x).shape == (3,)
    torch.testing.assert_close(LinearReward(w)(x), x.reshape(3, -1) @ w)
    assert AestheticReward(w)(x).abs().max() < 1


def test_region_reward_prefers_its_region():
    r = RegionReward([1.0, 1.0], radius=0.5, temperature=0.05)
    v = r(torch.tensor([[1.0, 1.0], [1.2, 1.0], [3.0, 3.0]], dtype=F64))
    assert v[0] > 0.99 and v[1] > 0.99 and v[2] < 1e-6


def test_class_reward_is_log_posterior_ratio_and_cfg_direction():
    """r = log p(c|x) - log p(c) (via the responsibilities: an independent route), grad r = s(x|c) - s(x)."""
    mix = _mixture()
    x = torch.randn(9, 2, generator=_g(3), dtype=F64)
    for t in (None, 250.0):
        r = ClassReward(mix, 1, t=t)
        resp = mix.responsibilities(x, t)
        expected = torch.log(resp[:, 2:].sum(1)) - math.log(0.5)
        torch.testing.assert_close(r(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r.grad(x), mix.score(x, t, 1) - mix.score(x, t), rtol=1e-10, atol=1e-12)
    # cond overrides the label
    torch.testing.assert_close(ClassReward(mix, 1)(x, 0), ClassReward(mix, 0)(x))


def test_negated_reward_is_npo():
    base = RegionReward([0.0, 0.0], radius=1.0)
    x = torch.randn(5, 2, generator=_g(4), dtype=F64)
    torch.testing.assert_close(NegatedReward(base)(x), 1 - base(x))
    torch.testing.assert_close(NegatedReward(base, offset=0.0)(x), -base(x))


def test_reward_errors_name_the_argument():
    with pytest.raises(ValueError, match="radius"):
        RegionReward([0.0, 0.0], radius=-1.0)
    with pytest.raises(ValueError, match="center"):
        RegionReward([0.0, 0.0, 0.0], radius=1.0)(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, \*shape\)"):
        LinearReward([1.0, 2.0])(torch.zeros(2))
    with pytest.raises(ValueError, match="floating-point"):
        LinearReward([1.0, 2.0])(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="label"):
        ClassReward(_mixture(), 7)
    with pytest.raises(ValueError, match="class-conditional"):
        ClassReward(GaussianMixture(torch.zeros(2, 2), 1.0), 0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        LinearReward([1.0, 2.0])(torch.tensor([[float("nan"), 0.0]]))


def test_sample_preferences_follow_bradley_terry():
    """Frequency of 'a preferred' for a fixed pair vs sigmoid((r_a - r_b)/tau), within 5 standard errors."""
    r = LinearReward([1.0, 0.0])
    n = 20000
    x_a = torch.tensor([[0.3, 0.0]], dtype=F64).expand(n, 2)
    x_b = torch.tensor([[-0.2, 0.0]], dtype=F64).expand(n, 2)
    y = sample_preferences(r, x_a, x_b, temperature=0.7, generator=_g(5))
    p = 1 / (1 + math.exp(-0.5 / 0.7))
    assert abs(float(y.mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_bradley_terry_loss_value():
    r = LinearReward([1.0, 0.0])
    x_a = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    x_b = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=F64)
    y = torch.tensor([1.0, 0.0], dtype=F64)
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(-2)))) / 2
    assert abs(float(bradley_terry_loss(r, x_a, x_b, y)) - expected) < 1e-14
    with pytest.raises(ValueError, match="prefs"):
        bradley_terry_loss(r, x_a, x_b, torch.tensor([2.0, 0.0]))


def test_bradley_terry_reward_recovers_the_ranking():
    """An MLP fitted to 4000 noisy synthetic preferences orders held-out points like the ground truth."""
    truth = AestheticReward([1.0, 1.0], scale=1.5)
    g = _g(6)
    x_a = 1.5 * torch.randn(4000, 2, generator=g, dtype=torch.float32)
    x_b = 1.5 * torch.randn(4000, 2, generator=g, dtype=torch.float32)
    prefs = sample_preferences(truth, x_a, x_b, temperature=0.05, generator=g)
    model = BradleyTerryReward(2, hidden=32, depth=2, generator=_g(7))
    x_test = 1.5 * torch.randn(1000, 2, generator=_g(8))
    acc_before = pairwise_accuracy(model, truth, x_test, generator=_g(9))
    losses = fit_bradley_terry(model, x_a, x_b, prefs, steps=300, lr=1e-2, batch_size=512, generator=g)
    acc_after = pairwise_accuracy(model, truth, x_test, generator=_g(9))
    assert losses[-1] < losses[0]
    assert acc_after > 0.95, (acc_before, acc_after)
    assert acc_after > acc_before + 0.05


# ---- CLIP / PickScore-style reward ------------------------------------------------------------------------
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "painting"]


def _tiny_tokenizer(tmp_path):
    """A byte-level CLIPTokenizer from a small vocab.json + merges.txt written here (no download)."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = sorted(set("".join(WORDS)))
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = ["#version: 0.2"]
    for w in WORDS:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merges.append(f"{toks[0]} {toks[1]}")
            vocab.setdefault(toks[0] + toks[1], len(vocab))
            toks = [toks[0] + toks[1]] + toks[2:]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=12)


def _tiny_clip(vocab_size):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    return CLIPModel(cfg).double().eval()


@pytest.fixture(scope="module")
def clip_reward(tmp_path_factory):
    tok = _tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    assert len(tok) > 2
    return CLIPReward(_tiny_clip(len(tok)), tok)


def test_clip_reward_is_pickscore_of_the_model(clip_reward):
    """reward = diag(logits_per_image) of CLIPModel.forward = logit_scale.exp() * cos(image, text)."""
    x = torch.rand(3, 3, 16, 16, generator=_g(10), dtype=F64) * 2 - 1
    prompts = ["a photo of a cat", "a red car", "a blue painting of a dog"]
    r = clip_reward(x, prompts)
    tok = clip_reward.tokenize(prompts, 3)
    out = clip_reward.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                            pixel_values=clip_reward.preprocess(x))
    torch.testing.assert_close(r, torch.diagonal(out.logits_per_image), rtol=1e-12, atol=1e-12)
    # one prompt broadcasts to the batch
    torch.testing.assert_close(clip_reward(x, "a red car"), clip_reward(x, ["a red car"] * 3))
    # plain cosine without the logit scale
    cos = CLIPReward(clip_reward.model, clip_reward.tokenizer, use_logit_scale=False)(x, prompts)
    torch.testing.assert_close(r, clip_reward.model.logit_scale.exp() * cos)
    assert bool((cos.abs() <= 1 + 1e-12).all())


def test_clip_preprocess_matches_clip_image_processor(clip_reward):
    """Resize + centre crop + normalise in torch vs transformers' CLIPImageProcessor (PIL bicubic, uint8).

    The processor rounds the resized image to uint8 (half a grey level) and PIL's bicubic filter is not
    torch's: agreement within two grey levels, 2/255 in [0, 1] units, i.e. 2/255/min(std) normalised."""
    from transformers import CLIPImageProcessor
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    img = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy), xx * yy * 2 - 1]).clamp(-1, 1)
    u8 = ((img + 1) / 2 * 255).round().byte()
    proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    ref = proc(images=u8.permute(1, 2, 0).numpy(), return_tensors="pt")["pixel_values"].double()
    mine = clip_reward.preprocess((u8.double() / 255 * 2 - 1)[None])
    assert mine.shape == ref.shape == (1, 3, 16, 16)
    assert float((mine - ref).abs().max()) < 2 / 255 / min(clip_reward.std.flatten().tolist())


def test_clip_reward_gradient_matches_finite_differences(clip_reward):
    x = (torch.rand(2, 3, 24, 20, generator=_g(11), dtype=F64) * 2 - 1).requires_grad_(True)
    r = clip_reward(x, "a photo of a dog")
    (g,) = torch.autograd.grad(r.sum(), x)
    v = torch.randn(x.shape, generator=_g(12), dtype=F64)
    h = 1e-5
    with torch.no_grad():
        fd = (clip_reward(x + h * v, "a photo of a dog") - clip_reward(x - h * v, "a photo of a dog")) / (2 * h)
    torch.testing.assert_close((g * v).reshape(2, -1).sum(1), fd, rtol=1e-6, atol=1e-8)
    # the reward model is frozen: no gradient to its parameters
    assert all(not p.requires_grad for p in clip_reward.model.parameters())


def test_clip_reward_errors(clip_reward):
    x = torch.zeros(2, 3, 16, 16, dtype=F64)
    with pytest.raises(ValueError, match="cond"):
        clip_reward(x)
    with pytest.raises(ValueError, match="images must have shape"):
        clip_reward(torch.zeros(2, 1, 16, 16, dtype=F64), "a cat")
    with pytest.raises(ValueError, match="prompts"):
        clip_reward(x, ["a cat", "a dog", "a car"])

    class Broken:
        def __len__(self):
            return 2
    with pytest.raises(ValueError, match="len\\(tokenizer\\)=2"):
        CLIPReward(clip_reward.model, Broken())
    with pytest.raises(ValueError, match="CLIPModel"):
        CLIPReward(torch.nn.Linear(2, 2), clip_reward.tokenizer)
