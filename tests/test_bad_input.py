"""Bad input raises ValueError with a message naming the argument, its value and what is allowed."""
import math
from re import escape as re_escape

import pytest
import torch

from dstar_edu.conversions import convert
from dstar_edu.predictors import FunctionPredictor, MLPPredictor
from dstar_edu.process import DDPM, VE, VP, RectifiedFlow, TrigFlow, make_process
from toy_data.mixtures import EmpiricalDistribution, GaussianMixture

F64 = torch.float64

# (process, printed upper end of its time domain as formatted with :g)
DOMAINS = [
    (DDPM(1000), "1000"),
    (VP(), "1"),
    (VP("cosine"), "0.999"),
    (VE(80.0), "80"),
    (RectifiedFlow(), "1"),
    (TrigFlow(0.5), "1.5708"),
]
IDS = ["ddpm", "vp", "vp_cosine", "ve", "rf", "trigflow"]


def x2(B=4, dtype=F64):
    return torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("proc, hi", DOMAINS, ids=IDS)
def test_time_below_domain(proc, hi):
    pat = rf"t=-0\.1 is outside the time domain \[0, {re_escape(hi)}\]"
    with pytest.raises(ValueError, match=pat):
        proc.alpha(-0.1)
    with pytest.raises(ValueError, match=pat):
        proc.q_sample(x2(), torch.tensor([0.5, 0.2, -0.1, 0.3], dtype=F64))


@pytest.mark.parametrize("proc, hi", DOMAINS, ids=IDS)
def test_time_above_domain(proc, hi):
    bad = proc.t_max + 0.01 * max(1.0, proc.t_max)
    pat = rf"t={re_escape(f'{bad:g}')} is outside the time domain \[0, {re_escape(hi)}\]"
    with pytest.raises(ValueError, match=pat):
        proc.sigma(bad)
    with pytest.raises(ValueError, match=r"outside the time domain"):
        convert(x2(), "eps", "x0", x2(), bad, proc)


def test_ddpm_t_1001():
    with pytest.raises(ValueError, match=r"t=1001 is outside the time domain \[0, 1000\] of DDPM\(T=1000"):
        DDPM(1000).q_sample(x2(), 1001)


@pytest.mark.parametrize("proc, hi", DOMAINS, ids=IDS)
def test_nan_time(proc, hi):
    with pytest.raises(ValueError, match=r"t contains NaN; allowed: the time domain \[0(\.0)?, "):
        proc.alpha(float("nan"))
    with pytest.raises(ValueError, match=r"t contains NaN"):
        proc.q_sample(x2(), torch.tensor([0.1, math.nan, 0.2, 0.3], dtype=F64))


def test_t_batch_mismatch():
    p = DDPM(1000)
    x = x2(4)
    with pytest.raises(ValueError, match=r"t has shape \(3,\) but x_t has shape \(4, 2\).*one entry per batch element"):
        p.q_sample(x, torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    with pytest.raises(ValueError, match=r"t has shape \(3,\) but x_t has shape \(4, 2\)"):
        convert(x, "eps", "x0", x, torch.tensor([1.0, 2.0, 3.0], dtype=F64), p)


def test_t_two_dimensional():
    p = VP()
    x = x2(4)
    with pytest.raises(ValueError, match=r"t must be a scalar or a 1-d tensor of shape \(batch,\), got shape \(4, 1\)"):
        p.q_sample(x, torch.full((4, 1), 0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"t must be a scalar or a 1-d tensor.*\(2, 2\)"):
        p.alpha(torch.full((2, 2), 0.5, dtype=F64))


ALLOWED = r"allowed: eps, x0, score, velocity, v, v_bar, instaflow_v, trigflow_F, cm_f"


def test_unknown_prediction_in_convert():
    x = x2()
    with pytest.raises(ValueError, match=rf"source='foo' is unknown; {ALLOWED}"):
        convert(x, "foo", "x0", x, 0.5, VP())
    with pytest.raises(ValueError, match=rf"target='epsilon' is unknown; {ALLOWED}"):
        convert(x, "eps", "epsilon", x, 0.5, VP())


def test_unknown_prediction_in_predictor():
    p = VP()
    pred = FunctionPredictor(lambda x, t, c: x, p, "eps")
    with pytest.raises(ValueError, match=rf"target='noise' is unknown; {ALLOWED}"):
        pred.predict("noise", x2(), 0.5)
    with pytest.raises(ValueError, match=rf"prediction='noise' is unknown; {ALLOWED}"):
        MLPPredictor(p, prediction="noise")
    with pytest.raises(ValueError, match=rf"prediction='x_0' is unknown; {ALLOWED}"):
        FunctionPredictor(lambda x, t, c: x, p, "x_0")


def test_prediction_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction has shape \(4, 3\) but x_t has shape \(4, 2\)"):
        convert(torch.zeros(4, 3, dtype=F64), "eps", "x0", x2(), 0.5, VP())


def test_trigflow_F_needs_trigflow():
    with pytest.raises(ValueError, match=r"'trigflow_F' is defined for the TrigFlow process only, got VP"):
        convert(x2(), "eps", "trigflow_F", x2(), 0.5, VP())


MEANS = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)


def test_covariance_negative_eigenvalue():
    covs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -0.5]]], dtype=F64)
    with pytest.raises(ValueError, match=r"covs\[1\] is not positive definite \(smallest eigenvalue -0\.5\); "
                                         r"covariances must be positive definite"):
        GaussianMixture(MEANS, covs)


