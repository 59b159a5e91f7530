"""The alternating distillation loop: it distils (an affine generator reaches a Gaussian teacher's mean and
covariance), its bookkeeping, its error handling, and the same losses on a diffusers UNet at 3x32x32."""
import copy
import functools

import pytest
import torch

from dstar_edu.distillation import distill
from dstar_edu.generators import AffineGaussianGenerator, MLPGenerator, TeacherInitGenerator
from dstar_edu.objectives.distill import (diff_instruct_loss, dmd_loss, fgm_generator_loss, p_edm, p_sim,
                                          sid_generator_loss, sim_generator_loss, vsd_loss)
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VP
from toy_data.mixtures import GaussianMixture

F64 = torch.float64


M = torch.tensor([1.0, -0.5], dtype=F64)
S = torch.tensor([[0.30, 0.10], [0.10, 0.20]], dtype=F64)


def gaussian_teacher(process):
    return GaussianMixture(M[None], S[None], process=process)


def samplers(process):
    return dict(t_sampler_gen=p_sim(process, sigma_min=0.002, sigma_max=80.0),
                t_sampler_fake=p_edm(process, sigma_min=0.002, sigma_max=80.0))


@pytest.mark.parametrize("method", ["SIM", "SiD", "DI"])
def test_distillation_reaches_the_teacher_moments(method):
    """Affine generator (init N(0, I)) distilled from the exact teacher N(M, S) with a trained online score.

    Reference: the teacher's closed-form mean and covariance (the generator's are exact: mu and A A^T). At
    initialisation the errors are max|mu - M| = 1.0 and max|AA^T - S| = 0.8; after 300 steps both must be below
    0.1, a 10x reduction (measured: 0.007-0.047 over methods and two seeds)."""
    process = VP()
    torch.manual_seed(0)
    gen = AffineGaussianGenerator(2)
    fake = MLPPredictor(process, "v", dim=2, hidden=32, depth=2).double()
    loss = {"SIM": functools.partial(sim_generator_loss, distance="pseudo_huber", c=1e-3, space="x0"),
            "SiD": functools.partial(sid_generator_loss, alpha=1.2),
            "DI": functools.partial(diff_instruct_loss, space="x0")}[method]
    hist = distill(gen, gaussian_teacher(process), fake, loss, steps=300, lr_gen=1e-2, lr_fake=2e-3, batch_size=128,
                   fake_warmup=150, generator=torch.Generator().manual_seed(1), progress=False, **samplers(process))
    assert len(hist["gen_loss"]) == 300 and len(hist["fake_loss"]) == 450
    assert (gen.mu.detach() - M).abs().max() < 0.1
    assert (gen.covariance().detach() - S).abs().max() < 0.1


def test_bookkeeping_callback_stop_ema_and_reproducibility():
    process = VP()

    def run(stop_at=None):
        torch.manual_seed(0)
        gen = MLPGenerator(2, hidden=16, depth=1)
        fake = MLPPredictor(process, "v", dim=2, hidden=16, depth=1)
        calls = []

        def cb(step, g):
            calls.append(step)
            return {"stop": stop_at is not None and step >= stop_at, "mean": float(g.sample(8).detach().mean())}
        h = distill(gen, gaussian_teacher(process), fake, functools.partial(sid_generator_loss, alpha=1.2), steps=25,
                    fake_steps=2, lr_gen=1e-3, lr_fake=1e-3, batch_size=32, callback=cb, callback_every=10,
                    ema_decay=0.9, generator=torch.Generator().manual_seed(5), progress=False, **samplers(process))
        return h, calls, gen

    h, calls, gen = run()
    assert calls == [10, 20, 25]
    assert [m["step"] for m in h["metrics"]] == [10, 20, 25]
    assert len(h["gen_loss"]) == 25 and len(h["fake_loss"]) == 50 and len(h["gen_grad_norm"]) == 25
    assert h["ema"].num_updates == 25
    assert all(m["seconds"] <= h["seconds"] for m in h["metrics"])
    h2, _, gen2 = run()
    assert h2["gen_loss"] == h["gen_loss"] and h2["fake_loss"] == h["fake_loss"]        # same seed, same numbers
    assert all(torch.equal(a, b) for a, b in zip(gen.parameters(), gen2.parameters()))
    h3, calls3, _ = run(stop_at=20)
    assert calls3 == [10, 20] and len(h3["gen_loss"]) == 20


