"""Mutation harness: break one seed formula in a temporary copy of the package and ask ``dstar-edu verify``.

``MUTATIONS`` lists textual mutations of library formulas, each with the ``verify -k`` patterns of the checks
that guard it. ``run_mutation`` copies ``dstar_edu`` and ``toy_data`` to a temporary directory, replaces the
``old`` text (which must occur exactly once) by ``new``, and runs ``python -m dstar_edu.cli verify -k PATTERN``
there (``PYTHONPATH`` = the copy) for each pattern: the mutation is *caught* when one of them exits non-zero.
Used by ``tests/test_mutations.py`` (a fast handful) and ``bench/bench_mutations.py`` (the full list).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str          # relative to the repository root
    old: str
    new: str
    patterns: tuple    # verify -k patterns of the checks that must catch it


M = Mutation
MUTATIONS = [
    # conversions and samplers (Eq. 7, 14, 18, Sec. 2.6)
    M("eps_from_x0 without alpha", "dstar_edu/conversions.py", "return (x_t - alpha * x0) / sigma",
      "return (x_t - x0) / sigma", ("basics.triangular_diffusion.2d",)),
    M("v with the v-bar sign", "dstar_edu/conversions.py",
      "return torch.sqrt(1 - alpha_bar) * x0 - torch.sqrt(alpha_bar) * eps",
      "return torch.sqrt(alpha_bar) * eps - torch.sqrt(1 - alpha_bar) * x0", ("basics.triangular_diffusion.2d",)),
    M("score_from_eps sign", "dstar_edu/conversions.py", "return -eps / sigma", "return eps / sigma",
      ("basics.conditional_score.2d",)),
    M("DDIM step ignores sigma in the eps coefficient", "dstar_edu/samplers/diffusion.py",
      "c_eps = math.sqrt(max(sigma2_prev - sigma * sigma, 0.0))",
      "c_eps = math.sqrt(max(sigma2_prev, 0.0))", ("samplers.ddim_eta1_is_ddpm.2d",)),
    M("Heun corrector without the 1/2", "dstar_edu/samplers/diffusion.py",
      "return x + 0.5 * (v + da1 * x0e + ds1 * epse) * dt", "return x + (v + da1 * x0e + ds1 * epse) * dt",
      ("guards.heun_step.2d",)),
    M("alpha_bar of a process = alpha^2", "dstar_edu/process.py", "return a * a / (a * a + s * s)", "return a * a",
      ("guards.alpha_bar_processes",)),
    # consistency models (Eq. 24, 26-27)
    M("consistency re-noising drops alpha(t') (non-VE)", "dstar_edu/samplers/consistency.py",
      "return r * x_from + math.sqrt(max(var, 0.0)) * noise", "return x_from + math.sqrt(max(var, 0.0)) * noise",
      ("samplers.consistency_exact_f.2d",)),
    M("LCM boundary c_out without its square root", "dstar_edu/samplers/consistency.py",
      "s / torch.sqrt(s * s + sigma_data ** 2)", "s / (s * s + sigma_data ** 2)", ("samplers.lcm_diffusers.2d",)),
    M("CD with a CFG teacher guides from the unconditional side", "dstar_edu/objectives/pretrain.py",
      "eps_c = eps_c + cfg_scale * (eps_c - eps_u)", "eps_c = eps_u + cfg_scale * (eps_c - eps_u)",
      ("guards.cd_cfg_teacher",)),
    # exact densities (toy_data)
    M("isotropic mixture posterior mean without alpha", "toy_data/mixtures.py",
      "post = r @ mu + a[:, None] * (x * wl.sum(1, keepdim=True) - a[:, None] * (wl @ mu))",
      "post = r @ mu + (x * wl.sum(1, keepdim=True) - a[:, None] * (wl @ mu))", ("guards.mixture_log_density",)),
    M("isotropic mixture log-density with log(c) once", "toy_data/mixtures.py",
      "log_norm = -0.5 * (sq / c + self.D * torch.log(c) + self.D * math.log(2 * math.pi))",
      "log_norm = -0.5 * (sq / c + torch.log(c) + self.D * math.log(2 * math.pi))", ("guards.mixture_log_density",)),
    M("affine generator log-density without D log(2 pi)", "dstar_edu/generators.py",
      "return -0.5 * (maha + logdet + self.D * math.log(2 * math.pi))", "return -0.5 * (maha + logdet)",
      ("guards.mixture_log_density",)),
    # pre-training losses (Sec. 2.5.1, 3.1)
    M("SNR weighting alpha/sigma", "dstar_edu/objectives/pretrain.py", "snr = a * a / (s * s)", "snr = a / s",
      ("guards.loss_weight",)),
    M("EDM weighting not carried to the target space", "dstar_edu/objectives/pretrain.py",
      "return (sig * sig + sigma_data ** 2) / (sig * sigma_data) ** 2 * gain2",
      "return (sig * sig + sigma_data ** 2) / (sig * sigma_data) ** 2", ("guards.loss_weight",)),
    M("Min-SNR not carried to the target space", "dstar_edu/objectives/pretrain.py",
      "return torch.clamp(snr, max=min_snr_gamma) * gain2", "return torch.clamp(snr, max=min_snr_gamma)",
      ("guards.loss_weight",)),
    M("flow matching target ignores sigma_min", "dstar_edu/objectives/pretrain.py",
      "u = (1 - sigma_min) * eps - x0", "u = eps - x0", ("guards.flow_matching_sigma_min.2d",)),
    M("flow matching path ignores sigma_min", "dstar_edu/objectives/pretrain.py",
      "x_s = (1 - s).to(x0.dtype) * x0 + (sigma_min + (1 - sigma_min) * s).to(x0.dtype) * eps",
      "x_s = (1 - s).to(x0.dtype) * x0 + s.to(x0.dtype) * eps",
      ("guards.flow_matching_sigma_min.2d",)),
    M("TrigFlow diffusion target sign", "dstar_edu/objectives/pretrain.py",
      "v_t = c * z - s_ * x0", "v_t = c * z + s_ * x0",
      ("guards.trigflow_diffusion_target.2d",)),
    M("condition dropout keeps with probability p_uncond", "dstar_edu/objectives/pretrain.py",
      "drop = torch.rand(B, generator=generator, dtype=torch.float64) < p_uncond",
      "drop = torch.rand(B, generator=generator, dtype=torch.float64) > p_uncond", ("guards.cfg_dropout",)),
    # distillation (Sec. 3.2)
    M("fake-score loss without the detach", "dstar_edu/objectives/distill.py",
      "return denoising_loss(fake, x0.detach(), generator=generator,",
      "return denoising_loss(fake, x0, generator=generator,", ("guards.fake_score_loss.2d",)),
    M("DMD weighting without C", "dstar_edu/objectives/distill.py",
      "k = x0[0].numel() / (x0 - D_q).detach().abs().reshape(x0.shape[0], -1).sum(1)",
      "k = 1.0 / (x0 - D_q).detach().abs().reshape(x0.shape[0], -1).sum(1)", ("guards.dmd_weighting.2d",)),
    M("DMD weighting 'none' without the 1/2", "dstar_edu/objectives/distill.py", "k = 0.5 * a / (s * s)",
      "k = a / (s * s)", ("guards.dmd_weighting.2d",)),
    # preference alignment
    M("NPO guidance weight omega on the positive branch", "dstar_edu/objectives/preference.py",
      "return (omega + 1) * eps_pos - omega * eps_neg", "return omega * eps_pos - omega * eps_neg",
      ("guards.npo_guidance",)),
    M("Diffusion-DPO implicit reward without beta", "dstar_edu/objectives/preference.py",
      "return -beta * (err - err_ref)", "return -(err - err_ref)", ("guards.diffusion_dpo",)),
    M("DMD numeric weighting without the 1/2", "dstar_edu/objectives/distill.py",
      'k = 0.5 * sample_weight(weighting, t, x0.shape[0], x0.dtype, "weighting") * a / (s * s)',
      'k = sample_weight(weighting, t, x0.shape[0], x0.dtype, "weighting") * a / (s * s)', ("guards.dmd_weighting.2d",)),
    # reward fine-tuning (Sec. 3.3)
    M("QSM target with the reward gradient's sign flipped", "dstar_edu/objectives/reward_finetune.py",
      "per = ((s - scale * g.detach()) ** 2)", "per = ((s + scale * g.detach()) ** 2)", ("align.qsm.2d",)),
    M("DDPO-IS without clipping", "dstar_edu/objectives/reward_finetune.py",
      "ratio.clamp(1 - clip_range, 1 + clip_range)", "ratio", ("align.ddpo_is",)),
    M("ReFL through x_t instead of Tweedie's x_theta", "dstar_edu/objectives/reward_finetune.py",
      "x0_hat, _ = denoise(predictor, x_t, t, cond)", "x0_hat = x_t + 0 * denoise(predictor, x_t, t, cond)[0]",
      ("align.refl_gradient.2d",)),
]


def _copy(dst: Path) -> None:
    for pkg in ("dstar_edu", "toy_data"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_mutation(m: Mutation, timeout: float = 600.0) -> dict:
    """Apply ``m`` in a temporary copy and run ``verify -k`` for its patterns; ``caught`` when one fails."""
    with tempfile.TemporaryDirectory(prefix="dstar_mut_") as tmp:
        tmp = Path(tmp)
        _copy(tmp)
        target = tmp / m.path
        text = target.read_text()
        count = text.count(m.old)
        if count != 1:
            raise ValueError(f"mutation {m.name!r}: the text to replace occurs {count} times in {m.path}, not once")
        target.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
        results = []
        for pattern in m.patterns:
            proc = subprocess.run([sys.executable, "-m", "dstar_edu.cli", "verify", "-k", pattern], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            # caught = the verify table's summary reports failed checks (not an import error or an unknown id)
            failed = proc.returncode == 1 and " failed" in last and not last.split(" passed, ")[-1].startswith("0 ")
            results.append({"pattern": pattern, "returncode": proc.returncode, "summary": last,
                            "failed_checks": failed, "stderr_tail": proc.stderr.strip().splitlines()[-1:]})
            if failed:
                break
        return {"name": m.name, "caught": any(r["failed_checks"] for r in results), "runs": results}
