"""dstar_edu.times: grids, the rho spacing, time distributions and inverse time maps, against independent formulas."""
import math

import pytest
import torch

from dstar_edu import times
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow
from dstar_edu.samplers import karras_sigmas as sampler_karras
from dstar_edu.objectives.distill import karras_sigma_grid as distill_grid, p_edm, p_sid, p_sim

F64 = torch.float64
PROCESSES = [DDPM(1000), VP(), VP("cosine"), VE(), RectifiedFlow(), TrigFlow()]


def test_old_names_are_the_time_module_functions():
    # one implementation: the samplers' and objectives' names are the same function objects
    assert sampler_karras is times.karras_sigmas and distill_grid is times.karras_sigma_grid
    assert (p_edm, p_sim, p_sid) == (times.p_edm, times.p_sim, times.p_sid)


@pytest.mark.parametrize("start,end,n,rho", [(80.0, 0.002, 18, 7.0), (0.5, 0.0, 10, 7.0), (0.002, 80.0, 5, 3.0)])
def test_rho_grid_matches_the_printed_formula(start, end, n, rho):
    # Karras et al. Eq. 5 written out with Python floats, one entry at a time
    ref = [(start ** (1 / rho) + i / n * (end ** (1 / rho) - start ** (1 / rho))) ** rho for i in range(n + 1)]
    g = times.rho_grid(start, end, n, rho)
    assert g[0].item() == start and g[-1].item() == end                           # exact end points
    torch.testing.assert_close(g, torch.tensor(ref, dtype=F64), rtol=1e-14, atol=1e-300)   # a few ulps


def test_karras_sigmas_and_sid_grid_are_the_same_spacing():
    k = times.karras_sigmas(1000, append_zero=False)
    torch.testing.assert_close(times.karras_sigma_grid(1000), k, rtol=0, atol=0)
    assert times.karras_sigmas(5)[-1].item() == 0.0 and times.karras_sigmas(5).numel() == 6


@pytest.mark.parametrize("p", PROCESSES, ids=repr)
def test_time_from_log_snr_inverts_log_snr(p):
    t = torch.linspace(p.t_min, p.t_max, 41, dtype=F64)[5:-5]                   # lambda finite inside
    lam = times.log_snr(p, t)
    back = times.time_from_log_snr(p, lam)
    # float64 round trip: lambda is recovered to round-off (time itself is ill-conditioned where lambda is flat)
    torch.testing.assert_close(times.log_snr(p, back), lam, rtol=1e-12, atol=1e-11)
    # and it is t_from_edm_sigma(exp(-lambda)), the process's own inverse
    torch.testing.assert_close(back, p.t_from_edm_sigma(torch.exp(-lam)), rtol=0, atol=0)


def test_time_from_log_snr_clamps_to_the_bracket_and_rejects_nan():
    p = VP()
    lam = times.log_snr(p, torch.tensor([0.2, 0.8], dtype=F64))
    out = times.time_from_log_snr(p, lam, 0.3, 0.7)
    assert out.tolist() == [0.3, 0.7]
    with pytest.raises(ValueError, match="lam="):
        times.time_from_log_snr(p, float("nan"))
    with pytest.raises(ValueError, match="t_lo"):
        times.time_from_log_snr(p, lam, 0.7, 0.3)


def test_logsnr_grid_is_uniform_in_lambda():
    p = DDPM(1000)
    g = times.logsnr_grid(p, 10, 999.0, 1.0)
    lam = times.log_snr(p, g)
    steps = lam[1:] - lam[:-1]
    torch.testing.assert_close(steps, steps.mean().expand(10), rtol=1e-10, atol=0)


@pytest.mark.parametrize("P_mean,P_std", [(-1.2, 1.2), (-3.5, 2.5)])
def test_lognormal_edm_sigma_moments(P_mean, P_std):
    n = 200_000
    s = times.lognormal_edm_sigma(n, P_mean, P_std, torch.Generator().manual_seed(0))
    z = (torch.log(s) - P_mean) / P_std
    # mean and variance of a standard normal sample: standard errors 1/sqrt(n) and sqrt(2/n); 5 of them
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)


def test_lognormal_times_clamp_to_the_range_and_map_through_the_inverse():
    p = VP()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = times.lognormal_times(p, 1000, -1.2, 1.2, sigma_min=0.01, sigma_max=5.0, generator=g1)
    s = times.lognormal_edm_sigma(1000, -1.2, 1.2, g2).clamp(0.01, 5.0)
    torch.testing.assert_close(p.edm_sigma(t), s, rtol=1e-12, atol=0)
    # p_edm draws the same times from the same generator state (one log-normal draw in the library)
    torch.testing.assert_close(times.p_edm(p, sigma_min=0.01, sigma_max=5.0)(1000, torch.Generator().manual_seed(3)), t)


def test_p_sid_clamp_equals_clamping_its_times():
    p = DDPM(1000)
    lo, hi = p.edm_sigma(1.0).item(), 24.0
    t_lo, t_hi = (p.t_from_edm_sigma(v).item() for v in (lo, hi))
    plain = times.p_sid(p, from_end="min")(500, torch.Generator().manual_seed(1))
    clamped = times.p_sid(p, from_end="min", clamp=(lo, hi))(500, torch.Generator().manual_seed(1))
    torch.testing.assert_close(clamped, plain.clamp(t_lo, t_hi), rtol=0, atol=0)
    assert clamped.max().item() <= t_hi and clamped.min().item() >= t_lo


def test_edm_sigma_range_is_the_process_range():
    for p in PROCESSES:
        lo, hi = times.edm_sigma_range(p)
        assert lo == p.edm_sigma(p.t_min).item() and hi == p.edm_sigma(p.t_max).item()
