"""One-step distillation of a diffusers ``UNet2DModel`` teacher on 3x32x32 (CIFAR-10 shaped) images.

Methods (``--method``), all losses from ``dstar_edu.objectives.distill``:

* ``sim`` (default): Score Implicit Matching, SIM Alg. 2 / Eq. B.13 (``sim_generator_loss`` with the
  pseudo-Huber distance, ``space="x0"``), generator times ``p_SIM`` (ln sigma ~ N(-3.5, 2.5^2), Eq. B.9-B.10),
  weight 1; online score: EDM denoising loss (Eq. B.2) with ``p_EDM`` times and ``lambda_EDM`` (Eq. B.5-B.7);
* ``sid``: SiD (``sid_generator_loss``, alpha = 1.2, weight ``1/mean|x0 - D_q|``), Karras-grid times (Eq. B.8);
* ``di``: Diff-Instruct (``diff_instruct_loss``, x0 space, weight 1), ``p_EDM`` times;
* ``dmd``: DMD (``dmd_loss``, x0-space with DMD2's normalisation), ``p_EDM`` times.

Trajectory distillation (``run_trajectory``; losses from ``dstar_edu.objectives.trajectory`` / ``pretrain``): the
student is a copy of the teacher UNet (same process and parameterisation), trained on images (``--data``, an npz with
``x`` uint8 NHWC such as ``cifar10_test1000.npz``; ``--tiny``: seeded random images) with one Adam loss:

* ``pd``: progressive distillation (``progressive_distillation_loss``, handbook Sec. 3.2.1, Wang talk Alg. 2): teacher
  DDIM on ``subsequence(T, 2 N, "trailing")``, student ``N = --student_steps`` steps;
* ``cd``: consistency distillation / LCM (``consistency_distillation_loss``, Eq. 20-22, 47) with ``m = --cd_m`` teacher
  DDIM steps on ``--cd_grid`` DDPM times, cm_f parameterisation (Eq. 24), the online network as target (stop-grad);
* ``ect``: Easy Consistency Tuning (``ect_loss``, Luo talk Alg. 1, Eq. 15), ``dt`` halving every ``--ect_d`` steps.

Generator (SIM Eq. B.4 / SiD): ``x0 = g_theta(z) = d_theta(z, t*)`` with ``z ~ N(0, 2.5^2 I)``: a copy of the
teacher's denoiser at the fixed noise level sigma* = 2.5 (``generators.TeacherInitGenerator``); the online
("fake") score also starts from the teacher. Adam betas (0, 0.999), lr 1e-5 for both (SIM Table 5).
The run is data-free: no CIFAR image is read (FID is left to offline tools, see ``--export_samples``).

The teacher is a local diffusers folder (``--teacher``; e.g. a saved ``google/ddpm-cifar10-32`` pipeline:
``unet/`` + ``scheduler/``), loaded with ``local_files_only=True``. DDPM/DDIM-type schedulers give a ``DDPM``
process (eps / v / x0 prediction from the scheduler config); an ``EDMEulerScheduler`` config gives ``VE`` with
EDM preconditioning. ``--tiny`` builds a tiny random UNet offline (tests, CPU smoke runs).

    accelerate launch scaled_runs/distill_cifar.py --config cifar_sim.yaml
    python scaled_runs/distill_cifar.py --tiny --steps 3 --batch_size 2 --output_dir runs/smoke_cifar
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaled_runs import common  # noqa: E402
from scaled_runs.common import opt  # noqa: E402
from scaled_runs.loop import any_rank  # noqa: E402

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, process_from_scheduler, tiny_unet  # noqa: E402
from dstar_edu.distillation import guarded_update  # noqa: E402
from dstar_edu.generators import TeacherInitGenerator  # noqa: E402
from dstar_edu.objectives.distill import (diff_instruct_loss, dmd_loss, fake_score_loss, p_edm, p_sid,  # noqa: E402
                                          p_sim, sid_generator_loss, sim_generator_loss)
from dstar_edu.process import Process  # noqa: E402

TRAJECTORY_METHODS = ("pd", "cd", "ect")   # run_trajectory: losses of dstar_edu.objectives.trajectory
# The method table: --method NAME -> its generator loss (cfg, x0, teacher, fake, t, eps) -> scalar and its default
# generator time distribution. A new method is one row here (and, if it needs them, its settings in CifarConfig).
GENERATOR_LOSSES = {
    "sim": lambda cfg, x0, teacher, fake, t, eps: sim_generator_loss(
        x0, teacher, fake, t, eps=eps, distance="pseudo_huber", c=cfg.huber_c or None, space=cfg.sim_space),
    "sid": lambda cfg, x0, teacher, fake, t, eps: sid_generator_loss(x0, teacher, fake, t, eps=eps,
                                                                      alpha=cfg.sid_alpha),
    "di": lambda cfg, x0, teacher, fake, t, eps: diff_instruct_loss(x0, teacher, fake, t, eps=eps, space="x0"),
    "dmd": lambda cfg, x0, teacher, fake, t, eps: dmd_loss(x0, teacher, fake, t, eps=eps),
}
DEFAULT_GEN_TIME = {"sim": "sim", "sid": "sid", "di": "edm", "dmd": "edm"}
METHODS = tuple(GENERATOR_LOSSES) + TRAJECTORY_METHODS
GEN_TIMES = ("default", "sim", "edm", "sid")


@dataclass
class CifarConfig(common.BaseConfig):
    """One-step distillation (SIM / SiD / Diff-Instruct / DMD) of a diffusers UNet2DModel on 3x32x32 images."""

    output_dir: str = opt("runs/cifar_distill", "folder for checkpoints/, samples/, metrics.jsonl, config.json")
    teacher: str = opt("", "local diffusers folder: a pipeline (unet/ + scheduler/) or a UNet2DModel folder")
    scheduler: str = opt("", "folder with scheduler_config.json (default: <teacher>/scheduler)")
    method: str = opt("sim", "generator loss", METHODS)
    sigma_star: float = opt(2.5, "EDM noise level of the generator's fixed time t* (SIM Table 5, SiD)")
    gen_time: str = opt("default", "generator time distribution (default: sim->sim, sid->sid, di/dmd->edm)",
                        GEN_TIMES)
    gen_P_mean: float = opt(-3.5, "ln sigma mean of gen_time='sim' (SIM Eq. B.10)")
    gen_P_std: float = opt(2.5, "ln sigma std of gen_time='sim' (SIM Eq. B.10)")
    sigma_min: float = opt(0.0, "lowest noise level drawn (0: edm_sigma(1) for DDPM teachers, 0.002 for EDM)")
    huber_c: float = opt(0.0, "pseudo-Huber c of SIM (0: the library default 0.00054 sqrt(D))")
    sim_space: str = opt("x0", "SIM loss in denoiser space (Alg. 2, Eq. B.13) or score space (Eq. 3.8)", ("x0", "score"))
    sid_alpha: float = opt(1.2, "SiD's alpha")
    fake_target: str = opt("x0", "online-score regression target (x0: the EDM denoiser loss, Eq. B.2)")
    fake_weighting: str = opt("edm", "online-score loss weighting (edm: lambda_EDM, Eq. B.7)",
                              ("edm", "none", "snr", "min_snr"))
    export_samples: int = opt(0, "after training write this many generator samples to samples_<N>.npz (uint8, "
                                 "NHWC) for an offline FID")
    data: str = opt("", "pd/cd/ect: npz of training images (key x: uint8 NHWC), e.g. cifar10_test1000.npz")
    student_steps: int = opt(4, "pd: student DDIM steps N (the teacher takes 2N)")
    cd_grid: int = opt(20, "cd: number of DDPM times in the consistency grid (1 .. T)")
    cd_m: int = opt(1, "cd: teacher DDIM steps per target (Eq. 22 / 47)")
    ect_d: int = opt(1000, "ect: iterations per halving of dt (Eq. 15)")

    def __post_init__(self):
        super().__post_init__()
        if not (self.sigma_star > 0 and self.gen_P_std > 0 and self.sid_alpha > 0 and self.huber_c >= 0
                and self.sigma_min >= 0 and self.export_samples >= 0):
            raise ValueError("need sigma_star > 0, gen_P_std > 0, sid_alpha > 0, huber_c >= 0, sigma_min >= 0, "
                             "export_samples >= 0")
        if not self.tiny and not self.teacher:
            raise ValueError("teacher='' : pass --teacher DIR (a local diffusers folder) or --tiny")
        if self.method in TRAJECTORY_METHODS and not self.tiny and not self.data:
            raise ValueError(f"method={self.method!r} trains on images: pass --data FILE.npz (or --tiny)")
        if self.fsdp and self.method in TRAJECTORY_METHODS:
            raise ValueError(f"fsdp=true with method={self.method!r}: FSDP is wired into the one-step distillation "
                             f"methods {list(GENERATOR_LOSSES)} only")
        if min(self.student_steps, self.cd_grid - 1, self.cd_m, self.ect_d) < 1:
            raise ValueError("need student_steps >= 1, cd_grid >= 2, cd_m >= 1, ect_d >= 1")


CONFIG = CifarConfig


# ---- building the parts -----------------------------------------------------------------------------------------
def load_teacher(cfg: CifarConfig) -> tuple[nn.Module, Any]:
    """The teacher ``UNet2DModel`` (fp32, CPU) and its scheduler (an instance, or a config dict with
    ``_class_name``). ``--tiny``: ``diffusers_interop.tiny_unet(seed)`` with a default ``DDPMScheduler``."""
    from diffusers import DDPMScheduler, UNet2DModel
    if cfg.tiny:
        return tiny_unet(seed=cfg.seed), DDPMScheduler()
    root = Path(cfg.teacher)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"teacher={cfg.teacher!r}: no config.json in {root} or {root / 'unet'}")
    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    sched_dir = Path(cfg.scheduler) if cfg.scheduler else root / "scheduler"
    if not (sched_dir / "scheduler_config.json").is_file():
        raise ValueError(f"no scheduler_config.json in {sched_dir}: pass --scheduler DIR (the teacher's noise "
                         "schedule decides the forward process)")
    return unet.eval(), dict(DDPMScheduler.load_config(sched_dir))


def teacher_predictor(unet: nn.Module, scheduler, process: Process) -> DiffusersUNetPredictor:
    """The teacher as a predictor: prediction type from the scheduler; EDM schedulers get EDM preconditioning."""
    cfg = scheduler if isinstance(scheduler, dict) else dict(scheduler.config)
    name = cfg.get("_class_name") or type(scheduler).__name__
    if "EDM" in name:
        return DiffusersUNetPredictor(unet, process, preconditioning="edm", sigma_data=float(cfg.get("sigma_data", 0.5)),
                                      edm_prediction_type=cfg.get("prediction_type", "epsilon"))
    return DiffusersUNetPredictor(unet, process, cfg.get("prediction_type", "epsilon"))


@dataclass
class Parts:
    teacher: DiffusersUNetPredictor      # frozen, weight dtype, on device
    generator: TeacherInitGenerator      # g(z) = copy of the teacher's denoiser at t* (fp32, trained)
    fake_net: nn.Module                  # the online score network (fp32, trained)
    fake: DiffusersUNetPredictor         # the online score over fake_net
    process: Process                     # the teacher's forward process
    t_fake: Callable                     # (n, cpu generator) -> times of the online-score loss
    t_gen: Callable                      # (n, cpu generator) -> times of the generator loss


def build(cfg: CifarConfig, device, dtype: torch.dtype = torch.float32) -> Parts:
    """Teacher, teacher-initialised generator and online score, all from the same teacher weights (SIM B.2)."""
    unet, scheduler = load_teacher(cfg)
    process = process_from_scheduler(scheduler)
    teacher = teacher_predictor(unet, scheduler, process)
    generator = TeacherInitGenerator(teacher, sigma_star=cfg.sigma_star)   # deep-copies the fp32 teacher
    fake_net = copy.deepcopy(unet).requires_grad_(True).train()
    fake = teacher.with_net(fake_net)
    unet.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:
        unet.to(dtype=dtype)        # frozen teacher in bf16 under bf16 mixed precision
    generator.to(device)
    fake_net.to(device)
    lo, hi = common.sigma_range(process, cfg.sigma_min)
    kind = DEFAULT_GEN_TIME[cfg.method] if cfg.gen_time == "default" else cfg.gen_time
    t_gen = {"sim": lambda: p_sim(process, cfg.gen_P_mean, cfg.gen_P_std, sigma_min=lo, sigma_max=hi),
             "edm": lambda: p_edm(process, sigma_min=lo, sigma_max=hi),
             "sid": lambda: p_sid(process, from_end="min", clamp=(lo, hi))}[kind]()
    return Parts(teacher, generator, fake_net, fake, process, p_edm(process, sigma_min=lo, sigma_max=hi), t_gen)


def draw_batch(parts: Parts, n: int, cpu_rng: torch.Generator, dev_rng: torch.Generator, phase: str):
    """``(z, t, eps)`` of one micro-batch: generator noise ``z ~ N(0, sigma*^2 I)``, times, forward noise."""
    z = parts.generator.noise(n, dev_rng)
    t = (parts.t_fake if phase == "fake" else parts.t_gen)(n, cpu_rng).to(z.device)
    eps = torch.randn(z.shape, generator=dev_rng, dtype=z.dtype, device=z.device)
    return z, t, eps


def generator_loss(cfg: CifarConfig, x0, teacher, fake, t, eps):
    """The method's generator loss from ``dstar_edu.objectives.distill`` with the seeds' settings
    (``GENERATOR_LOSSES[cfg.method]``)."""
    return GENERATOR_LOSSES[cfg.method](cfg, x0, teacher, fake, t, eps)


# ---- the run -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """Parse ``argv`` (``--config FILE`` and/or flags), train, return ``{"records", "checkpoint", "generator",
    "ema", "fake_net", "teacher", "config"}`` (the objects are for in-process tests)."""
    cfg = common.parse_config(CifarConfig, argv)
    accelerator = common.setup_accelerator(cfg)
    try:
        return run(cfg, accelerator)
    finally:
        common.release_accelerator(accelerator)


def run(cfg: CifarConfig, accelerator) -> dict:
    if cfg.method in TRAJECTORY_METHODS:
        return run_trajectory(cfg, accelerator)
    common.seed_all(cfg.seed)
    common.write_config(accelerator, cfg)
    device, rank = accelerator.device, accelerator.process_index
    parts = build(cfg, device, common.weight_dtype(cfg))
    gen = parts.generator

    def fake_loss(step: int, micro: int, fake_train):
        cpu_rng, dev_rng = common.step_generators(cfg.seed, step, "fake", micro, rank, device)
        z, t, eps = draw_batch(parts, cfg.batch_size, cpu_rng, dev_rng, "fake")
        with torch.no_grad():
            x0 = gen(z)
        return fake_score_loss(fake_train, x0, t=t, eps=eps, target=cfg.fake_target,
                               weighting=cfg.fake_weighting), {}

    def gen_loss(step: int, micro: int, fake_eval):
        cpu_rng, dev_rng = common.step_generators(cfg.seed, step, "generator", micro, rank, device)
        z, t, eps = draw_batch(parts, cfg.batch_size, cpu_rng, dev_rng, "generator")
        with common.eval_mode(fake_eval.unet):
            return generator_loss(cfg, gen(z), parts.teacher, fake_eval, t, eps), {}

    def images(model, n: int):
        rng = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003)   # the same noise at every step
        return model(model.noise(n, rng))

    out = common.run_distillation(accelerator, cfg, generator=gen, fake_net=parts.fake_net, fake=parts.fake,
                                  fake_loss=fake_loss, gen_loss=gen_loss, images=images,
                                  meta={"method": cfg.method, "process": repr(parts.process)}, desc=cfg.method)
    if cfg.export_samples:
        export_samples(accelerator, out["ema"].model if out["ema"] is not None else gen, cfg)
    return {**out, "teacher": parts.teacher, "config": cfg}


def export_samples(accelerator, model, cfg: CifarConfig) -> Path | None:
    """``cfg.export_samples`` one-step samples as ``samples_<N>.npz`` (key ``x``: uint8 ``(N, 32, 32, 3)``), split
    over the processes and gathered: the input of an offline FID (Inception weights need a download, so no FID
    is computed here)."""
    import numpy as np
    n, P = cfg.export_samples, accelerator.num_processes
    per = math.ceil(n / P)
    rng = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + 7919 * (accelerator.process_index + 1))
    chunks = []
    with torch.no_grad(), accelerator.autocast():
        for i in range(0, per, cfg.batch_size):
            x = model(model.noise(min(cfg.batch_size, per - i), rng)).float()
            chunks.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    allx = accelerator.gather(torch.cat(chunks))
    path = Path(cfg.output_dir) / f"samples_{n}.npz"
    if accelerator.is_main_process:
        np.savez_compressed(path, x=allx[:n].permute(0, 2, 3, 1).cpu().numpy())
    accelerator.wait_for_everyone()
    return path


# ---- trajectory distillation: pd / cd / ect ------------------------------------------------------------------------
def training_images(cfg: CifarConfig) -> torch.Tensor:
    """(N, 3, 32, 32) float32 in [-1, 1]: ``--data`` npz, or 64 seeded random images under ``--tiny``."""
    if cfg.data:
        from toy_data.cifar import load_cifar10_sample
        return load_cifar10_sample(path=cfg.data)[0]
    return 2 * torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed + 17)) - 1


def trajectory_loss(cfg: CifarConfig, student, teacher, process: Process, x0, cpu_rng, step: int):
    """The method's loss from the library, its randomness from ``cpu_rng`` (so a test can redraw it)."""
    from dstar_edu.objectives.pretrain import consistency_distillation_loss
    from dstar_edu.objectives.trajectory import ect_loss, progressive_distillation_loss
    from dstar_edu.samplers.common import subsequence
    if cfg.method == "pd":
        return progressive_distillation_loss(student, teacher, x0, subsequence(process.T, 2 * cfg.student_steps,
                                                                                  "trailing"), generator=cpu_rng)
    if cfg.method == "cd":
        grid = torch.linspace(1.0, float(process.T), cfg.cd_grid, dtype=torch.float64).round().unique()
        return consistency_distillation_loss(student, None, teacher, x0, grid, cfg.cd_m, generator=cpu_rng,
                                             parameterization="cm_f")
    return ect_loss(student, x0, step, generator=cpu_rng, d=cfg.ect_d, r_min=float(process.edm_sigma(1.0)))


