"""Diff-Instruct++ / Diff-Instruct* generator losses (theorems: align.* checks), and DI* on a diffusers UNet."""
import copy

import pytest
import torch

from dstar_edu.generators import AffineGaussianGenerator, MLPGenerator
from dstar_edu.objectives.alignment import (GuidedPredictor, cfg_implicit_reward, cfg_implicit_reward_loss,
                                            diff_instruct_pp_loss, diff_instruct_star_loss)
from dstar_edu.objectives.distill import diff_instruct_loss, fake_score_loss, sim_generator_loss
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import DDPM
from dstar_edu.rewards import RegionReward
from toy_data.mixtures import GaussianMixture

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _mixture():
    means = torch.tensor([[-1.5, 0.0], [-1.0, 1.2], [1.2, 0.3], [1.0, -1.1]], dtype=F64)
    return GaussianMixture(means, 0.1, torch.tensor([0.3, 0.2, 0.25, 0.25], dtype=F64),
                           labels=torch.tensor([0, 0, 1, 1]), process=DDPM(1000))


def _mlp(p, seed, classes=None):
    torch.manual_seed(seed)
    return MLPPredictor(p, "eps", 2, hidden=32, depth=2, num_classes=classes).double()


def _grads(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_guided_predictor_is_the_same_guidance_in_every_parameterisation():
    p = DDPM(1000)
    net = _mlp(p, 0, classes=2)
    x = torch.randn(6, 2, generator=_g(0), dtype=F64)
    t, c, w = 350.0, torch.tensor([0, 1, 1, 0, 1, 0]), 2.5
    guided = GuidedPredictor(net, w)
    from dstar_edu import exercises
    for target in ("eps", "score", "x0", "v", "velocity"):
        sc, su = net.predict(target, x, t, c), net.predict(target, x, t, None)
        torch.testing.assert_close(guided.predict(target, x, t, c), sc + w * (sc - su), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(guided.predict(target, x, t, c), exercises.reference("guided_score")(sc, su, w),
                                   rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cond"):
        guided(x, t)


def test_guided_mixture_is_the_score_of_the_tilted_density():
    """s_c + w (s_c - s_u) = grad log [p_t(x|c)^(1+w) / p_t(x)^w] (autograd of the exact log-densities)."""
    mix = _mixture()
    x = torch.randn(8, 2, generator=_g(1), dtype=F64).requires_grad_(True)
    t, w = 200.0, 1.7
    logp = (1 + w) * mix.log_prob(x, t, 1) - w * mix.log_prob(x, t)
    (ref,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(GuidedPredictor(mix, w)(x.detach(), t, 1), ref, rtol=1e-10, atol=1e-12)
    # the implicit reward's gradient is the CFG direction
    xr = x.detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(cfg_implicit_reward(mix, xr, t, 1).sum(), xr)
    torch.testing.assert_close(gr, mix.score(x.detach(), t, 1) - mix.score(x.detach(), t), rtol=1e-10, atol=1e-12)


def _setup(seed=0):
    p = DDPM(1000)
    ref = _mlp(p, seed, classes=2)
    fake = _mlp(p, seed + 1, classes=2)
    torch.manual_seed(seed + 2)
    gen = MLPGenerator(2, hidden=32, depth=2).double()
    g = _g(seed + 3)
    z = gen.noise(32, g)
    t = torch.randint(20, 980, (32,), generator=g).to(F64)
    eps = torch.randn(32, 2, generator=g, dtype=F64)
    return p, ref, fake, gen, z, t, eps


def test_distar_without_reward_and_cfg_is_sim():
    """DI* reuses SIM's generator loss: with alpha_rew = alpha_cfg = 0 it *is* sim_generator_loss."""
    p, ref, fake, gen, z, t, eps = _setup()
    params = list(gen.parameters())
    for dist, c in (("pseudo_huber", 0.3), ("l2", None)):
        a = diff_instruct_star_loss(gen(z), ref, fake, t, alpha_rew=0.0, distance=dist, c=c, eps=eps, cond=1)
        b = sim_generator_loss(gen(z), ref, fake, t, distance=dist, c=c, eps=eps, cond=1)
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(_grads(a, params), _grads(b, params), rtol=1e-12, atol=1e-14)


def test_dipp_without_reward_and_cfg_is_diff_instruct():
    p, ref, fake, gen, z, t, eps = _setup(1)
    params = list(gen.parameters())
    a = diff_instruct_pp_loss(gen(z), ref, fake, t, alpha_rew=0.0, eps=eps, cond=0)
    b = diff_instruct_loss(gen(z), ref, fake, t, eps=eps, cond=0)
    torch.testing.assert_close(_grads(a, params), _grads(b, params), rtol=1e-12, atol=1e-14)


def test_dipp_cfg_in_and_out_agree_but_distar_in_and_out_differ():
    """Under KL the enhanced reference and the implicit reward give one gradient (Thm 3.3, any reference);
    under the pseudo-Huber score divergence they do not (d' is nonlinear)."""
    p, ref, fake, gen, z, t, eps = _setup(2)
    params = list(gen.parameters())
    kw = dict(alpha_rew=0.0, alpha_cfg=3.0, eps=eps, cond=1)
    g_in = _grads(diff_instruct_pp_loss(gen(z), ref, fake, t, cfg="in", **kw), params)
    g_out = _grads(diff_instruct_pp_loss(gen(z), ref, fake, t, cfg="out", **kw), params)
    torch.testing.assert_close(g_in, g_out, rtol=1e-10, atol=1e-12)
    s_in = _grads(diff_instruct_star_loss(gen(z), ref, fake, t, cfg="in", c=0.3, **kw), params)
    s_out = _grads(diff_instruct_star_loss(gen(z), ref, fake, t, cfg="out", c=0.3, **kw), params)
    assert float((s_in - s_out).abs().max()) > 1e-3 * float(s_in.abs().max())


def test_reward_term_adds_minus_alpha_times_the_reward_gradient():
    p, ref, fake, gen, z, t, eps = _setup(3)
    R = RegionReward([1.0, 0.0], radius=0.8, temperature=0.3)
    x0 = gen(z).detach().requires_grad_(True)
    for fn in (diff_instruct_star_loss, diff_instruct_pp_loss):
        with_r = torch.autograd.grad(fn(x0, ref, fake, t, reward=R, alpha_rew=4.0, eps=eps, cond=1), x0)[0]
        without = torch.autograd.grad(fn(x0, ref, fake, t, reward=R, alpha_rew=0.0, eps=eps, cond=1), x0)[0]
        torch.testing.assert_close(with_r - without, -4.0 * R.grad(x0) / x0.shape[0], rtol=1e-10, atol=1e-13)
    loss, parts = diff_instruct_star_loss(x0, ref, fake, t, reward=R, alpha_rew=4.0, alpha_cfg=1.0, cfg="out",
                                          eps=eps, cond=1, return_parts=True)
    assert set(parts) == {"divergence", "cfg", "reward"}
    assert abs(sum(parts.values()) - float(loss.detach())) < 1e-12
    assert abs(parts["reward"] + 4.0 * float(R(x0).mean().detach())) < 1e-12


def test_cfg_loss_sign_moves_samples_towards_the_condition():
    """One gradient step on the (corrected) CFG loss raises the exact implicit reward log p_t(x|c)/p_t(x)."""
    mix = _mixture()
    gen = AffineGaussianGenerator(2)
    g = _g(4)
    z = gen.noise(256, g)
    eps = torch.randn(256, 2, generator=g, dtype=F64)
    t = torch.full((256,), 300.0, dtype=F64)

    def implicit_reward():
        with torch.no_grad():
            x0 = gen(z)
            a, s = mix.process.coefficients(t, x0)
            return float(cfg_implicit_reward(mix, a * x0 + s * eps, t, 1).mean())
    before = implicit_reward()
    loss = cfg_implicit_reward_loss(gen(z), mix, t, cond=1, eps=eps)
    grads = torch.autograd.grad(loss, list(gen.parameters()))
    with torch.no_grad():
        for q, gr in zip(gen.parameters(), grads):
            q.sub_(0.01 * gr)
    assert implicit_reward() > before


def test_alignment_errors():
    p, ref, fake, gen, z, t, eps = _setup(5)
    x0 = gen(z)
    with pytest.raises(ValueError, match="cfg='sideways'"):
        diff_instruct_star_loss(x0, ref, fake, t, cfg="sideways", cond=1)
    with pytest.raises(ValueError, match="alpha_cfg=2.0 needs cond"):
        diff_instruct_star_loss(x0, ref, fake, t, alpha_cfg=2.0)
    with pytest.raises(ValueError, match="t is required"):
        diff_instruct_pp_loss(x0, ref, fake, None)
    with pytest.raises(ValueError, match="alpha_rew"):
        diff_instruct_pp_loss(x0, ref, fake, t, alpha_rew=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        diff_instruct_star_loss(x0, ref, fake, t, reward=lambda x, c: x.sum(), cond=1)
    with pytest.raises(ValueError, match="needs cond"):
        cfg_implicit_reward_loss(x0, ref, t, cond=None)
    with pytest.raises(FloatingPointError):
        diff_instruct_star_loss(x0, ref, fake, t, reward=lambda x, c: x[:, 0] * float("nan"), cond=1)


# ---- DI* with a tiny diffusers conditional UNet and the tiny CLIP reward ------------------------------------
def _tiny_cond_unet(seed):
    from diffusers import UNet2DConditionModel
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    torch.random.set_rng_state(state)
    return unet.double().eval()


class _TextGenerator(torch.nn.Module):
    """SIM's teacher-initialised one-step generator g(z, c) = D_copy(alpha* z, t*; c) with a text condition
    (``generators.TeacherInitGenerator`` has no condition argument): sigma* = 2.5 -> DDPM t* = 625."""

    def __init__(self, teacher, text):
        super().__init__()
        self.denoiser = copy.deepcopy(teacher).requires_grad_(True)
        self.text = text
        p = teacher.process
        self.t_star = 625.0
        self.alpha_star, self.sigma_star = float(p.alpha(self.t_star)), float(p.edm_sigma(self.t_star))

    def noise(self, n, generator):
        return self.sigma_star * torch.randn(n, 3, 16, 16, generator=generator, dtype=F64)

    def forward(self, z):
        t = torch.full((z.shape[0],), self.t_star, dtype=F64)
        return self.denoiser.predict("x0", self.alpha_star * z, t, self.text[: z.shape[0]])


def test_distar_runs_unchanged_on_a_diffusers_unet_with_a_clip_reward(tmp_path):
    """The same loss code on CIFAR-shaped tensors: teacher and fake are wrapped UNet2DConditionModels (text
    condition = encoder_hidden_states), the generator is SIM's teacher-initialised one-step model, the reward
    a tiny CLIP scoring the prompt (reward_cond differs from the networks' cond). Checks: (1) the loss's
    x0-gradient matches a central finite difference along a random direction (float64, the whole path UNet
    inputs + CLIP pixels); (2) the reward part of the gradient is -alpha_rew grad r / B; (3) three alternating
    fake / generator steps with a dominant reward raise the CLIP reward."""
    from dstar_edu.diffusers_interop import DiffusersUNetPredictor
    from dstar_edu.rewards import tiny_clip_reward
    p = DDPM(1000)
    teacher = DiffusersUNetPredictor(_tiny_cond_unet(0), p, "epsilon")
    fake = DiffusersUNetPredictor(_tiny_cond_unet(1), p, "epsilon")
    reward = tiny_clip_reward(tmp_path / "clip", dtype=F64)
    assert len(reward.tokenizer) > 2
    B = 2
    g = _g(6)
    text = torch.randn(1, 4, 8, generator=g, dtype=F64).expand(B, 4, 8)   # "prompt embedding" for the UNets
    null = torch.zeros(B, 4, 8, dtype=F64)
    prompt = "a photo of the red car"
    gen = _TextGenerator(teacher, text)
    kw = dict(reward=reward, alpha_cfg=1.5, cfg="in", cond=text, uncond=null, reward_cond=prompt)
    z = gen.noise(B, g)
    t = torch.tensor([300.0, 650.0], dtype=F64)
    eps = torch.randn(B, 3, 16, 16, generator=g, dtype=F64)

    x0 = gen(z).detach().requires_grad_(True)
    loss = diff_instruct_star_loss(x0, teacher, fake, t, alpha_rew=2.0, eps=eps, **kw)
    (grad,) = torch.autograd.grad(loss, x0)
    v = torch.randn(x0.shape, generator=g, dtype=F64)
    h = 1e-4
    with torch.no_grad():
        lp = diff_instruct_star_loss(x0 + h * v, teacher, fake, t, alpha_rew=2.0, eps=eps, **kw)
        lm = diff_instruct_star_loss(x0 - h * v, teacher, fake, t, alpha_rew=2.0, eps=eps, **kw)
    fd = (lp - lm) / (2 * h)
    torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-5, atol=1e-8)

    (grad0,) = torch.autograd.grad(diff_instruct_star_loss(x0, teacher, fake, t, alpha_rew=0.0, eps=eps, **kw), x0)
    xr = x0.detach().requires_grad_(True)
    (gr,) = torch.autograd.grad(reward(xr, prompt).sum(), xr)
    torch.testing.assert_close(grad - grad0, -2.0 * gr / B, rtol=1e-9, atol=1e-12)

    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3)
    with torch.no_grad():
        r_start = float(reward(gen(z), prompt).mean())
    for step in range(3):
        x_f = gen(gen.noise(B, g)).detach()
        lf = fake_score_loss(fake, x_f, generator=g, cond=text)
        opt_f.zero_grad()
        lf.backward()
        opt_f.step()
        tt = torch.randint(100, 900, (B,), generator=g).to(F64)
        lg = diff_instruct_star_loss(gen(z), teacher, fake, tt, alpha_rew=100.0, generator=g, **kw)
        opt_g.zero_grad()
        lg.backward()
        opt_g.step()
    with torch.no_grad():
        r_end = float(reward(gen(z), prompt).mean())
    assert r_end > r_start
    assert all(q.grad is None or float(q.grad.abs().max()) == 0 for q in teacher.parameters())
