"""diffusers networks and schedulers through dstar_edu: conventions pinned against diffusers itself."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler,
                       UNet2DModel)

from dstar_edu.diffusers_interop import (DiffusersUNetPredictor, diffusers_ddim_transitions, edm_preconditioning,
                                         prediction_from_diffusers, process_from_scheduler, tiny_unet)
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow
from dstar_edu.samplers.common import subsequence
from dstar_edu.samplers.diffusion import ddim, ddpm, ddpm_grid
from toy_data.mixtures import GaussianMixture

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Spy(torch.nn.Module):
    """Records what a diffusers network would receive; returns a fixed function of its input."""

    def __init__(self, fn=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=F64))
        self.calls = []
        self.fn = fn or (lambda x, t: torch.tanh(x))

    def forward(self, sample, timestep, **kwargs):
        self.calls.append({"timestep": timestep.clone(), "kwargs": kwargs, "dtype": sample.dtype})
        return (self.fn(sample, timestep) + 0 * self.w,)


def f64_tables(sch, p):
    sch.alphas_cumprod = p.alpha_bars[1:].clone()
    if hasattr(sch, "final_alpha_cumprod"):
        sch.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if sch.config.set_alpha_to_one else p.alpha_bars[1]
    if hasattr(sch, "one"):
        sch.one = torch.tensor(1.0, dtype=F64)
    return sch


# ---- the tiny UNet end to end ------------------------------------------------------------------------------
def test_tiny_unet_runs_through_ddim_and_matches_a_diffusers_loop():
    """The tiny UNet2DModel (3x32x32) as an eps predictor: our DDIM loop equals a hand-written diffusers loop
    (DDIMScheduler, leading spacing, eta 0.5, the same variance noise) in float64 to 1e-10."""
    unet = tiny_unet().double()
    p = DDPM(1000)
    pred = DiffusersUNetPredictor(unet, p, "epsilon")
    x = torch.randn(2, 3, 32, 32, generator=gen(0), dtype=F64)
    with torch.no_grad():
        ours = ddim(pred, subsequence(1000, 6, "leading"), x, eta=0.5, generator=gen(1))
        sch = f64_tables(DDIMScheduler(num_train_timesteps=1000, clip_sample=False), p)
        sch.set_timesteps(6)
        y, g = x.clone(), gen(1)
        for k in sch.timesteps:
            eps = unet(y, k.to(F64)).sample
            y = sch.step(eps, int(k), y, eta=0.5, generator=g).prev_sample
    assert ours.shape == (2, 3, 32, 32) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, y, rtol=1e-10, atol=1e-10)


def test_tiny_unet_float32_ddim_is_deterministic():
    unet = tiny_unet()
    pred = DiffusersUNetPredictor(unet, DDPM(1000), "epsilon")
    x = torch.randn(2, 3, 32, 32, generator=gen(2))
    with torch.no_grad():
        a = ddim(pred, subsequence(1000, 4, "trailing"), x)
        b = ddim(pred, subsequence(1000, 4, "trailing"), x)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert sum(q.numel() for q in unet.parameters()) > 100_000


def test_ddpm_full_loop_matches_diffusers_with_the_same_seed():
    """1000 ancestral steps, exact 2D mixture, same generator seed: DDPMScheduler (fixed_small, float64 tables)."""
    p = DDPM(1000)
    means = torch.tensor([[-1.0, 0.5], [1.0, 1.0]], dtype=F64)
    dist = GaussianMixture(means, 0.05, process=p)
    x = torch.randn(16, 2, generator=gen(3), dtype=F64)
    ours = ddpm(dist, ddpm_grid(p), x, generator=gen(4))
    sch = f64_tables(DDPMScheduler(num_train_timesteps=1000, clip_sample=False), p)
    y, g = x.clone(), gen(4)
    for k in range(999, -1, -1):
        y = sch.step(dist.predict("eps", y, float(k + 1)), k, y, generator=g).prev_sample
    torch.testing.assert_close(ours, y, rtol=1e-9, atol=1e-9)


# ---- conventions ------------------------------------------------------------------------------------------
def test_timestep_maps_and_dtype():
    spy = Spy()
    x = torch.randn(3, 4, dtype=torch.float32)
    DiffusersUNetPredictor(spy, DDPM(1000), "epsilon")(x, 1000)
    DiffusersUNetPredictor(spy, RectifiedFlow(), "flow_prediction")(x, 0.25)
    DiffusersUNetPredictor(spy, VP(), "epsilon")(x, torch.tensor([0.1, 0.5, 1.0]))
    DiffusersUNetPredictor(spy, TrigFlow(0.5), "trigflow_F", timestep_fn=lambda t: 7 * t)(x, 0.5)
    got = [c["timestep"].tolist() for c in spy.calls]
    assert got == [[999.0] * 3, [250.0] * 3, pytest.approx([100.0, 500.0, 1000.0]), [3.5] * 3]
    assert all(c["dtype"] == F64 for c in spy.calls)          # cast to the network's dtype (its parameters)


@pytest.mark.parametrize("ptype,ours", [("epsilon", "eps"), ("v_prediction", "v_bar"), ("sample", "x0")])
def test_prediction_types_recover_the_exact_posterior(ptype, ours):
    """A fake network returning diffusers' target for the exact model (eps; v = sqrt(ab) eps - sqrt(1-ab) x0; x0)
    gives back E[x0 | x_t] through our conversion, i.e. the name map is right."""
    p = DDPM(1000)
    dist = GaussianMixture(torch.tensor([[0.5, -1.0]], dtype=F64), 0.2, process=p)
    x = torch.randn(5, 2, generator=gen(5), dtype=F64)
    t = 400
    ab = p.alpha_bars[t]
    x0 = dist.posterior_mean(x, t)
    eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    target = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[ptype]
    pred = DiffusersUNetPredictor(Spy(lambda s, k: target), p, ptype)
    assert pred.prediction == ours == prediction_from_diffusers(ptype)
    torch.testing.assert_close(pred.predict("x0", x, t), x0, rtol=1e-10, atol=1e-12)


def test_cond_is_passed_through():
    spy = Spy()
    x = torch.randn(2, 4, dtype=F64)
    pred = DiffusersUNetPredictor(spy, DDPM(1000), "epsilon")
    pred(x, 10, torch.tensor([1, 2]))
    pred(x, 10, {"encoder_hidden_states": torch.ones(2, 3, 8), "added_cond_kwargs": {"a": 1}})
    assert torch.equal(spy.calls[0]["kwargs"]["class_labels"], torch.tensor([1, 2]))
    assert set(spy.calls[1]["kwargs"]) == {"encoder_hidden_states", "added_cond_kwargs"}
    # a real class-conditional UNet2DModel takes the labels
    unet = tiny_unet(sample_size=8, num_class_embeds=10)
    cpred = DiffusersUNetPredictor(unet, DDPM(1000), "epsilon")
    xi = torch.randn(2, 3, 8, 8, generator=gen(6))
    with torch.no_grad():
        a, b = cpred(xi, 500, torch.tensor([0, 0])), cpred(xi, 500, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)


def test_edm_preconditioning_matches_diffusers():
    sch = EDMEulerScheduler(sigma_data=0.5)
    for pt in ("epsilon", "v_prediction"):
        sch_pt = EDMEulerScheduler(sigma_data=0.5, prediction_type=pt)
        sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=F64)
        x = torch.randn(4, 6, generator=gen(7), dtype=F64)
        F = torch.randn(4, 6, generator=gen(8), dtype=F64)
        c_in, c_noise, c_skip, c_out = (c[:, None] for c in edm_preconditioning(sigma, 0.5, pt))
        torch.testing.assert_close(c_in * x, sch.precondition_inputs(x, sigma[:, None]), rtol=1e-14, atol=0)
        torch.testing.assert_close(c_noise[:, 0], sch.precondition_noise(sigma), rtol=1e-14, atol=0)
        torch.testing.assert_close(c_skip * x + c_out * F, sch_pt.precondition_outputs(x, F, sigma[:, None]),
                                   rtol=1e-14, atol=1e-15)
        # and through the predictor wrapper
        pred = DiffusersUNetPredictor(Spy(lambda s, k: F), VE(80.0), preconditioning="edm", edm_prediction_type=pt)
        torch.testing.assert_close(pred(x, sigma), sch_pt.precondition_outputs(x, F, sigma[:, None]),
                                   rtol=1e-14, atol=1e-15)


def test_process_from_scheduler():
    ddpm = process_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    assert isinstance(ddpm, DDPM)
    torch.testing.assert_close(ddpm.alpha_bars[1:].float(), DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod, rtol=2e-5, atol=0)
    assert isinstance(process_from_scheduler(DDIMScheduler().config), DDPM)
    assert isinstance(process_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0)), RectifiedFlow)
    ve = process_from_scheduler(EDMEulerScheduler(sigma_max=40.0))
    assert isinstance(ve, VE) and ve.t_max == 40.0
    tf = process_from_scheduler(SCMScheduler(sigma_data=0.5))
    assert isinstance(tf, TrigFlow) and tf.sigma_data == 0.5
    with pytest.raises(ValueError, match="not supported"):
        process_from_scheduler({"_class_name": "MyScheduler"})


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 999, 1000])
def test_subsequence_is_diffusers_timesteps_plus_one(spacing, n):
    sch = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sch.set_timesteps(n)
    if int(sch.timesteps.max()) > 999:      # leading, n = T, steps_offset = 1: diffusers lists timestep 1000
        with pytest.raises(ValueError, match="steps_offset=1"):
            subsequence(1000, n, spacing, steps_offset=1)
        return
    ours = subsequence(1000, n, spacing, steps_offset=sch.config.steps_offset)
    assert ours[:-1].long().tolist() == (sch.timesteps + 1).tolist() and ours[-1] == 0
    pairs = diffusers_ddim_transitions(1000, n, spacing, sch.config.steps_offset)
    assert [t - 1 for t, _ in pairs] == sch.timesteps.tolist()
    assert all(tp == max(t - 1000 // n, 0) for t, tp in pairs)


def test_ddim_transitions_differ_from_listed_grid_for_linspace():
    """REFERENCE.md fact: with linspace N = 10 diffusers steps 999 -> 899 (handbook 1000 -> 900), not to 888."""
    pairs = diffusers_ddim_transitions(1000, 10, "linspace")
    assert pairs[0] == (1000, 900) and subsequence(1000, 10, "linspace")[1] == 889
    assert diffusers_ddim_transitions(1000, 10, "leading", set_alpha_to_one=False)[-1] == (1, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prediction='epsilonn'"):
        DiffusersUNetPredictor(Spy(), DDPM(1000), "epsilonn")
    with pytest.raises(ValueError, match="needs a VE process"):
        DiffusersUNetPredictor(Spy(), DDPM(1000), preconditioning="edm")
    with pytest.raises(ValueError, match="preconditioning='karras'"):
        DiffusersUNetPredictor(Spy(), VE(), preconditioning="karras")
    with pytest.raises(ValueError, match="outside the time domain"):
        DiffusersUNetPredictor(Spy(), DDPM(1000), "epsilon")(torch.zeros(2, 3), 1001)
    with pytest.raises(ValueError, match="one entry per batch element"):
        DiffusersUNetPredictor(Spy(), DDPM(1000), "epsilon")(torch.zeros(2, 3), torch.tensor([1.0, 2.0, 3.0]))
    assert isinstance(tiny_unet(sample_size=8), UNet2DModel)
