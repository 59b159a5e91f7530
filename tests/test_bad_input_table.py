"""Table-driven bad-input suite (issue 13 item 1): every public area, every kind of bad input.

Each row is ``(id, call, expectation)``. The expectation is either an exception class with a regex that must
name the argument (and usually the value / what is allowed), or ``OK(check)``: a documented, correct result
that the check verifies against a value stated in the row (never "it did not crash"). A row fails on an
obscure exception (wrong class or a message that does not name the argument) and on a silent result
(no exception where one is due, or a non-finite value). ``test_case_count`` keeps the table >= 350 rows.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from dstar_edu import metrics
from dstar_edu.conversions import convert
from dstar_edu.distillation import distill
from dstar_edu.generators import AffineGaussianGenerator, DiracGenerator, MLPGenerator, MixtureGenerator
from dstar_edu.objectives import denoising_loss, flow_matching_loss
from dstar_edu.objectives.distill import (diff_instruct_loss, karras_sigma_grid, p_edm, p_sid, p_sim,
                                          sid_generator_loss, sim_generator_loss)
from dstar_edu.objectives.pretrain import sample_t
from dstar_edu.predictors import MLPPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow, make_process
from dstar_edu.rewards import LinearReward, QuadraticReward, RegionReward
from dstar_edu.samplers.common import karras_sigmas, subsequence, uniform_grid
from dstar_edu.samplers.diffusion import ddim, ddpm, ddim_step
from dstar_edu.training import train, train_2d
from toy_data import datasets2d
from toy_data.mixtures import EmpiricalDistribution, GaussianMixture

F64, F32 = torch.float64, torch.float32
NAN, INF = math.nan, math.inf
CASES: list = []


class OK:
    """A documented correct result: ``check(result)`` must hold."""

    def __init__(self, check, what: str):
        self.check, self.what = check, what


def case(cid, fn, expect, exc=ValueError):
    CASES.append(pytest.param(fn, expect, exc, id=cid))


def x2(B=4, dtype=F64):
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


# ---- processes: time domain x every process x every schedule ------------------------------------------------
PROCS = {"ddpm_linear": lambda: DDPM(1000), "ddpm_scaled": lambda: DDPM(1000, "scaled_linear"),
         "ddpm_cosine": lambda: DDPM(1000, "cosine"), "ddpm_custom": lambda: DDPM(betas=[0.1, 0.2, 0.3]),
         "vp_linear": lambda: VP(), "vp_cosine": lambda: VP("cosine"), "ve": lambda: VE(80.0),
         "rf": lambda: RectifiedFlow(), "trigflow": lambda: TrigFlow(0.5)}
BAD_T = {"nan": (NAN, r"t contains NaN"), "neg_inf": (-INF, r"t=-inf is outside the time domain"),
         "pos_inf": (INF, r"t=inf is outside the time domain"), "below": (-1e-3, r"t=-0.001 is outside"),
         "above": ("above", r"is outside the time domain \[0, "), "two_d": ([[0.1, 0.2]], r"t must be a scalar or a 1-d"),
         "string": ("0.5", r"t='0.5' must be a number"), "complex": (torch.tensor([0.1 + 1j]), r"t must be real times"),
         "bool_tensor": (torch.tensor([True]), r"t must be real times")}
for pname, mk in PROCS.items():
    for tname, (t, pat) in BAD_T.items():
        def _alpha(mk=mk, t=t):
            p = mk()
            return p.alpha(p.t_max * 1.01 + 0.01 if isinstance(t, str) and t == "above" else t)

        def _qs(mk=mk, t=t):
            p = mk()
            tt = p.t_max * 1.01 + 0.01 if isinstance(t, str) and t == "above" else t
            tt = torch.full((4,), tt, dtype=F64) if isinstance(tt, float) else tt
            return p.q_sample(x2(), tt)
        case(f"process-{pname}-alpha-t_{tname}", _alpha, pat)
        if tname in ("nan", "pos_inf", "above", "two_d"):
            case(f"process-{pname}-q_sample-t_{tname}", _qs, pat)
    # t with the wrong batch size, and an empty t: an empty batch is a documented empty result
    case(f"process-{pname}-q_sample-t_batch_mismatch",
         lambda mk=mk: mk().q_sample(x2(4), torch.full((3,), 0.5, dtype=F64)), r"t has shape \(3,\) but x_t has shape")
    case(f"process-{pname}-alpha-empty_t", lambda mk=mk: mk().alpha(torch.zeros(0, dtype=F64)),
         OK(lambda r: r.shape == (0,) and r.dtype == F64, "empty t -> empty alpha"))

PROC_CTOR = [
    ("ddpm_betas_nan", lambda: DDPM(betas=[0.1, NAN, 0.2]), r"betas must lie in \(0, 1\); got betas\[1\]=nan"),
    ("ddpm_betas_inf", lambda: DDPM(betas=[0.1, INF]), r"betas\[1\]=inf"),
    ("ddpm_betas_empty", lambda: DDPM(betas=[]), r"betas is empty"),
    ("ddpm_betas_zero", lambda: DDPM(betas=[0.0, 0.1]), r"betas\[0\]=0"),
    ("ddpm_betas_one", lambda: DDPM(betas=[0.1, 1.0]), r"betas\[1\]=1"),
    ("ddpm_betas_negative", lambda: DDPM(betas=[-0.1]), r"betas\[0\]=-0.1"),
    ("ddpm_betas_string", lambda: DDPM(betas="abc"), r"betas must be a sequence of numbers"),
    ("ddpm_T_zero", lambda: DDPM(0), r"T=0 must be a positive integer"),
    ("ddpm_T_negative", lambda: DDPM(-5), r"T=-5 must be a positive integer"),
    ("ddpm_T_float", lambda: DDPM(10.5), r"T=10.5 must be a positive integer"),
    ("ddpm_T_bool", lambda: DDPM(True), r"T=True must be a positive integer"),
    ("ddpm_schedule_unknown", lambda: DDPM(10, "quadratic"), r"schedule='quadratic' is not supported"),
    ("ddpm_beta_start_nan", lambda: DDPM(10, beta_start=NAN), r"beta_start=nan must be a number in \(0, 1\)"),
    ("ddpm_beta_end_2", lambda: DDPM(10, beta_end=2.0), r"beta_end=2.0 must be a number in \(0, 1\)"),
    ("ddpm_cosine_s_negative", lambda: DDPM(10, "cosine", cosine_s=-1.0), r"cosine_s=-1.0 must be a number in \[0, 1\)"),
    ("vp_schedule_unknown", lambda: VP("sigmoid"), r"schedule='sigmoid' is unknown; allowed: linear, cosine"),
    ("vp_beta_min_zero", lambda: VP(beta_min=0.0), r"beta_min=0.0"),
    ("vp_beta_max_inf", lambda: VP(beta_max=INF), r"beta_max=inf"),
    ("vp_beta_min_nan", lambda: VP(beta_min=NAN), r"beta_min=nan"),
    ("vp_beta_order", lambda: VP(beta_min=5.0, beta_max=1.0), r"beta_min < beta_max"),
    ("vp_cosine_s_nan", lambda: VP("cosine", cosine_s=NAN), r"cosine_s=nan"),
    ("ve_inf", lambda: VE(INF), r"sigma_max=inf must be a positive finite number"),
    ("ve_nan", lambda: VE(NAN), r"sigma_max=nan must be a positive finite number"),
    ("ve_zero", lambda: VE(0.0), r"sigma_max=0.0 must be a positive finite number"),
    ("ve_negative", lambda: VE(-1.0), r"sigma_max=-1.0"),
    ("ve_string", lambda: VE("80"), r"sigma_max='80' must be a positive finite number"),
    ("trigflow_inf", lambda: TrigFlow(INF), r"sigma_data=inf must be a positive finite number"),
    ("trigflow_nan", lambda: TrigFlow(NAN), r"sigma_data=nan"),
    ("trigflow_zero", lambda: TrigFlow(0.0), r"sigma_data=0.0"),
    ("make_process_unknown", lambda: make_process("ddim"), r"process name='ddim' is unknown; allowed"),
    ("t_from_edm_sigma_negative", lambda: VP().t_from_edm_sigma(-1.0), r"s must be non-negative"),
    ("t_from_edm_sigma_nan", lambda: VP().t_from_edm_sigma(NAN), r"s must be non-negative"),
    ("t_from_edm_sigma_too_big", lambda: VP().t_from_edm_sigma(1e6), r"s has values in .* only covers"),
    ("step_alpha_fraction", lambda: DDPM(10).step_alpha(2.5), r"step_alpha needs integer t in 1..10"),
    ("step_alpha_zero", lambda: DDPM(10).step_alpha(0), r"step_alpha needs integer t in 1..10"),
    ("q_sample_eps_shape", lambda: VP().q_sample(x2(), 0.5, eps=torch.zeros(4, 3, dtype=F64)),
     r"eps has shape \(4, 3\) but x0 has shape \(4, 2\)"),
]
for cid, fn, pat in PROC_CTOR:
    case("process-" + cid, fn, pat)

# time stays float64 in every precision: bf16 / float32 x at t = T, T-1, 601, 0 use the float64 coefficients
_REF = DDPM(1000)
for dtype in (torch.bfloat16, F32):
    for t in (1000, 999, 601, 0):
        def _coef(dtype=dtype, t=t):
            return _REF.coefficients(t, torch.zeros(2, 2, dtype=dtype))[1]
        exact = float(_REF.sigma(t))
        case(f"process-ddpm-{str(dtype)[6:]}-x-t{t}", _coef,
             OK(lambda r, exact=exact, dtype=dtype: r.dtype == dtype and float(r) == float(torch.tensor(exact).to(dtype)),
                "the float64 sigma(t) rounded once to x's dtype"))

# ---- conversions ---------------------------------------------------------------------------------------------
for pname in ("ddpm_linear", "vp_cosine", "ve", "rf", "trigflow"):
    mk = PROCS[pname]
    case(f"convert-{pname}-source_unknown", lambda mk=mk: convert(x2(), "noise", "x0", x2(), 0.5, mk()),
         r"source='noise' is unknown; allowed")
    case(f"convert-{pname}-target_unknown", lambda mk=mk: convert(x2(), "eps", "epsilon", x2(), 0.5, mk()),
         r"target='epsilon' is unknown; allowed")
    case(f"convert-{pname}-value_shape", lambda mk=mk: convert(torch.zeros(4, 3, dtype=F64), "eps", "x0", x2(), 0.5,
                                                               mk()), r"prediction has shape \(4, 3\)")
    case(f"convert-{pname}-t_nan", lambda mk=mk: convert(x2(), "eps", "x0", x2(), NAN, mk()), r"t contains NaN")
    case(f"convert-{pname}-t_above", lambda mk=mk: convert(x2(), "eps", "x0", x2(), mk().t_max * 2 + 1, mk()),
         r"outside the time domain")
    case(f"convert-{pname}-score_at_t0", lambda mk=mk: convert(x2(), "eps", "score", x2(), 0.0, mk()),
         r"sigma\(t\) is zero at t=\[0.0\]")
    case(f"convert-{pname}-t_batch", lambda mk=mk: convert(x2(), "eps", "x0", x2(),
                                                            torch.full((3,), 0.5, dtype=F64), mk()),
         r"t has shape \(3,\)")
case("convert-trigflow_F_on_vp", lambda: convert(x2(), "eps", "trigflow_F", x2(), 0.5, VP()),
     r"'trigflow_F' is defined for the TrigFlow process only")
case("convert-rf-eps_at_t1", lambda: convert(x2(), "eps", "x0", x2(), 1.0, RectifiedFlow()), r"alpha\(t\) is zero")
case("convert-bf16-ddpm-t1000", lambda: convert(x2(dtype=torch.bfloat16), "eps", "x0", x2(dtype=torch.bfloat16),
                                                1000, DDPM(1000)),
     OK(lambda r: r.dtype == torch.bfloat16 and bool(torch.isfinite(r).all()), "finite bf16 x0 at t = T"))

# ---- mixtures / empirical sets --------------------------------------------------------------------------------
MEANS = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
MIX = [
    ("means_nan", lambda: GaussianMixture([[0.0, NAN], [1.0, 1.0]], 1.0), r"means must be finite"),
    ("means_inf", lambda: GaussianMixture([[0.0, INF], [1.0, 1.0]], 1.0), r"means must be finite"),
    ("means_empty", lambda: GaussianMixture(torch.zeros(0, 2), 1.0), r"means has no components"),
    ("means_1d", lambda: GaussianMixture(torch.zeros(3), 1.0), r"means must have shape \(K, \*event_shape\)"),
    ("means_string", lambda: GaussianMixture("abc", 1.0), r"means must be"),
    ("covs_nan", lambda: GaussianMixture(MEANS, NAN), r"covs\[0\] is not positive definite"),
    ("covs_inf", lambda: GaussianMixture(MEANS, INF), r"covs must be finite"),
    ("covs_inf_full", lambda: GaussianMixture(MEANS, torch.tensor([[[INF, 0.0], [0.0, 1.0]]] * 2)),
     r"covs must be finite"),
    ("covs_negative", lambda: GaussianMixture(MEANS, -1.0), r"covs\[0\] is not positive definite"),
    ("covs_shape", lambda: GaussianMixture(MEANS, torch.ones(3, 2)), r"covs has shape \(3, 2\); allowed"),
    ("covs_asym", lambda: GaussianMixture(MEANS, torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2)), r"covs must be symmetric"),
    ("weights_nan", lambda: GaussianMixture(MEANS, 1.0, weights=[NAN, 1.0]), r"weights must be non-negative"),
    ("weights_negative", lambda: GaussianMixture(MEANS, 1.0, weights=[1.5, -0.5]), r"weights must be non-negative"),
    ("weights_sum", lambda: GaussianMixture(MEANS, 1.0, weights=[0.2, 0.2]), r"weights must sum to one"),
    ("weights_count", lambda: GaussianMixture(MEANS, 1.0, weights=[1.0]), r"weights has 1 entries but there are K=2"),
    ("weights_inf", lambda: GaussianMixture(MEANS, 1.0, weights=[INF, 0.0]), r"weights must"),
    ("labels_count", lambda: GaussianMixture(MEANS, 1.0, labels=[0]), r"labels has 1 entries but there are K=2"),
    ("process_wrong_type", lambda: GaussianMixture(MEANS, 1.0, process="vp"), r"process must be a dstar_edu Process.*str 'vp'"),
    ("sample_n_zero", lambda: GaussianMixture(MEANS, 1.0).sample(0), r"n=0 must be a positive integer"),
    ("sample_n_negative", lambda: GaussianMixture(MEANS, 1.0).sample(-3), r"n=-3 must be a positive integer"),
    ("sample_n_float", lambda: GaussianMixture(MEANS, 1.0).sample(2.5), r"n=2.5 must be a positive integer"),
    ("sample_n_bool", lambda: GaussianMixture(MEANS, 1.0).sample(True), r"n=True must be a positive integer"),
    ("sample_cond_unlabeled", lambda: GaussianMixture(MEANS, 1.0).sample(3, cond=0), r"cond was given but this mixture"),
    ("sample_cond_unknown", lambda: GaussianMixture(MEANS, 1.0, labels=[0, 1]).sample(3, cond=7), r"cond contains labels \[7\]"),
    ("score_no_process", lambda: GaussianMixture(MEANS, 1.0).score(x2(), 0.5), r"this mixture has no process"),
    ("score_x_wrong_dim", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(torch.zeros(4, 3, dtype=F64), 0.5),
     r"x_t has shape \(4, 3\)"),
    ("score_x_int", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(torch.zeros(4, 2, dtype=torch.long), 0.5),
     r"x_t must be a floating tensor"),
    ("score_x_1d", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(torch.zeros(2, dtype=F64), 0.5),
     r"x_t"),
    ("score_t_out", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(x2(), 2.0), r"t=2 is outside"),
    ("score_t_nan", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(x2(), NAN), r"t contains NaN"),
    ("score_x_empty", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(torch.zeros(0, 2, dtype=F64), 0.5),
     OK(lambda r: r.shape == (0, 2), "an empty batch has an empty score")),
    ("score_f32", lambda: GaussianMixture(MEANS, 1.0, process=VP()).score(x2(dtype=F32), 0.5),
     OK(lambda r: r.dtype == F32 and bool(torch.isfinite(r).all()), "float32 in, finite float32 out")),
    ("conditional_unknown", lambda: GaussianMixture(MEANS, 1.0, labels=[0, 1]).conditional(5), r"label=5 is not a class"),
    ("conditional_unlabeled", lambda: GaussianMixture(MEANS, 1.0).conditional(0), r"this mixture has no labels"),
    ("predict_unknown", lambda: GaussianMixture(MEANS, 1.0, process=VP()).predict("noise", x2(), 0.5),
     r"target='noise' is unknown"),
    ("empirical_empty", lambda: EmpiricalDistribution(torch.zeros(0, 2)), r"points has no components \(shape \(0, 2\)\)"),
    ("empirical_nan", lambda: EmpiricalDistribution([[0.0, NAN], [1.0, 1.0]]), r"(points|means) must be finite"),
    ("empirical_inf", lambda: EmpiricalDistribution([[0.0, INF]]), r"(points|means) must be finite"),
    ("empirical_1d", lambda: EmpiricalDistribution(torch.zeros(5)), r"must have shape \(K, \*event_shape\)"),
    ("empirical_t0", lambda: EmpiricalDistribution(MEANS, process=VP()).score(x2(), 0.0), r"diffused covariance is singular"),
    ("empirical_labels", lambda: EmpiricalDistribution(MEANS, labels=[0, 1, 2]), r"labels has 3 entries"),
]
for cid, fn, pat in MIX:
    case("mixture-" + cid, fn, pat)

# ---- 2D data sets ----------------------------------------------------------------------------------------------
for name in datasets2d.DATASETS:
    fn = datasets2d.DATASETS[name]
    for bad in (0, -1, 2.5, "10", None, True):
        case(f"datasets2d-{name}-n_{bad!r}", lambda fn=fn, bad=bad: fn(bad), r"n=.* must be a positive integer")
    case(f"datasets2d-{name}-dtype_int", lambda fn=fn: fn(4, dtype=torch.long), r"dtype=torch.int64 must be a floating")
case("datasets2d-unknown_name", lambda: datasets2d.sample_dataset("circles", 10), r"name='circles' is unknown; allowed: ")
case("datasets2d-checkerboard_mask_shape", lambda: datasets2d.checkerboard_dark_mask(torch.zeros(3, 3)), r"x must have shape")

# ---- samplers ---------------------------------------------------------------------------------------------------
TEACHER = GaussianMixture(MEANS, 0.1, process=VP())
TEACHER_DDPM = GaussianMixture(MEANS, 0.1, process=DDPM(1000))
SAMPLERS = [
    ("ddim_increasing", lambda: ddim(TEACHER, [0.1, 0.5, 1.0], x2()), r"timesteps must be strictly decreasing"),
    ("ddim_single", lambda: ddim(TEACHER, [1.0], x2()), r"timesteps needs at least 2 entries"),
    ("ddim_empty", lambda: ddim(TEACHER, [], x2()), r"timesteps needs at least 2 entries"),
    ("ddim_nan", lambda: ddim(TEACHER, [1.0, NAN, 0.0], x2()), r"timesteps (contains NaN|must be strictly)|t contains NaN"),
    ("ddim_out_of_domain", lambda: ddim(TEACHER, [2.0, 0.0], x2()), r"t=2 is outside"),
    ("ddim_negative_end", lambda: ddim(TEACHER, [1.0, -0.5], x2()), r"t=-0.5 is outside"),
    ("ddim_x_int", lambda: ddim(TEACHER, [1.0, 0.0], torch.zeros(4, 2, dtype=torch.long)), r"x_init must be a floating"),
    ("ddim_x_list", lambda: ddim(TEACHER, [1.0, 0.0], [[0.0, 0.0]]), r"x_init must be a floating"),
    ("ddim_x_shape", lambda: ddim(TEACHER, [1.0, 0.0], torch.zeros(4, 3, dtype=F64)), r"x_t has shape \(4, 3\)"),
    ("ddim_eta_negative", lambda: ddim(TEACHER, [1.0, 0.0], x2(), eta=-0.5), r"eta=-0.5"),
    ("ddim_eta_nan", lambda: ddim(TEACHER, [1.0, 0.0], x2(), eta=NAN), r"eta=nan"),
    ("ddim_generator", lambda: ddim(TEACHER, [1.0, 0.0], x2(), generator=0), r"generator must be a torch.Generator.*got int 0"),
    ("ddim_predictor", lambda: ddim(object(), [1.0, 0.0], x2()), r"predictor=object has no dstar_edu process"),
    ("ddim_x_nan", lambda: ddim(TEACHER, [1.0, 0.0], x2() * NAN), r"x_init (contains|must be finite)"),
    ("ddim_x_inf", lambda: ddim(TEACHER, [1.0, 0.0], x2() * INF), r"x_init (contains|must be finite)"),
    ("ddpm_variance", lambda: ddpm(TEACHER_DDPM, [1000, 0], x2(), variance="large"), r"variance='large'"),
    ("ddpm_form", lambda: ddpm(TEACHER_DDPM, [1000, 0], x2(), form="eq11"), r"form='eq11'"),
    ("ddim_step_t_next_bigger", lambda: ddim_step(TEACHER, x2(), 0.2, 0.5), r"t_prev|must be smaller|decreas"),
    ("ddim_first_last_step_domain_ends", lambda: ddim(TEACHER, [1.0, 0.0], x2()),
     OK(lambda r: bool(torch.isfinite(r).all()), "one DDIM step from t_max to t_min is finite")),
    ("ddim_bf16_ddpm_t1000", lambda: ddim(TEACHER_DDPM, [1000, 601, 0], x2(dtype=torch.bfloat16)),
     OK(lambda r: r.dtype == torch.bfloat16 and bool(torch.isfinite(r).all()), "bf16 sampling from t = T")),
    ("karras_sigma_min_negative", lambda: karras_sigmas(10, sigma_min=-1.0), r"sigma_min=-1.0"),
    ("karras_sigma_min_zero", lambda: karras_sigmas(10, sigma_min=0.0), r"sigma_min=0.0"),
    ("karras_rho_zero", lambda: karras_sigmas(10, rho=0.0), r"rho=0.0 must be a positive"),
    ("karras_rho_nan", lambda: karras_sigmas(10, rho=NAN), r"rho=nan"),
    ("karras_min_gt_max", lambda: karras_sigmas(10, sigma_min=5.0, sigma_max=1.0), r"sigma_min=5.0, sigma_max=1.0"),
    ("karras_max_inf", lambda: karras_sigmas(10, sigma_max=INF), r"sigma_max=inf"),
    ("karras_n_one", lambda: karras_sigmas(1), r"n_steps=1 must be"),
    ("karras_n_float", lambda: karras_sigmas(2.5), r"n_steps=2.5 must be"),
    ("karras_n_string", lambda: karras_sigmas("10"), r"n_steps='10' must be"),
    ("uniform_grid_zero", lambda: uniform_grid(VP(), 0), r"n_steps=0 must be a positive integer"),
    ("uniform_grid_float", lambda: uniform_grid(VP(), 2.5), r"n_steps=2.5 must be a positive integer"),
    ("uniform_grid_start_out", lambda: uniform_grid(VP(), 10, t_start=2.0), r"t=2 is outside"),
    ("uniform_grid_bool", lambda: uniform_grid(VP(), True), r"n_steps=True must be a positive integer"),
    ("subsequence_T0", lambda: subsequence(0, 10), r"T=0 must be a positive integer"),
    ("subsequence_n_too_big", lambda: subsequence(10, 20), r"n_steps=20 must be an integer in 1..T=10"),
    ("subsequence_spacing", lambda: subsequence(10, 5, "random"), r"spacing='random' is unknown"),
    ("subsequence_offset", lambda: subsequence(10, 5, "leading", steps_offset=50), r"steps_offset=50"),
]
for cid, fn, pat in SAMPLERS:
    case("samplers-" + cid, fn, pat)

# ---- objectives -------------------------------------------------------------------------------------------------
torch.manual_seed(0)
NET = MLPPredictor(VP(), "eps", dim=2, hidden=8, depth=1).double()
NET32 = MLPPredictor(VP(), "eps", dim=2, hidden=8, depth=1)
NET_RF = MLPPredictor(RectifiedFlow(), "velocity", dim=2, hidden=8, depth=1).double()
FAKE = MLPPredictor(VP(), "v", dim=2, hidden=8, depth=1).double()
T4 = torch.full((4,), 0.5, dtype=F64)
OBJ = [
    ("denoising_x0_empty", lambda: denoising_loss(NET, torch.zeros(0, 2, dtype=F64)), r"x0 must have shape \(batch, \*shape\) with batch >= 1"),
    ("denoising_x0_int", lambda: denoising_loss(NET, torch.zeros(4, 2, dtype=torch.long)), r"x0 must be a floating"),
    ("denoising_x0_list", lambda: denoising_loss(NET, [[0.0, 0.0]]), r"x0 must be a floating"),
    ("denoising_x0_nan", lambda: denoising_loss(NET, x2() * NAN), r"denoising_loss.*not finite"),
    ("denoising_mixed_dtype", lambda: denoising_loss(NET32, x2()), r"x_t has dtype torch.float64 but this MLP's weights"),
    ("denoising_weighting", lambda: denoising_loss(NET, x2(), weighting="p2"), r"weighting='p2' is unknown"),
    ("denoising_target", lambda: denoising_loss(NET, x2(), target="noise"), r"(target|prediction)='noise' is unknown"),
    ("denoising_t_out", lambda: denoising_loss(NET, x2(), t=torch.full((4,), 2.0, dtype=F64)), r"t=2 is outside"),
    ("denoising_t_nan", lambda: denoising_loss(NET, x2(), t=torch.full((4,), NAN, dtype=F64)), r"t contains NaN"),
    ("denoising_t_and_sampler", lambda: denoising_loss(NET, x2(), t=T4, t_sampler="uniform"), r"give either t"),
    ("denoising_sampler_unknown", lambda: denoising_loss(NET, x2(), t_sampler="beta"), r"kind='beta' is unknown"),
    ("denoising_sampler_shape", lambda: denoising_loss(NET, x2(), t_sampler=lambda n, g: torch.zeros(n + 1)),
     r"t_sampler returned shape \(5,\)"),
    ("denoising_reduction", lambda: denoising_loss(NET, x2(), reduction="avg"), r"reduction='avg' is unknown"),
    ("denoising_no_process", lambda: denoising_loss(torch.nn.Linear(2, 2), x2()), r"needs a predictor with a .process"),
    ("denoising_eps_shape", lambda: denoising_loss(NET, x2(), eps=torch.zeros(4, 3, dtype=F64)), r"eps has shape"),
    ("flow_matching_sigma_min", lambda: flow_matching_loss(NET_RF, x2(), sigma_min=1.5), r"sigma_min=1.5 must be"),
    ("flow_matching_sigma_min_nan", lambda: flow_matching_loss(NET_RF, x2(), sigma_min=NAN), r"sigma_min=nan must be"),
    ("sample_t_n_zero", lambda: sample_t(VP(), 0), r"n=0 must be a positive integer"),
    ("sample_t_discrete_on_vp", lambda: sample_t(VP(), 4, "discrete"), r"'discrete' needs a discrete process"),
    ("sample_t_lo_hi", lambda: sample_t(VP(), 4, "uniform", lo=0.8, hi=0.2), r"lo < hi"),
    ("sample_t_lognormal_std", lambda: sample_t(VP(), 4, "edm_lognormal", P_std=-1.0), r"P_std=-1.0 must be positive"),
    ("sim_distance_unknown", lambda: sim_generator_loss(x2(), TEACHER, FAKE, T4, distance="cosine"), r"distance='cosine'"),
    ("sim_space_unknown", lambda: sim_generator_loss(x2(), TEACHER, FAKE, T4, space="eps"), r"space='eps' is unknown"),
    ("sim_t_missing", lambda: sim_generator_loss(x2(), TEACHER, FAKE, None), r"t is required"),
    ("sim_t_zero", lambda: sim_generator_loss(x2(), TEACHER, FAKE, torch.zeros(4, dtype=F64)), r"sigma\(t\) = 0"),
    ("sim_x0_nan", lambda: sim_generator_loss(x2() * NAN, TEACHER, FAKE, T4), r"sim_generator_loss.*not finite"),
    ("sim_x0_empty", lambda: sim_generator_loss(torch.zeros(0, 2, dtype=F64), TEACHER, FAKE, T4), r"x0 must be"),
    ("sim_weight_shape", lambda: sim_generator_loss(x2(), TEACHER, FAKE, T4, weight=torch.ones(3)), r"weight has shape \(3,\)"),
    ("sim_teacher_no_process", lambda: sim_generator_loss(x2(), object(), FAKE, T4), r"teacher=object must be a Predictor"),
    ("sim_process_mismatch", lambda: sim_generator_loss(x2(), GaussianMixture(MEANS, 0.1, process=VE()), FAKE, T4),
     r"teacher.process=VE.* and fake.process=VP.* differ"),
    ("sim_mixed_dtype", lambda: sim_generator_loss(x2(dtype=F32), TEACHER, FAKE, T4), r"x_t has dtype torch.float32 but"),
    ("sid_alpha_nan", lambda: sid_generator_loss(x2(), TEACHER, FAKE, T4, alpha=NAN), r"alpha=nan must be a finite"),
    ("sid_alpha_string", lambda: sid_generator_loss(x2(), TEACHER, FAKE, T4, alpha="1.2"), r"alpha='1.2' must be"),
    ("sid_weighting", lambda: sid_generator_loss(x2(), TEACHER, FAKE, T4, weighting="edm"), r"weighting='edm' is unknown"),
    ("sid_x0_nan", lambda: sid_generator_loss(x2() * NAN, TEACHER, FAKE, T4), r"sid_generator_loss.*not finite"),
    ("di_space", lambda: diff_instruct_loss(x2(), TEACHER, FAKE, T4, space="v"), r"space='v' is unknown"),
    ("di_eps_shape", lambda: diff_instruct_loss(x2(), TEACHER, FAKE, T4, eps=torch.zeros(3, 2, dtype=F64)),
     r"eps has shape \(3, 2\)"),
    ("p_sim_std", lambda: p_sim(VP(), P_std=0.0), r"P_std=0.0 must be a positive"),
    ("p_sim_range", lambda: p_sim(VP(), sigma_min=10.0, sigma_max=1.0), r"sigma_min < sigma_max"),
    ("p_sim_n_zero", lambda: p_sim(VP())(0), r"n=0 must be a positive integer"),
    ("p_edm_sigma_max_out", lambda: p_edm(VP(), sigma_max=1e9), r"sigma_max"),
    ("p_sid_from_end", lambda: p_sid(VP(), from_end="middle"), r"from_end='middle'"),
    ("p_sid_k_max", lambda: p_sid(VP(), k_max=5000), r"k_max=5000 must be an integer"),
    ("karras_grid_K", lambda: karras_sigma_grid(1), r"K=1 must be an integer >= 2"),
    ("karras_grid_order", lambda: karras_sigma_grid(10, 5.0, 1.0), r"need 0 < sigma_min < sigma_max"),
    ("karras_grid_rho", lambda: karras_sigma_grid(10, rho=0.0), r"rho=0.0 must be a positive"),
]
for cid, fn, pat in OBJ:
    exc = FloatingPointError if "not finite" in pat else ValueError
    case("objectives-" + cid, fn, pat, exc)

# ---- generators -------------------------------------------------------------------------------------------------
GEN = [
    ("mlp_dim_zero", lambda: MLPGenerator(0), r"dim=0 must be a positive integer"),
    ("mlp_hidden_float", lambda: MLPGenerator(2, hidden=3.5), r"hidden=3.5 must be a positive integer"),
    ("mlp_depth_negative", lambda: MLPGenerator(2, depth=-1), r"depth=-1 must be a positive integer"),
    ("mlp_init_scale_nan", lambda: MLPGenerator(2, init_scale=NAN), r"init_scale=nan must be a finite number"),
    ("mlp_sample_zero", lambda: MLPGenerator(2).sample(0), r"n=0 must be a positive integer"),
    ("mlp_sample_float", lambda: MLPGenerator(2).sample(1.5), r"n=1.5 must be a positive integer"),
    ("mlp_sample_generator", lambda: MLPGenerator(2).sample(3, generator=1), r"generator must be a torch.Generator.*got int 1"),
    ("affine_structure", lambda: AffineGaussianGenerator(2, structure="banded"), r"structure='banded'"),
    ("affine_dim_zero", lambda: AffineGaussianGenerator(0), r"event shape 0 must be a positive int"),
    ("affine_mean_shape", lambda: AffineGaussianGenerator(2, mean=torch.zeros(3)), r"mean has 3 entries; expected D=2"),
    ("affine_mean_nan", lambda: AffineGaussianGenerator(2, mean=torch.tensor([NAN, 0.0])), r"mean must be finite"),
    ("mixture_K_zero", lambda: MixtureGenerator(0, (2,)), r"K=0 must be a positive integer"),
    ("dirac_point_shape", lambda: DiracGenerator((2,), point=torch.zeros(3)), r"point has shape"),
    ("dirac_point_nan", lambda: DiracGenerator((2,), point=torch.tensor([NAN, 0.0])), r"point must be finite"),
]
for cid, fn, pat in GEN:
    case("generators-" + cid, fn, pat)


# ---- distillation ------------------------------------------------------------------------------------------------
def _distill(**kw):
    process = VP()
    torch.manual_seed(0)
    args = dict(generator_model=MLPGenerator(2, hidden=8, depth=1), teacher=GaussianMixture(MEANS, 0.1, process=process),
                fake=MLPPredictor(process, "v", dim=2, hidden=8, depth=1), generator_loss_fn=diff_instruct_loss,
                steps=2, lr_gen=1e-3, lr_fake=1e-3, batch_size=8, t_sampler_gen=p_sim(process, sigma_min=0.002),
                t_sampler_fake=p_edm(process, sigma_min=0.002), progress=False)
    args.update(kw)
    return distill(**args)


DIS = [
    ("steps_zero", dict(steps=0), r"steps=0 must be a positive integer"),
    ("steps_float", dict(steps=2.5), r"steps=2.5 must be a positive integer"),
    ("fake_steps_zero", dict(fake_steps=0), r"fake_steps=0"),
    ("fake_warmup_negative", dict(fake_warmup=-1), r"fake_warmup=-1 must be a non-negative integer"),
    ("batch_zero", dict(batch_size=0), r"batch_size=0"),
    ("lr_gen_zero", dict(lr_gen=0.0), r"lr_gen=0.0 must be a positive finite number"),
    ("lr_gen_nan", dict(lr_gen=NAN), r"lr_gen=nan must be a positive finite number"),
    ("lr_fake_inf", dict(lr_fake=INF), r"lr_fake=inf must be a positive finite number"),
    ("lr_fake_string", dict(lr_fake="1e-3"), r"lr_fake='1e-3' must be a positive finite number"),
    ("betas_bad", dict(betas=(0.0, 1.5)), r"betas=\(0.0, 1.5\) must be two numbers in \[0, 1\)"),
    ("betas_nan", dict(betas=(NAN, 0.9)), r"betas=\(nan, 0.9\) must be two numbers"),
    ("grad_clip_negative", dict(grad_clip=-1.0), r"grad_clip=-1.0"),
    ("generator_not_module", dict(generator_model=lambda n, g: torch.zeros(n, 2)), r"generator_model must be a dstar_edu"),
    ("loss_not_callable", dict(generator_loss_fn="sim"), r"generator_loss_fn='sim' must be callable"),
    ("t_sampler_gen_bad", dict(t_sampler_gen="p_sim"), r"t_sampler_gen='p_sim' must be a callable"),
    ("ema_decay_bad", dict(ema_decay=1.5), r"ema_decay=1.5 must be in \[0, 1\)"),
    ("callback_every_zero", dict(callback_every=0), r"callback_every=0"),
    ("divergence_bad", dict(divergence="on"), r"divergence='on' must be True"),
    ("mixed_dtype_fake", dict(fake=MLPPredictor(VP(), "v", dim=2, hidden=8, depth=1).double()),
     r"x_t has dtype torch.float32 but this MLP's weights are torch.float64"),
]
for cid, kw, pat in DIS:
    case("distillation-" + cid, lambda kw=kw: _distill(**kw), pat)
case("distillation-fake_is_teacher", lambda: _distill(fake=(m := GaussianMixture(MEANS, 0.1, process=VP())), teacher=m),
     r"fake is the teacher object itself")


# ---- training ----------------------------------------------------------------------------------------------------
def _w():
    return torch.nn.Parameter(torch.ones(2))


def _train(**kw):
    w = _w()
    args = dict(loss_fn=lambda k, g: (w ** 2).sum(), params_or_model=[w], steps=2, progress=False)
    args.update(kw)
    return train(**args)


TRN = [
    ("steps_zero", dict(steps=0), r"steps=0 must be a positive integer"),
    ("steps_bool", dict(steps=True), r"steps=True must be a positive integer"),
    ("lr_zero", dict(lr=0.0), r"lr=0.0 must be a positive finite number"),
    ("lr_nan", dict(lr=NAN), r"lr=nan must be a positive finite number"),
    ("lr_inf", dict(lr=INF), r"lr=inf must be a positive finite number"),
    ("optimizer", dict(optimizer="sgd"), r"optimizer='sgd' is unknown"),
    ("lr_schedule", dict(lr_schedule="linear"), r"lr_schedule='linear' is unknown"),
    ("grad_clip", dict(grad_clip=-1.0), r"grad_clip=-1.0 must be a positive"),
    ("warmup", dict(warmup=-2), r"warmup=-2 must be a non-negative integer"),
    ("ema_type", dict(ema=0.99), r"ema must be a dstar_edu.training.EMA"),
    ("params_empty", dict(params_or_model=[]), r"there are no trainable parameters"),
    ("params_type", dict(params_or_model=3), r"params_or_model must be an nn.Module or an iterable"),
    ("loss_not_scalar", dict(loss_fn=lambda k, g: torch.ones(3, requires_grad=True)), r"loss_fn must return a scalar tensor"),
    ("loss_float", dict(loss_fn=lambda k, g: 1.0), r"loss_fn must return a scalar tensor, got float"),
    ("divergence_bad", dict(divergence=3), r"divergence=3 must be True"),
    ("betas_bad", dict(betas=(0.9, 1.5)), r"betas=\(0.9, 1.5\) must be two numbers in \[0, 1\)"),
]
for cid, kw, pat in TRN:
    case("training-" + cid, lambda kw=kw: _train(**kw), pat)
case("training-loss_nan", lambda: _train(loss_fn=lambda k, g: _w().sum() * NAN), r"loss is nan at step 0", FloatingPointError)
TRN2D = [
    ("data_unknown", dict(data="circles"), r"data='circles' is unknown; allowed: "),
    ("data_type", dict(data=5), r"data=5 must be a dataset name"),
    ("process_unknown", dict(process="edm2"), r"process name='edm2' is unknown"),
    ("process_type", dict(process=3), r"process must be a Process or a process name"),
    ("objective_unknown", dict(objective="score_matching"), r"objective='score_matching' is unknown"),
    ("prediction_unknown", dict(prediction="noise"), r"prediction='noise' is unknown"),
    ("batch_zero", dict(batch_size=0), r"batch_size=0 must be a positive integer"),
    ("threads_zero", dict(threads=0), r"n=0 must be a positive integer number of threads"),
    ("steps_zero", dict(steps=0), r"steps=0 must be a positive integer"),
    ("kw_with_callable", dict(objective=lambda m, x, g: x.sum(), target="eps"), r"keywords \['target'\] are for the named"),
]
for cid, kw, pat in TRN2D:
    case("training-train_2d-" + cid, lambda kw=kw: train_2d(**{"data": "eight_gaussians", "steps": 2,
                                                                "progress": False, **kw}), pat)

# ---- rewards -----------------------------------------------------------------------------------------------------
RW = [
    ("linear_w_nan", lambda: LinearReward([NAN, 1.0]), r"w must be a non-empty finite vector"),
    ("linear_w_empty", lambda: LinearReward([]), r"w must be a non-empty finite vector"),
    ("linear_b_nan", lambda: LinearReward([1.0, 0.0], b=NAN), r"b=nan must be a finite number"),
    ("linear_x_int", lambda: LinearReward([1.0, 0.0])(torch.zeros(3, 2, dtype=torch.long)), r"x must be a floating-point"),
    ("linear_x_shape", lambda: LinearReward([1.0, 0.0])(torch.zeros(3, 5)), r"x has 5|w has 2|expected 2"),
    ("linear_x_1d", lambda: LinearReward([1.0, 0.0])(torch.zeros(2)), r"x must have shape \(batch, \*shape\)"),
    ("linear_x_empty", lambda: LinearReward([1.0, 0.0])(torch.zeros(0, 2)), r"x must have shape \(batch, \*shape\) with batch >= 1"),
    ("quadratic_scale_zero", lambda: QuadraticReward([0.0, 0.0], scale=0.0), r"scale=0.0 must be a positive finite"),
    ("quadratic_center_inf", lambda: QuadraticReward([INF, 0.0]), r"center must be a non-empty finite vector"),
    ("region_radius_negative", lambda: RegionReward([0.0, 0.0], radius=-1.0), r"radius=-1.0 must be a positive"),
    ("region_temperature_nan", lambda: RegionReward([0.0, 0.0], radius=1.0, temperature=NAN), r"temperature=nan"),
    ("region_x_nan", lambda: RegionReward([0.0, 0.0], radius=1.0)(torch.full((2, 2), NAN)), r"non-finite|x contains"),
]
for cid, fn, pat in RW:
    exc = FloatingPointError if "non-finite" in pat else ValueError
    case("rewards-" + cid, fn, pat, (ValueError, FloatingPointError))

# ---- metrics -----------------------------------------------------------------------------------------------------
A = x2(50)
B = x2(60) + 0.1
MET = [
    ("sw_projections_zero", lambda: metrics.sliced_wasserstein(A, B, n_projections=0), r"n_projections=0 must be a positive integer"),
    ("sw_projections_negative", lambda: metrics.sliced_wasserstein(A, B, n_projections=-5), r"n_projections=-5"),
    ("sw_projections_float", lambda: metrics.sliced_wasserstein(A, B, n_projections=2.5), r"n_projections=2.5"),
    ("sw_x_nan", lambda: metrics.sliced_wasserstein(A * NAN, B), r"x contains NaN or inf"),
    ("sw_y_inf", lambda: metrics.sliced_wasserstein(A, B * INF), r"y contains NaN or inf"),
    ("sw_x_empty", lambda: metrics.sliced_wasserstein(torch.zeros(0, 2), B), r"x must have at least one sample"),
    ("sw_y_empty", lambda: metrics.sliced_wasserstein(A, torch.zeros(0, 2)), r"y must have at least one sample"),
    ("sw_dim_mismatch", lambda: metrics.sliced_wasserstein(A, torch.zeros(5, 3)), r"x has dimension 2 but y has dimension 3"),
    ("sw_x_int", lambda: metrics.sliced_wasserstein(A.long(), B), OK(lambda r: math.isfinite(r) and r > 0,
                                                                      "integer points are points: finite distance")),
    ("sw_x_list", lambda: metrics.sliced_wasserstein([[0.0, 0.0]], B), r"x must be a tensor"),
    ("sw_generator", lambda: metrics.sliced_wasserstein(A, B, generator=3), r"generator must be a torch.Generator.*got int 3"),
    ("sw_same", lambda: metrics.sliced_wasserstein(A, A), OK(lambda r: r == 0.0, "a sample is at distance 0 from itself")),
    ("floor_repeats_one", lambda: metrics.sw_noise_floor(lambda n, g: torch.randn(n, 2, generator=g), 20, repeats=1),
     r"repeats=1 must be an integer >= 2"),
    ("floor_repeats_zero", lambda: metrics.sw_noise_floor(lambda n, g: torch.randn(n, 2, generator=g), 20, repeats=0),
     r"repeats=0 must be an integer >= 2"),
    ("floor_n_zero", lambda: metrics.sw_noise_floor(lambda n, g: torch.randn(n, 2, generator=g), 0), r"n=0 must be a positive integer"),
    ("floor_sampler", lambda: metrics.sw_noise_floor("ring", 10), r"sampler='ring' must be a callable"),
    ("coverage_radius_negative", lambda: metrics.mode_coverage(A, MEANS, radius=-0.1), r"radius=-0.1 must be a positive"),
    ("coverage_radius_nan", lambda: metrics.mode_coverage(A, MEANS, radius=NAN), r"radius=nan must be a positive"),
    ("coverage_min_count", lambda: metrics.mode_coverage(A, MEANS, radius=0.3, min_count=0), r"min_count=0 must be a positive integer"),
    ("coverage_dim", lambda: metrics.mode_coverage(A, torch.zeros(3, 5), radius=0.3), r"x has dimension 2 but means has dimension 5"),
    ("coverage_x_nan", lambda: metrics.mode_coverage(A * NAN, MEANS, radius=0.3), r"x contains NaN or inf"),
    ("coverage_means_empty", lambda: metrics.mode_coverage(A, torch.zeros(0, 2), radius=0.3), r"means must have at least one"),
    ("coverage_x_empty", lambda: metrics.mode_coverage(torch.zeros(0, 2), MEANS, radius=0.3), r"x must have at least one sample"),
]
for cid, fn, pat in MET:
    case("metrics-" + cid, fn, pat)


# ---- CLI (existing subcommands; argparse errors exit 2 with a usage line naming the argument) ----------------------
def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "dstar_edu.cli", *args], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise ValueError(f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


CLI = [
    ("unknown_subcommand", ("frobnicate",), r"(?s)exit 2: .*invalid choice: 'frobnicate'"),
    ("verify_no_match", ("verify", "-k", "no-such-check-xyz"), r"exit 2: no check id contains 'no-such-check-xyz'"),
    ("verify_unknown_option", ("verify", "--fast"), r"(?s)exit 2: .*unrecognized arguments: --fast"),
    ("list_unknown_option", ("list", "--all"), r"(?s)exit 2: .*unrecognized arguments: --all"),
    ("errata_extra", ("errata", "x"), r"(?s)exit 2: .*unrecognized arguments: x"),
    ("k_missing_value", ("list", "-k"), r"(?s)exit 2: .*argument -k: expected one argument"),
]
for cid, args, pat in CLI:
    case("cli-" + cid, lambda args=args: _cli(*args), pat)


@pytest.mark.parametrize("fn, expect, exc", CASES)
def test_bad_input(fn, expect, exc):
    if isinstance(expect, OK):
        result = fn()
        assert expect.check(result), f"expected: {expect.what}; got {result!r}"
        return
    with pytest.raises(exc, match=expect):
        fn()


def test_case_count():
    assert len(CASES) >= 350, len(CASES)
