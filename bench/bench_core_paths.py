"""CPU time of the library's hot paths (issue 12: the seams must not slow ``verify`` down).

Runs each path three times single-threaded and prints the minimum CPU seconds: DDIM with an exact mixture (1000 steps,
``Predictor.denoise`` of the exact model), ancestral DDPM with a float32 MLP (1000 steps), PF-ODE Heun (300 steps),
third-order DPM-Solver on a log-SNR grid (inverse time map ``time_from_log_snr``) and ``denoising_loss`` (v target,
Min-SNR weights: the conversions' coefficients). Compare two trees with ``PYTHONPATH=<tree> python bench/bench_core_paths.py``.
"""
import time

import torch

torch.set_num_threads(1)
from dstar_edu.process import DDPM, VP
from dstar_edu.samplers import ddim, ddpm, dpm_solver, pf_ode, uniform_grid
from dstar_edu.samplers.diffusion import logsnr_grid  # (dstar_edu.times since issue 12; this name works before and after)
from dstar_edu.objectives import denoising_loss
from dstar_edu.predictors import MLPPredictor
from toy_data.mixtures import eight_gaussians_mixture

def bench():
    out = {}
    p = DDPM(1000); mix = eight_gaussians_mixture(p)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = time.process_time(); ddim(mix, torch.arange(1000, -1, -1, dtype=torch.float64), x); out["ddim_exact_1000"] = time.process_time() - t0
    torch.manual_seed(0); net = MLPPredictor(p, "eps", hidden=32, depth=1)
    x32 = x.float()
    with torch.no_grad():
        t0 = time.process_time(); ddpm(net, torch.arange(1000, -1, -1, dtype=torch.float64), x32, generator=torch.Generator().manual_seed(1)); out["ddpm_mlp_1000"] = time.process_time() - t0
    v = VP(); mixv = eight_gaussians_mixture(v)
    t0 = time.process_time(); pf_ode(mixv, uniform_grid(v, 300, 1.0, 1e-3), x, method="heun"); out["pf_ode_heun_300"] = time.process_time() - t0
    t0 = time.process_time()
    for _ in range(5): dpm_solver(mix, logsnr_grid(p, 20, 999.0, 1.0), x, order=3)
    out["dpm3_5x20"] = time.process_time() - t0
    x0 = mix.sample(128, generator=torch.Generator().manual_seed(2)).float()
    t0 = time.process_time()
    g = torch.Generator().manual_seed(3)
    for _ in range(300): denoising_loss(net, x0, generator=g, target="v", weighting="min_snr")
    out["denoising_loss_300"] = time.process_time() - t0
    return out

res = [bench() for _ in range(3)]
print({k: round(min(r[k] for r in res), 3) for k in res[0]})
