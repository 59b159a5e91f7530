"""Parallel sampling (dstar_edu.samplers.parallel) against the library's sequential samplers."""
import pytest
import torch

from dstar_edu.process import RectifiedFlow, VP
from dstar_edu.samplers.common import uniform_grid
from dstar_edu.samplers.diffusion import ddim, ddim_step
from dstar_edu.samplers.parallel import parareal, picard, sequential_solve
from toy_data.mixtures import eight_gaussians_mixture

F64 = torch.float64


def _problem(n_steps=8, dtype=F64):
    p = VP()
    m = eight_gaussians_mixture(p)
    ts = uniform_grid(p, n_steps, t_end=1e-3)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    return m, ts, z


def test_one_picard_round_from_a_constant_guess_is_a_sum_of_increments():
    """Round 1 from x_i = x_0: x_{i+1} = x_0 + sum_{j<=i} (DDIM(x_0, t_j -> t_j+1) - x_0), written with ddim_step."""
    m, ts, z = _problem(4)
    _, info = picard(m, ts, z, max_rounds=1)
    inc = [ddim_step(m, z, ts[j].item(), ts[j + 1].item()) - z for j in range(4)]
    expected = z + sum(inc)
    torch.testing.assert_close(info["trajectory"][-1], expected, rtol=1e-12, atol=1e-12)


def test_picard_and_parareal_equal_ddim_and_count_rounds():
    m, ts, z = _problem(8)
    ref = ddim(m, ts, z)
    x, info = picard(m, ts, z)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-11)
    assert info["rounds"] <= 8 and info["nfe"] == info["rounds"] * 8 and len(info["history"]) == info["rounds"]
    x, info = parareal(m, ts, z, 2)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-11)
    assert info["rounds"] <= 2 and info["fine_steps_per_interval"] == 4
    # sequential calls: initial coarse sweep (2) + per correction M fine (4) + coarse sweep (2)
    assert info["sequential_calls"] == 2 + info["rounds"] * 6


def test_float32_picard_converges_to_float32_sequential():
    m, ts, z = _problem(8, torch.float32)
    x, info = picard(m, ts, z, tol=1e-5)
    ref = sequential_solve(m, ts, z)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)           # float32 round-off, 8 summed increments


def test_bad_inputs():
    m, ts, z = _problem(8)
    with pytest.raises(ValueError, match="n_coarse=3"):
        parareal(m, ts, z, 3)
    with pytest.raises(ValueError, match="solver='rk4'"):
        picard(m, ts, z, solver="rk4")
    with pytest.raises(ValueError, match="max_rounds=0"):
        picard(m, ts, z, max_rounds=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        picard(m, ts.flip(0), z)


def test_euler_solver_on_rectified_flow():
    p = RectifiedFlow()
    m = eight_gaussians_mixture(p)
    ts = torch.linspace(0.999, 0.0, 9, dtype=F64)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x, info = picard(m, ts, z, solver="euler")
    torch.testing.assert_close(x, sequential_solve(m, ts, z, solver="euler"), rtol=1e-10, atol=1e-11)
    # on rectified flow the DDIM step IS the Euler step of the velocity (x0/eps form)
    torch.testing.assert_close(sequential_solve(m, ts, z, solver="ddim"), x, rtol=1e-10, atol=1e-11)
