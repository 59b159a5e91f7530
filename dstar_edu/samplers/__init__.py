"""Samplers: functions from (predictor, time grid, initial noise, generator) to samples (DESIGN.md block 4).

``diffusion``: DDPM, DDIM, SMLD, reverse SDE, PF-ODE, DPM-Solver; ``consistency``: CM multistep, LCM;
``flow``: rectified-flow Euler, InstaFlow, TrigFlow. All share the contract of ``common``.
"""
from .common import check_timesteps, karras_sigmas, run_loop, subsequence, uniform_grid
from .consistency import consistency_multistep, lcm, lcm_timesteps
from .diffusion import ddim, ddpm, dpm_solver, logsnr_grid, pf_ode, reverse_sde, smld
from .flow import instaflow, rectified_flow_euler, trigflow

__all__ = ["check_timesteps", "karras_sigmas", "run_loop", "subsequence", "uniform_grid", "consistency_multistep",
           "lcm", "lcm_timesteps", "ddim", "ddpm", "dpm_solver", "logsnr_grid", "pf_ode", "reverse_sde", "smld",
           "instaflow", "rectified_flow_euler", "trigflow"]