def test_teacher_is_never_updated_and_fake_is():
    process = VP()
    torch.manual_seed(1)
    teacher = MLPPredictor(process, "eps", dim=2, hidden=16)
    fake = copy.deepcopy(teacher)
    before_t = copy.deepcopy(teacher.state_dict())
    before_f = copy.deepcopy(fake.state_dict())
    gen = TeacherInitGenerator(teacher)
    distill(gen, teacher, fake, functools.partial(sim_generator_loss, distance="pseudo_huber", c=1e-3, space="x0"),
            steps=3, lr_gen=1e-3, lr_fake=1e-3, batch_size=16, progress=False, **samplers(process))
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(before_f[k], v) for k, v in fake.state_dict().items())


def test_nan_stops_with_the_step_and_phase():
    process = VP()
    calls = {"n": 0}

    def teacher_fn(x, t, c):
        calls["n"] += 1
        out = torch.zeros_like(x)
        return out * float("nan") if calls["n"] > 3 else out
    teacher = FunctionPredictor(teacher_fn, process, "eps")
    gen = MLPGenerator(2, hidden=8, depth=1)
    fake = MLPPredictor(process, "eps", dim=2, hidden=8, depth=1)
    before = copy.deepcopy(gen.state_dict())
    with pytest.raises(FloatingPointError, match="not finite"):
        distill(gen, teacher, fake, functools.partial(sim_generator_loss, distance="l2", space="x0"), steps=10,
                lr_gen=1e-3, lr_fake=1e-3, batch_size=8, progress=False, **samplers(process))
    # three clean generator steps happened, the fourth stopped before touching the weights
    assert calls["n"] == 4
    assert not all(torch.equal(before[k], v) for k, v in gen.state_dict().items())

    def exploding(x0, teacher, fake, t, generator=None, cond=None):
        return (x0 * float("inf")).sum()
    with pytest.raises(FloatingPointError, match="generator loss is (inf|nan) at step 0"):
        distill(gen, gaussian_teacher(process), fake, exploding, steps=2, lr_gen=1e-3, lr_fake=1e-3, batch_size=8,
                progress=False, **samplers(process))


def test_bad_arguments():
    process = VP()
    teacher = gaussian_teacher(process)
    gen = MLPGenerator(2, hidden=8, depth=1)
    fake = MLPPredictor(process, "eps", dim=2, hidden=8, depth=1)
    kw = dict(steps=2, lr_gen=1e-3, lr_fake=1e-3, batch_size=4, progress=False, **samplers(process))
    loss = functools.partial(sim_generator_loss, space="x0")
    with pytest.raises(ValueError, match="steps=0 must be a positive integer"):
        distill(gen, teacher, fake, loss, **{**kw, "steps": 0})
    with pytest.raises(ValueError, match="lr_gen=-1"):
        distill(gen, teacher, fake, loss, **{**kw, "lr_gen": -1})
    with pytest.raises(ValueError, match="betas="):
        distill(gen, teacher, fake, loss, betas=(0.9,), **kw)
    with pytest.raises(ValueError, match="fake is the teacher object itself"):
        distill(gen, fake, fake, loss, **kw)
    with pytest.raises(ValueError, match="an exact predictor cannot be trained"):
        distill(gen, teacher, gaussian_teacher(process), loss, **kw)
    with pytest.raises(ValueError, match="t_sampler_gen=0.5 must be a callable"):
        distill(gen, teacher, fake, loss, **{**kw, "t_sampler_gen": 0.5})
    with pytest.raises(ValueError, match="generator_model must be a dstar_edu generator"):
        distill(torch.nn.Linear(2, 2), teacher, fake, loss, **kw)


