"""CPU time of the library's hot paths (issue 12: the seams must not slow ``verify`` down).

Runs each path three times single-threaded and prints the minimum CPU seconds: DDIM with an exact mixture (1000 steps,
``Predictor.denoise`` of the exact model), ancestral DDPM with a float32 MLP (1000 steps), PF-ODE Heun (300 steps),
third-order DPM-Solver on a log-SNR grid (inverse time map ``time_from_log_snr``) and ``denoising_loss`` (v target,
Min-SNR weights: the conversions' coefficients).
Compare two trees with ``PYTHONPATH=<tree> python bench/bench_core_paths.py``.
"""
import time

import torch

from dstar_edu.process import DDPM, VP
from dstar_edu.samplers import ddim, ddpm, dpm_solver, pf_ode, uniform_grid
from dstar_edu.samplers.diffusion import logsnr_grid  # lives in dstar_edu.times; this name works in both trees
from dstar_edu.objectives import denoising_loss
from dstar_edu.predictors import MLPPredictor
from toy_data.mixtures import eight_gaussians_mixture

def _timed(out: dict, name: str, fn) -> None:
    t0 = time.process_time()
    fn()
    out[name] = time.process_time() - t0


def bench() -> dict:
    out = {}
    p = DDPM(1000)
    mix = eight_gaussians_mixture(p)
    grid = torch.arange(1000, -1, -1, dtype=torch.float64)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _timed(out, "ddim_exact_1000", lambda: ddim(mix, grid, x))
    torch.manual_seed(0)
    net = MLPPredictor(p, "eps", hidden=32, depth=1)
    with torch.no_grad():
        _timed(out, "ddpm_mlp_1000", lambda: ddpm(net, grid, x.float(), generator=torch.Generator().manual_seed(1)))
    v = VP()
    mixv = eight_gaussians_mixture(v)
    _timed(out, "pf_ode_heun_300", lambda: pf_ode(mixv, uniform_grid(v, 300, 1.0, 1e-3), x, method="heun"))
    _timed(out, "dpm3_5x20", lambda: [dpm_solver(mix, logsnr_grid(p, 20, 999.0, 1.0), x, order=3) for _ in range(5)])
    x0 = mix.sample(128, generator=torch.Generator().manual_seed(2)).float()
    g = torch.Generator().manual_seed(3)
    _timed(out, "denoising_loss_300",
           lambda: [denoising_loss(net, x0, generator=g, target="v", weighting="min_snr") for _ in range(300)])
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = [bench() for _ in range(3)]
    print({k: round(min(r[k] for r in res), 3) for k in res[0]})
