"""Samplers: functions from (predictor, time grid, initial noise, generator) to samples (DESIGN.md block 4)."""
from .common import check_timesteps, karras_sigmas, run_loop, subsequence, uniform_grid

__all__ = ["check_timesteps", "karras_sigmas", "run_loop", "subsequence", "uniform_grid"]