@pytest.mark.parametrize("covs, k", [(0.0, 0), ([1.0, 0.0], 1), ([-1.0, 1.0], 0), ([[0.5, 0.5], [0.0, 1.0]], 1)],
                         ids=["zero_scalar", "zero_isotropic", "negative_isotropic", "zero_diagonal"])
def test_covariance_not_positive(covs, k):
    with pytest.raises(ValueError, match=rf"covs\[{k}\] is not positive definite.*must be positive definite"):
        GaussianMixture(MEANS, covs)


def test_covariance_non_symmetric():
    covs = torch.tensor([[[1.0, 0.5], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
    with pytest.raises(ValueError, match=r"covs must be symmetric; max \|Sigma - Sigma\^T\| = 0\.5"):
        GaussianMixture(MEANS, covs)


def test_covariance_wrong_shape():
    with pytest.raises(ValueError, match=r"covs has shape \(3, 2\); allowed: scalar, \(K,\)=\(2,\)"):
        GaussianMixture(MEANS, torch.ones(3, 2, dtype=F64))


def test_weights_not_summing_to_one():
    with pytest.raises(ValueError, match=r"weights must sum to one, got sum\(weights\)=0\.9"):
        GaussianMixture(MEANS, 1.0, weights=[0.5, 0.4])


def test_weights_negative():
    with pytest.raises(ValueError, match=r"weights must be non-negative, got \[1\.5, -0\.5\]"):
        GaussianMixture(MEANS, 1.0, weights=[1.5, -0.5])


def test_weights_wrong_number():
    with pytest.raises(ValueError, match=r"weights has 3 entries but there are K=2 components"):
        GaussianMixture(MEANS, 1.0, weights=[0.2, 0.3, 0.5])


CONV_PROCS = [DDPM(1000), VP(), VP("cosine"), VE(80.0), RectifiedFlow(), TrigFlow(0.5)]


@pytest.mark.parametrize("proc", CONV_PROCS, ids=IDS)
@pytest.mark.parametrize("source, target", [("x0", "eps"), ("x0", "score"), ("eps", "score"), ("x0", "v")])
def test_conversion_dividing_by_sigma_at_t0_raises(proc, source, target):
    x = x2()
    with pytest.raises(ValueError, match=r"sigma\(t\) is zero at t=\[0\.0\]: this conversion is undefined"):
        convert(x, source, target, x, 0.0, proc)
    # the same conversion is fine (and finite) inside the domain
    assert torch.isfinite(convert(x, source, target, x, 0.3, proc)).all()


def test_conversion_dividing_by_alpha_at_rf_end_raises():
    x = x2()
    with pytest.raises(ValueError, match=r"alpha\(t\) is zero at t=\[1\.0\]"):
        convert(x, "eps", "x0", x, 1.0, RectifiedFlow())


@pytest.mark.parametrize("proc", [DDPM(1000), VP()], ids=["ddpm", "vp"])
@pytest.mark.parametrize("source, target", [("eps", "velocity"), ("velocity", "x0"), ("v", "velocity")])
def test_velocity_conversion_at_t0_raises(proc, source, target):
    x = x2()
    with pytest.raises(ValueError, match=r"t=\[0\.0\]"):
        convert(x, source, target, x, 0.0, proc)


def test_make_process_unknown():
    with pytest.raises(ValueError, match=r"process name='foo' is unknown; allowed: ddpm, edm, rectified_flow, "
                                         r"rf, trigflow, ve, vp$"):
        make_process("foo")


def test_bad_schedules():
    with pytest.raises(ValueError, match=r"schedule='quadratic' is not supported; allowed: 'linear', 'scaled_linear', "
                                         r"'cosine'"):
        DDPM(1000, "quadratic")
    with pytest.raises(ValueError, match=r"schedule='scaled_linear' is unknown; allowed: linear, cosine"):
        VP("scaled_linear")
    with pytest.raises(ValueError, match=r"T=0 must be a positive integer"):
        DDPM(0)


def test_cond_on_unlabeled_mixture():
    mix = GaussianMixture(MEANS, 1.0, process=VP())
    with pytest.raises(ValueError, match=r"cond was given but this mixture has no labels \(pass labels=\.\.\.\)"):
        mix.score(x2(), 0.5, cond=0)
    with pytest.raises(ValueError, match=r"this mixture has no labels; pass labels="):
        mix.conditional(0)


def test_unknown_label():
    mix = GaussianMixture(MEANS, 1.0, labels=[0, 1], process=VP())
    with pytest.raises(ValueError, match=r"cond contains labels \[5\]; allowed: \[0, 1\]"):
        mix.score(x2(), 0.5, cond=5)
    with pytest.raises(ValueError, match=r"cond contains labels \[7\]; allowed: \[0, 1\]"):
        mix.sample(10, cond=7)
    with pytest.raises(ValueError, match=r"label=5 is not a class of this mixture; allowed: \[0, 1\]"):
        mix.conditional(5)


def test_mixture_needs_process_for_t():
    mix = GaussianMixture(MEANS, 1.0)
    with pytest.raises(ValueError, match=r"this mixture has no process: build it with process=\.\.\."):
        mix.score(x2(), 0.5)


def test_empirical_at_sigma_zero():
    emp = EmpiricalDistribution(MEANS, process=VP())
    with pytest.raises(ValueError, match=r"diffused covariance is singular at this t.*use t > t_min"):
        emp.score(x2(), 0.0)
