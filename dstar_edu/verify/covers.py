"""What each check covers: the library functions it exercises, by check id (without ``.2d`` / ``.3072d``).

``register`` reads this table (``Check.covers``); ``dstar-edu list --covers CITATION`` and ``--function NAME``
answer from it, through the static index. How the lists were made: each check was run once under
``python -m dstar_edu.verify.tracing``, which names every ``dstar_edu`` function outside ``verify`` that the check
calls directly; of those, kept are the functions implementing the tested statement, dropped are fixtures and
plumbing (``q_sample`` drawing the inputs, ``Generator.noise``, exact teachers' ``predict``, metrics), unless the
statement is about them. An erratum check covers the library functions that compute its corrected side
(``registry.Erratum``). The Eq. 8-13 checks in ``checks/process.py`` compute
their posterior through the library's one ``ddpm_posterior`` and ``ddim_update`` and also name the coefficient
tables they read (``DDPM.alpha_bars``, ``DDPM.step_alpha``). ``tests/test_verify_covers.py`` fails when
a check covers nothing, names something that is not a ``dstar_edu`` callable, or (on a sample) does not call it.
"""
from __future__ import annotations

__all__ = ["COVERS"]

COVERS: dict[str, tuple[str, ...]] = {
    # ---- basics.*
    "basics.forward_chaining": (
        "dstar_edu.process.ddpm_betas", "dstar_edu.process.DDPM.alphas", "dstar_edu.process.DDPM.alpha_bars"
    ),
    "basics.forward_chaining_mc": (
        "dstar_edu.process.ddpm_betas", "dstar_edu.process.DDPM.alphas", "dstar_edu.process.DDPM.alpha_bars"
    ),
    "basics.tweedie": ("dstar_edu.conversions.eps_from_score", "dstar_edu.conversions.x0_from_eps"),
    "basics.posterior_eq8": (
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.process.DDPM.alpha_bars", "dstar_edu.process.DDPM.step_alpha"
    ),
    "basics.posterior_forms": (
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.samplers.diffusion.ddim_update",
        "dstar_edu.process.DDPM.alpha_bars", "dstar_edu.process.DDPM.step_alpha"
    ),
    "basics.eq12_denominator": (
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.process.DDPM.alpha_bars", "dstar_edu.process.DDPM.step_alpha"
    ),
    "basics.eq13_coefficient": (
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.process.DDPM.alpha_bars", "dstar_edu.process.DDPM.step_alpha"
    ),
    "basics.conditional_score": ("dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.score_from_eps"),
    "basics.eq15_marginal_score": ("dstar_edu.conversions.convert",),
    "basics.triangular_diffusion": (
        "dstar_edu.conversions.from_x0_eps", "dstar_edu.conversions.to_x0_eps",
        "dstar_edu.conversions.cm_c_skip_c_out", "dstar_edu.conversions.eps_from_v",
        "dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.eps_from_x0_via_v",
        "dstar_edu.conversions.v_from_x0_eps", "dstar_edu.conversions.x0_from_v"
    ),
    "basics.v_is_dx_dphi": ("dstar_edu.conversions.angle_phi", "dstar_edu.conversions.v_from_x0_eps"),
    "basics.triangular_instaflow": (
        "dstar_edu.conversions.eps_from_instaflow_v", "dstar_edu.conversions.eps_from_x0",
        "dstar_edu.conversions.instaflow_gamma", "dstar_edu.conversions.instaflow_y",
        "dstar_edu.conversions.x0_from_instaflow_eps", "dstar_edu.conversions.x0_from_instaflow_v"
    ),
    "basics.velocity_mapping": (
        "dstar_edu.conversions.instaflow_gamma", "dstar_edu.conversions.instaflow_v_closed_form",
        "dstar_edu.conversions.instaflow_v_from_diffusion_v", "dstar_edu.conversions.instaflow_y",
        "dstar_edu.conversions.v_from_x0_eps"
    ),
    "basics.weighted_regression": ("dstar_edu.conversions.instaflow_v_from_diffusion_v",),
    "basics.unified_velocity_vp": ("dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.velocity_from_score"),
    "basics.unified_velocity_ddpm": (
        "dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.velocity_from_score"
    ),
    "basics.unified_velocity_ve": ("dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.velocity_from_score"),
    "basics.unified_velocity_rectified_flow": (
        "dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.velocity_from_score"
    ),
    "basics.unified_velocity_trigflow": (
        "dstar_edu.conversions.eps_from_x0", "dstar_edu.conversions.velocity_from_score"
    ),
    "basics.process_derivatives": ("dstar_edu.process.Process.d_alpha", "dstar_edu.process.Process.d_sigma"),
    "basics.vlb_term": ("dstar_edu.process.DDPM.alpha_bars", "dstar_edu.process.DDPM.step_alpha"),
    "basics.notation_diffusers": (
        "dstar_edu.process.DDPM.from_diffusers_config", "dstar_edu.process.Process.alpha_bar",
        "dstar_edu.process.DDPM.step_alpha", "dstar_edu.process.Process.edm_sigma"
    ),
    "basics.consistency_boundary": (
        "dstar_edu.conversions.trigflow_f", "dstar_edu.conversions.consistency_f",
        "dstar_edu.conversions.velocity_from_score"
    ),
    "basics.sm_loss_weight": ("dstar_edu.process.Process.alpha_bar",),
    # ---- samplers.*
    "samplers.ddim_eta1_is_ddpm": (
        "dstar_edu.samplers.diffusion.ddpm_step", "dstar_edu.samplers.diffusion.ddim_step",
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.ddim_eta0_ode_order": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.dpm_solver1_is_ddim": (
        "dstar_edu.times.subsequence", "dstar_edu.samplers.diffusion.ddim",
        "dstar_edu.samplers.diffusion.dpm_solver", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.dpm_solver_orders": (
        "dstar_edu.samplers.diffusion.dpm_solver", "dstar_edu.times.logsnr_grid"
    ),
    "samplers.subsequence_eq10": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.samplers.diffusion.ddpm_posterior",
        "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.subsequence_claim_value": ("dstar_edu.process.DDPM.alpha_bars", "dstar_edu.process.DDPM.step_alpha"),
    "samplers.alg1_x0_hat": ("dstar_edu.conversions.x0_from_eps",),
    "samplers.alg1_mean": (
        "dstar_edu.samplers.diffusion.ddpm_step", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.alg1_sigma": (
        "dstar_edu.samplers.diffusion.ddim_sigma", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.alg2_eps_coefficient": (
        "dstar_edu.samplers.diffusion.ddpm_step", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.alg2_noise_scale": (
        "dstar_edu.samplers.diffusion.ddim_sigma", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.alg3_x0_hat": ("dstar_edu.conversions.x0_from_eps",),
    "samplers.alg3_mean": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.samplers.diffusion.ddim_sigma",
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.alg3_sigma": (
        "dstar_edu.samplers.diffusion.ddim_sigma", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.ddpm_text_step_iii": (
        "dstar_edu.samplers.diffusion.ddpm_step", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.eta0_remark": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.sde_ode_marginals_vp": (
        "dstar_edu.samplers.diffusion.pf_ode", "dstar_edu.samplers.diffusion.reverse_sde"
    ),
    "samplers.sde_ode_marginals_ve": (
        "dstar_edu.times.karras_sigmas", "dstar_edu.samplers.diffusion.pf_ode",
        "dstar_edu.samplers.diffusion.reverse_sde"
    ),
    "samplers.smld_convergence": ("dstar_edu.samplers.diffusion.smld",),
    "samplers.diffusers_ddpm_step": (
        "dstar_edu.samplers.diffusion.ddpm_step", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.diffusers_ddim_step": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.diffusers_interop.diffusers_ddim_transitions",
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.diffusers_edm_euler_step": (
        "dstar_edu.diffusers_interop.edm_preconditioning", "dstar_edu.samplers.diffusion.pf_ode_step",
        "dstar_edu.times.karras_sigmas", "dstar_edu.times.rho_grid"
    ),
    "samplers.prop23_lcm_is_ddim": ("dstar_edu.samplers.consistency.lcm",),
    "samplers.lcm_fresh_noise": ("dstar_edu.samplers.consistency.lcm_step",),
    "samplers.lcm_plugin_index": (
        "dstar_edu.times.lcm_timesteps", "dstar_edu.process.Process.alpha_bar"
    ),
    "samplers.consistency_exact_f": (
        "dstar_edu.samplers.consistency.consistency_multistep_step", "dstar_edu.samplers.consistency.lcm_step"
    ),
    "samplers.lcm_tweedie_variance_loss": ("dstar_edu.samplers.consistency.lcm_step",),
    "samplers.cm_prior": (
        "dstar_edu.samplers.consistency.consistency_multistep", "dstar_edu.process.Process.prior_sample"
    ),
    "samplers.cm_mixture_sw": ("dstar_edu.samplers.consistency.consistency_multistep",),
    "samplers.instaflow_alg6_coefficient": (
        "dstar_edu.samplers.flow.instaflow_beta", "dstar_edu.samplers.flow.instaflow_posterior_step",
        "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "samplers.instaflow_alg8_gamma": (
        "dstar_edu.samplers.flow.instaflow_beta", "dstar_edu.samplers.flow.instaflow_ddim_step",
        "dstar_edu.samplers.diffusion.ddpm_posterior", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.instaflow_alg8_sigma": (
        "dstar_edu.samplers.flow.instaflow_beta", "dstar_edu.samplers.flow.instaflow_ddim_step",
        "dstar_edu.samplers.flow.instaflow_posterior_step", "dstar_edu.samplers.diffusion.ddpm_posterior",
        "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "samplers.instaflow_alg7": (
        "dstar_edu.samplers.flow.instaflow_simplified_step", "dstar_edu.samplers.flow.instaflow_beta",
        "dstar_edu.samplers.flow.instaflow_posterior_step"
    ),
    "samplers.instaflow_convergence": (
        "dstar_edu.samplers.flow.instaflow_posterior_step", "dstar_edu.samplers.flow.instaflow_ddim_step",
        "dstar_edu.samplers.flow.instaflow_beta"
    ),
    "samplers.instaflow_mc": (
        "dstar_edu.samplers.flow.instaflow_posterior_step", "dstar_edu.samplers.flow.instaflow_simplified_step",
        "dstar_edu.samplers.flow.instaflow_ddim_step", "dstar_edu.samplers.flow.instaflow",
        "dstar_edu.samplers.flow.instaflow_beta", "dstar_edu.samplers.flow.instaflow_prior"
    ),
    "samplers.instaflow_prior": (
        "dstar_edu.samplers.flow.instaflow_beta", "dstar_edu.samplers.flow.instaflow_ddim_step"
    ),
    "samplers.rf_euler_rate": ("dstar_edu.conversions.from_x0_eps", "dstar_edu.samplers.flow.rectified_flow_euler"),
    "samplers.rf_euler_rate_empirical": ("dstar_edu.samplers.flow.rectified_flow_euler",),
    "samplers.rf_diffusers": (
        "dstar_edu.samplers.flow.rectified_flow_euler_step", "dstar_edu.times.flow_match_timesteps",
        "dstar_edu.samplers.flow.rectified_flow_euler"
    ),
    "samplers.lcm_diffusers": (
        "dstar_edu.samplers.consistency.lcm", "dstar_edu.times.lcm_timesteps",
        "dstar_edu.process.DDPM.from_diffusers_config"
    ),
    "samplers.scm_diffusers": (
        "dstar_edu.samplers.consistency.consistency_multistep_step", "dstar_edu.times.trigflow_timesteps"
    ),
    "samplers.trigflow_step_is_ddim": ("dstar_edu.samplers.flow.trigflow_step",),
    "samplers.trigflow_convergence": ("dstar_edu.conversions.from_x0_eps", "dstar_edu.samplers.flow.trigflow_step"),
    "samplers.trigflow_prior": (
        "dstar_edu.samplers.consistency.consistency_multistep_step", "dstar_edu.times.trigflow_timesteps"
    ),
    # ---- training.*
    "training.esm_ism": (
        "dstar_edu.objectives.pretrain.explicit_score_matching_loss",
        "dstar_edu.objectives.pretrain.implicit_score_matching_loss"
    ),
    "training.esm_ism_mc": (
        "dstar_edu.objectives.pretrain.explicit_score_matching_loss",
        "dstar_edu.objectives.pretrain.implicit_score_matching_loss"
    ),
    "training.dsm_esm": (
        "dstar_edu.objectives.pretrain.denoising_loss", "dstar_edu.objectives.pretrain.explicit_score_matching_loss"
    ),
    "training.dsm_esm_mc": (
        "dstar_edu.objectives.pretrain.denoising_loss", "dstar_edu.objectives.pretrain.explicit_score_matching_loss"
    ),
    "training.denoising_minimum": (
        "dstar_edu.objectives.pretrain.denoising_loss", "dstar_edu.times.sample_t"
    ),
    "training.cd_ct_gap": (
        "dstar_edu.objectives.pretrain.consistency_distillation_loss",
        "dstar_edu.objectives.pretrain.consistency_training_loss"
    ),
    "training.ct_constant_step": (
        "dstar_edu.objectives.pretrain.consistency_distillation_loss",
        "dstar_edu.objectives.pretrain.consistency_training_loss", "dstar_edu.objectives.pretrain.ddim_denoise"
    ),
    "training.trigflow_ct_gradient": (
        "dstar_edu.objectives.pretrain.consistency_training_loss",
        "dstar_edu.objectives.pretrain.trigflow_ct_gradient_surrogate"
    ),
    "training.ct_gradient_normalisation": (
        "dstar_edu.objectives.pretrain.consistency_training_loss",
        "dstar_edu.objectives.pretrain.trigflow_ct_gradient_surrogate"
    ),
    # ---- distill.*
    "distill.sim_thm31.l2": (
        "dstar_edu.objectives.divergences.SquaredL2.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sim_thm31.alpha_power": (
        "dstar_edu.objectives.divergences.AlphaPower.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sim_thm31.exp_power": (
        "dstar_edu.objectives.divergences.ExpPower.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sim_thm31.huber": (
        "dstar_edu.objectives.divergences.Huber.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sim_thm31.pseudo_huber": (
        "dstar_edu.objectives.divergences.PseudoHuber.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sim_thm31.pseudo_huber_x0": (
        "dstar_edu.objectives.divergences.PseudoHuber.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sim_thm31.l1": (
        "dstar_edu.objectives.divergences.L1.value", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.score_projection": ("dstar_edu.objectives.divergences.PseudoHuber.grad",),
    "distill.sim_gradient_flow": (
        "dstar_edu.objectives.divergences.PseudoHuber.value", "dstar_edu.objectives.divergences.PseudoHuber.grad",
        "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.sid_is_sim_l2": (
        "dstar_edu.objectives.distill.sid_generator_loss", "dstar_edu.objectives.distill.sim_generator_loss"
    ),
    "distill.di_ikl_gradient": (
        "dstar_edu.objectives.distill.diff_instruct_loss", "dstar_edu.objectives.distill.vsd_loss"
    ),
    "distill.sds_is_di_dirac": (
        "dstar_edu.objectives.distill.diff_instruct_loss", "dstar_edu.objectives.distill.sds_loss"
    ),
    "distill.sds_sign": ("dstar_edu.objectives.distill.sds_loss",),
    "distill.vsd_detach_trick": ("dstar_edu.objectives.distill.dmd_loss", "dstar_edu.objectives.distill.vsd_loss"),
    "distill.vsd_global_optimum": ("dstar_edu.process.Process.q_sample",),
    "distill.eq43_score_average": ("dstar_edu.process.Process.q_sample",),
    "distill.fgm_flow_product": (
        "dstar_edu.generators.ExactScorePredictor.predict", "dstar_edu.generators.ExactGenerator.score_predictor"
    ),
    "distill.fgm_thm42": ("dstar_edu.objectives.distill.fgm_generator_loss",),
    "distill.fgm_conditional_field": ("dstar_edu.conversions.from_x0_eps",),
    "distill.table4_grads": (
        "dstar_edu.objectives.divergences.AlphaPower.grad", "dstar_edu.objectives.divergences.AlphaPower.value",
        "dstar_edu.objectives.divergences.ExpPower.grad", "dstar_edu.objectives.divergences.ExpPower.value",
        "dstar_edu.objectives.divergences.Huber.grad", "dstar_edu.objectives.divergences.Huber.value",
        "dstar_edu.objectives.divergences.L1.grad", "dstar_edu.objectives.divergences.L1.value",
        "dstar_edu.objectives.divergences.PseudoHuber.grad", "dstar_edu.objectives.divergences.PseudoHuber.value",
        "dstar_edu.objectives.divergences.SquaredL2.grad", "dstar_edu.objectives.divergences.SquaredL2.value"
    ),
    "distill.table4_exp_power": (
        "dstar_edu.objectives.divergences.ExpPower.grad", "dstar_edu.objectives.divergences.ExpPower.value"
    ),
    "distill.table4_pseudo_huber": (
        "dstar_edu.objectives.divergences.PseudoHuber.grad", "dstar_edu.objectives.divergences.PseudoHuber.value"
    ),
    "distill.huber_branches": ("dstar_edu.objectives.divergences.Huber.value",),
    "distill.alpha_power_text": ("dstar_edu.objectives.divergences.AlphaPower.value",),
    "distill.vsd_dxt_dtheta": (
        "dstar_edu.process.Process.q_sample", "dstar_edu.generators.AffineGaussianGenerator.forward"
    ),
    # ---- align.*
    "align.ddpo_reinforce_unbiased": ("dstar_edu.objectives.reward_finetune.ddpo_sf_loss",),
    "align.ddpo_logprob_gradient": (
        "dstar_edu.objectives.reward_finetune.gaussian_log_prob",
        "dstar_edu.objectives.reward_finetune.transition_stats"
    ),
    "align.ddpo_posterior_restated": (
        "dstar_edu.objectives.reward_finetune.transition_stats", "dstar_edu.samplers.diffusion.ddpm_posterior"
    ),
    "align.draft_k": ("dstar_edu.objectives.reward_finetune.draft_loss",),
    "align.drwr_weight": (
        "dstar_edu.objectives.reward_finetune.drwr_loss", "dstar_edu.objectives.reward_finetune.drwr_weights"
    ),
    "align.kl_optimum": (
        "dstar_edu.objectives.preference.kl_regularized_objective",
        "dstar_edu.objectives.preference.gaussian_kl_optimum",
        "dstar_edu.objectives.preference.kl_optimum_log_partition",
        "dstar_edu.objectives.preference.kl_regularized_optimum"
    ),
    "align.dpo_implicit_reward": (
        "dstar_edu.objectives.preference.dpo_loss", "dstar_edu.objectives.preference.bradley_terry_prob",
        "dstar_edu.objectives.preference.dpo_implicit_reward",
        "dstar_edu.objectives.preference.kl_optimum_log_partition",
        "dstar_edu.objectives.preference.kl_regularized_optimum"
    ),
    "align.distar_cfg_sign": (
        "dstar_edu.objectives.alignment.cfg_implicit_reward",
        "dstar_edu.objectives.alignment.cfg_implicit_reward_loss"
    ),
    "align.dipp_thm31": ("dstar_edu.objectives.alignment.diff_instruct_pp_loss",),
    "align.dipp_thm33": ("dstar_edu.objectives.alignment.diff_instruct_pp_loss",),
    "align.distar_in_reference": (
        "dstar_edu.objectives.distill.diff_instruct_loss", "dstar_edu.objectives.alignment.cfg_implicit_reward_loss"
    ),
    "align.distar_thm31_exact": (
        "dstar_edu.objectives.distill.score_divergence", "dstar_edu.objectives.alignment.diff_instruct_star_loss"
    ),
    "align.distar_thm31_mc": (
        "dstar_edu.objectives.alignment.diff_instruct_star_loss", "dstar_edu.objectives.distill.score_divergence"
    ),
    "align.distar_thm31_images": (
        "dstar_edu.objectives.divergences.PseudoHuber.value",
        "dstar_edu.objectives.alignment.diff_instruct_star_loss"
    ),
    "align.dipp_thm31_images": (
        "dstar_edu.generators.MixtureGenerator.log_prob", "dstar_edu.objectives.alignment.diff_instruct_pp_loss"
    ),
    "align.refl_gradient": ("dstar_edu.objectives.reward_finetune.refl_loss",),
    "align.refl_x0_hat": ("dstar_edu.process.Process.alpha_bar", "dstar_edu.process.DDPM.step_alpha"),
    "align.qsm": ("dstar_edu.objectives.reward_finetune.qsm_loss",),
    "align.ddpo_is": (
        "dstar_edu.objectives.reward_finetune.ddpo_is_loss", "dstar_edu.objectives.reward_finetune.ddpo_sf_loss"
    ),
    # ---- guards.*
    "guards.loss_weight": ("dstar_edu.objectives.pretrain.loss_weight",),
    "guards.flow_matching_sigma_min": (
        "dstar_edu.objectives.pretrain.flow_matching_loss", "dstar_edu.objectives.pretrain.denoising_loss"
    ),
    "guards.trigflow_diffusion_target": ("dstar_edu.objectives.pretrain.trigflow_diffusion_loss",),
    "guards.alpha_bar_processes": ("dstar_edu.process.Process.alpha_bar", "dstar_edu.process.Process.edm_sigma"),
    "guards.mixture_log_density": ("dstar_edu.generators.AffineGaussianGenerator.log_prob",),
    "guards.dmd_weighting": ("dstar_edu.objectives.distill.dmd_loss",),
    "guards.heun_step": ("dstar_edu.conversions.velocity_from_score", "dstar_edu.samplers.diffusion.pf_ode_step"),
    "guards.npo_guidance": ("dstar_edu.objectives.preference.npo_guided_eps",),
    "guards.fake_score_loss": ("dstar_edu.objectives.distill.fake_score_loss",),
    "guards.cfg_dropout": ("dstar_edu.objectives.pretrain.denoising_loss",),
    "guards.cd_cfg_teacher": ("dstar_edu.objectives.pretrain.ddim_denoise",),
    "guards.diffusion_dpo": (
        "dstar_edu.objectives.preference.diffusion_dpo_loss", "dstar_edu.objectives.preference.diffusion_npo_loss"
    ),
    "guards.lognormal_time_distributions": (
        "dstar_edu.times.p_edm", "dstar_edu.times.p_sim", "dstar_edu.times.lognormal_edm_sigma",
        "dstar_edu.times.t_from_edm_sigma"
    ),
    # ---- distill.traj.*
    "distill.traj.pd_target": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.objectives.trajectory.pd_target",
        "dstar_edu.objectives.trajectory.teacher_two_steps", "dstar_edu.objectives.trajectory.halve_timesteps",
        "dstar_edu.times.subsequence", "dstar_edu.samplers.diffusion.ddim_update"
    ),
    "distill.traj.pd_halving": (
        "dstar_edu.objectives.trajectory.halve_timesteps", "dstar_edu.objectives.trajectory.pd_halving_schedule"
    ),
    "distill.traj.guided_pd_cfg": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.objectives.trajectory.teacher_two_steps"
    ),
    "distill.traj.cd_exact_zero": ("dstar_edu.objectives.pretrain.consistency_distillation_loss",),
    "distill.traj.cd_cfg_eq23": (
        "dstar_edu.samplers.diffusion.ddim_step", "dstar_edu.objectives.pretrain.consistency_distillation_loss"
    ),
    "distill.traj.cd_to_ct": (
        "dstar_edu.objectives.pretrain.consistency_distillation_loss",
        "dstar_edu.objectives.pretrain.consistency_training_loss"
    ),
    "distill.traj.ect_continuous_limit": (
        "dstar_edu.objectives.trajectory.ect_loss", "dstar_edu.objectives.trajectory.ect_mapping",
        "dstar_edu.objectives.pretrain.trigflow_ct_gradient_surrogate"
    ),
    "distill.traj.sct_variance": (
        "dstar_edu.objectives.trajectory.ct_score_target", "dstar_edu.objectives.trajectory.sct_score_target"
    ),
    "distill.traj.sct_normalisation": ("dstar_edu.objectives.trajectory.sct_score_target",),
    "distill.traj.pcd_phases": (
        "dstar_edu.objectives.trajectory.phased_sampling",
        "dstar_edu.objectives.trajectory.phased_consistency_distillation_loss",
        "dstar_edu.objectives.trajectory.phase_edges"
    ),
    "distill.traj.reflow_marginals": ("dstar_edu.samplers.diffusion.ddim",),
    "distill.traj.reflow_straightness": (
        "dstar_edu.objectives.trajectory.reflow_loss", "dstar_edu.objectives.trajectory.straightness",
        "dstar_edu.samplers.diffusion.ddim"
    ),
    "distill.traj.velocity_mapped_weight": ("dstar_edu.objectives.trajectory.velocity_mapped_loss",),
    "distill.traj.dmd2_gan_shared_backbone": (
        "dstar_edu.objectives.distill.dmd_loss", "dstar_edu.objectives.distill.dmd_gan_generator_loss"
    ),
    "distill.traj.diffusion_dpo_reward": ("dstar_edu.objectives.preference.diffusion_dpo_implicit_reward",),
    "distill.traj.diffusion_npo_sign": (
        "dstar_edu.objectives.preference.diffusion_dpo_loss", "dstar_edu.objectives.preference.diffusion_npo_loss"
    ),
    # ---- samplers.parallel.*
    "samplers.parallel.picard": ("dstar_edu.samplers.parallel.picard", "dstar_edu.samplers.diffusion.ddim"),
    "samplers.parallel.picard_euler": (
        "dstar_edu.samplers.parallel.picard", "dstar_edu.samplers.parallel.sequential_solve"
    ),
    "samplers.parallel.parareal": ("dstar_edu.samplers.parallel.parareal",),
}