def test_same_losses_on_a_diffusers_unet_3x32x32():
    """SIM's image generator (teacher copy at sigma* = 2.5) and a few steps of every generator loss on a tiny UNet."""
    from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet
    process = DDPM(1000)
    teacher = DiffusersUNetPredictor(tiny_unet(), process, "epsilon")
    fake = copy.deepcopy(teacher)
    fake.requires_grad_(True)
    gen = TeacherInitGenerator(teacher)
    before_t = copy.deepcopy(teacher.state_dict())
    start = [p.detach().clone() for p in gen.parameters()]
    tg = p_sim(process, sigma_min=0.05, sigma_max=80.0)
    h = distill(gen, teacher, fake, functools.partial(sim_generator_loss, distance="pseudo_huber", space="x0"),
                steps=2, lr_gen=1e-4, lr_fake=1e-4, batch_size=2, t_sampler_gen=tg, t_sampler_fake="discrete",
                generator=torch.Generator().manual_seed(0), progress=False)
    assert len(h["gen_loss"]) == 2
    assert any(not torch.equal(a, b) for a, b in zip(start, gen.parameters()))
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    x0, t = gen.sample(2, torch.Generator().manual_seed(1)), tg(2, torch.Generator().manual_seed(2))
    for loss in (functools.partial(sim_generator_loss, distance="pseudo_huber", c=0.03),
                 functools.partial(sid_generator_loss, alpha=1.2), diff_instruct_loss, vsd_loss, dmd_loss,
                 fgm_generator_loss):
        out = loss(x0, teacher, fake, t, generator=torch.Generator().manual_seed(3))
        assert out.shape == () and torch.isfinite(out)
        (gr,) = torch.autograd.grad(out, [next(gen.parameters())], retain_graph=True)
        assert torch.isfinite(gr).all() and gr.abs().sum() > 0


def test_dmd_with_a_gan_term_sharing_the_fake_backbone():
    """DMD (handbook Sec. 3.2.4): the fake phase trains denoising + discriminator (head and shared backbone), the
    generator phase adds the non-saturating GAN term; the real samples come from the teacher's data."""
    from dstar_edu.objectives.distill import (FeatureDiscriminator, dmd_gan_discriminator_loss, dmd_loss,
                                              fake_score_loss)
    process = VP()
    teacher = gaussian_teacher(process)
    torch.manual_seed(3)
    gen = MLPGenerator(2, hidden=16, depth=1).double()
    fake = MLPPredictor(process, "v", dim=2, hidden=16, depth=2).double()
    disc = FeatureDiscriminator(fake, "blocks.1", features=16, hidden=8).double()
    head0 = [p.detach().clone() for p in disc.head.parameters()]
    tf = p_edm(process, sigma_min=0.002, sigma_max=80.0)

    def fake_loss(fk, x0, g):
        t = tf(x0.shape[0], g)
        real = teacher.sample(x0.shape[0], g)
        return (fake_score_loss(fk, x0, generator=g, t=t)
                + 0.1 * dmd_gan_discriminator_loss(x0, real, disc, t, process, generator=g))
    h = distill(gen, teacher, fake, functools.partial(dmd_loss, discriminator=disc, gan_weight=0.1), steps=3,
                lr_gen=1e-3, lr_fake=1e-3, batch_size=16, fake_loss_fn=fake_loss,
                fake_params=list(fake.parameters()) + list(disc.head.parameters()), progress=False, **samplers(process))
    assert len(h["gen_loss"]) == 3
    assert all(not torch.equal(a, b) for a, b in zip(head0, disc.head.parameters()))