def run_trajectory(cfg: CifarConfig, accelerator) -> dict:
    """PD / CD / ECT of the teacher into a copy of it: Adam on ``trajectory_loss``, metrics.jsonl, final checkpoint."""
    common.seed_all(cfg.seed)
    common.write_config(accelerator, cfg)
    device = accelerator.device
    unet, scheduler = load_teacher(cfg)
    process = process_from_scheduler(scheduler)
    if not hasattr(process, "T"):
        raise ValueError(f"method={cfg.method!r} needs a DDPM-type teacher schedule, got {process}")
    teacher = teacher_predictor(unet, scheduler, process)
    student_net = copy.deepcopy(unet).requires_grad_(True).train()
    unet.requires_grad_(False).eval().to(device)
    optimizer = torch.optim.Adam(student_net.parameters(), lr=cfg.lr_gen, betas=(cfg.adam_beta1, cfg.adam_beta2))
    student_net, optimizer = accelerator.prepare(student_net, optimizer)
    student = teacher.with_net(student_net)
    images = training_images(cfg)
    logger = common.MetricLogger(accelerator, cfg.output_dir, cfg.steps, desc=cfg.method, every=cfg.log_every,
                                 progress=cfg.progress)
    records = []
    for step in range(cfg.steps):
        cpu_rng, _ = common.step_generators(cfg.seed, step, "student", 0, accelerator.process_index, device)
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=cpu_rng)
        x0 = images[idx].to(device)
        value, _, _ = guarded_update(   # the package's one NaN-guarded update, stopping every rank together
            lambda: (trajectory_loss(cfg, student, teacher, process, x0, cpu_rng, step), {}), optimizer,
            list(student_net.parameters()), step=step, phase=f"{cfg.method} student", zero_grad_first=True,
            backward=accelerator.backward, clip_grad_norm=accelerator.clip_grad_norm_,
            bad_anywhere=any_rank(accelerator))
        rec = {"loss": value}
        records.append({"step": step, **rec})
        logger.log(step, rec)
    logger.close()
    path = common.save_checkpoint(accelerator, cfg.output_dir, cfg.steps,
                                  {"student": common.Saved(student_net, accelerator.unwrap_model(student_net))},
                                  losses={"loss": records[-1]["loss"]} if records else {},
                                  meta={"method": cfg.method, "process": repr(process)})
    return {"records": records, "checkpoint": path, "student": accelerator.unwrap_model(student_net),
            "teacher": teacher, "config": cfg}


if __name__ == "__main__":
    main()
