"""Benchmark: trajectory distillation of the exact 8-Gaussian teacher into few-step samplers (issue 11).

For each method of ``dstar_edu.objectives.trajectory`` (and the CD/CT losses of ``objectives.pretrain``) a small
``MLPPredictor(hidden=128, depth=3)`` student is trained on CPU (one thread) against the EXACT teacher (VP process,
``toy_data.mixtures.eight_gaussians_mixture``; the rectified-flow rows use the same mixture under rectified flow).
Every ``--every`` steps the student's sampler is run at 1, 2, 4 and 8 steps (where the method defines that number of
steps) on 2000 fresh noises and scored by the sliced Wasserstein distance to 2000 teacher samples; the noise floor is
the distance between two independent 2000-samples of the teacher. Reported: the final SW / floor per step count and
the CPU seconds (``time.process_time``, evaluation excluded, pair generation and pre-training included) until the best
of the step counts first reaches 1.5x the floor ("-" = not within the budget). The teacher rows are DDIM and
DPM-Solver-2 (2 evaluations per step, log-SNR grid to t = 1e-3) on the exact teacher, no training.

    PYTHONPATH=. python bench/bench_trajectory.py [--steps 1500] [--every 250] [--methods pd,cd,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

N_EVAL = 2000
STEP_COUNTS = (1, 2, 4, 8)


def _g(seed):
    return torch.Generator().manual_seed(seed)


class Bench:
    def __init__(self, seed: int = 0):
        from dstar_edu.metrics import sw_noise_floor
        from dstar_edu.process import VP, RectifiedFlow
        from toy_data.mixtures import eight_gaussians_mixture
        self.p, self.rf = VP(), RectifiedFlow()
        self.teacher = eight_gaussians_mixture(self.p)
        self.teacher_rf = eight_gaussians_mixture(self.rf)
        self.ref = self.teacher.sample(N_EVAL, generator=_g(123)).float()
        self.z = torch.randn(N_EVAL, 2, generator=_g(321))
        self.floor, _ = sw_noise_floor(lambda n, g: self.teacher.sample(n, generator=g).float(), N_EVAL)
        self.seed = seed

    def sw(self, x) -> float:
        from dstar_edu.metrics import sliced_wasserstein
        if not torch.isfinite(x).all():
            return float("inf")
        return sliced_wasserstein(x, self.ref, generator=_g(7)) / self.floor

    def net(self, prediction: str, process=None, seed: int = 0):
        from dstar_edu.predictors import MLPPredictor
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 * self.seed + seed)
            return MLPPredictor(process or self.p, prediction, dim=2, hidden=128, depth=3)

    def data(self, n, g):
        return self.teacher.sample(n, generator=g).float()


# ---- samplers used for evaluation -------------------------------------------------------------------------------
def ddim_sampler(model, process, n):
    from dstar_edu.samplers.common import uniform_grid
    from dstar_edu.samplers.diffusion import ddim
    return lambda z: ddim(model, uniform_grid(process, n), z)


def euler_rf_sampler(model, n):
    from dstar_edu.samplers.flow import rectified_flow_euler
    return lambda z: rectified_flow_euler(model, torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), z)


def x0_multistep_sampler(model, process, times):
    """Predict x0, re-noise to the next time (CM Alg. 4 / LCM / ADD / DMD2 multi-step inference)."""
    from dstar_edu.predictors import FunctionPredictor
    from dstar_edu.samplers.consistency import consistency_multistep
    f = FunctionPredictor(lambda x, t, c: model.predict("x0", x, t, c), process, "x0")
    return lambda z: consistency_multistep(f, list(times) + [0.0], z, generator=_g(5))


def cm_sampler(model, process, n, parameterization="cm_f"):
    from dstar_edu.predictors import FunctionPredictor
    from dstar_edu.samplers.consistency import consistency_multistep
    f = FunctionPredictor(lambda x, t, c: model.predict(parameterization, x, t, c), process, "cm_f")
    times = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()
    return lambda z: consistency_multistep(f, times[:-1] + [0.0], z, generator=_g(5))


# ---- generic training loop with timed evaluation ------------------------------------------------------------------
def run_training(b: Bench, step_fn, samplers: dict, steps: int, every: int, cpu_offset: float = 0.0) -> dict:
    """``step_fn(k)`` does one optimisation step (all optimisers); ``samplers()`` -> {n_steps: sampler}. Returns the
    final SW/floor per n, and the CPU seconds until min_n SW/floor <= 1.5."""
    hit, cpu = None, cpu_offset
    t0 = time.process_time()
    last = {}
    for k in range(steps):
        step_fn(k)
        if (k + 1) % every == 0 or k + 1 == steps:
            cpu += time.process_time() - t0
            with torch.no_grad():
                last = {n: b.sw(s(b.z)) for n, s in samplers().items()}
            if hit is None and min(last.values()) <= 1.5:
                hit = cpu
            t0 = time.process_time()
    return {"sw": last, "cpu_to_1.5x": hit, "cpu_total": cpu}


def adam(params, lr):
    return torch.optim.Adam(params, lr=lr)


def simple_step(model, loss_fn, lr=2e-3):
    opt = adam(model.parameters(), lr)
    g = _g(99)

    def step(k):
        opt.zero_grad(set_to_none=True)
        loss_fn(g).backward()
        opt.step()
    return step


# ---- methods ------------------------------------------------------------------------------------------------------
def teacher_rows(b: Bench) -> dict:
    from dstar_edu.samplers.common import uniform_grid
    from dstar_edu.samplers.diffusion import ddim, dpm_solver, logsnr_grid
    out = {}
    z = b.z.double()
    out["teacher DDIM"] = {"sw": {n: b.sw(ddim(b.teacher, uniform_grid(b.p, n), z).float()) for n in STEP_COUNTS},
                           "cpu_to_1.5x": 0.0}
    out["teacher DPM-Solver-2 (2 NFE/step)"] = {
        "sw": {n: b.sw(dpm_solver(b.teacher, logsnr_grid(b.p, n, t_end=1e-3), z, order=2).float())
               for n in STEP_COUNTS}, "cpu_to_1.5x": 0.0}
    return out


def method_pd(b, steps, every):
    """PD rounds 16 -> 8 -> 4 -> 2 -> 1 (exact teacher for round 1; each student initialises the next)."""
    from dstar_edu.objectives.trajectory import progressive_distillation_loss
    from dstar_edu.samplers.common import uniform_grid
    per_round = max(steps // 4, 1)
    teacher, student = b.teacher, b.net("v")       # v-prediction (Salimans & Ho): eps cannot give x0 at t = 1
    result, cpu, hit, N = {"sw": {}}, 0.0, None, 16
    while N > 1:
        grid = uniform_grid(b.p, N)
        st = student

        def loss(g, teacher=teacher, st=st, grid=grid):
            return progressive_distillation_loss(st, teacher, b.data(256, g), grid, generator=g, space="x0")
        r = run_training(b, simple_step(st, loss, 1e-3), lambda st=st, N=N: {N // 2: ddim_sampler(st, b.p, N // 2)},
                         per_round, every, cpu)
        cpu = r["cpu_total"]
        hit = hit if hit is not None else r["cpu_to_1.5x"]
        result["sw"].update(r["sw"])
        teacher = copy.deepcopy(st).eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
        student = st
        N //= 2
    result.update({"cpu_to_1.5x": hit, "cpu_total": cpu})
    return result


def _cm_grid(b, n=20):
    return torch.linspace(0.002, 1.0, n, dtype=torch.float64)


def method_cd(b, steps, every):
    from dstar_edu.objectives import consistency_distillation_loss
    model = b.net("x0")
    grid = _cm_grid(b)

    def loss(g):
        return consistency_distillation_loss(model, None, b.teacher, b.data(256, g), grid, m=1, generator=g,
                                             parameterization="cm_f")
    return run_training(b, simple_step(model, loss, 1e-3),
                        lambda: {n: cm_sampler(model, b.p, n) for n in STEP_COUNTS}, steps, every)


def method_ct(b, steps, every):
    from dstar_edu.objectives import consistency_training_loss
    model = b.net("x0")
    grid = _cm_grid(b)

    def loss(g):
        return consistency_training_loss(model, None, b.data(256, g), grid, generator=g, parameterization="cm_f")
    return run_training(b, simple_step(model, loss, 1e-3),
                        lambda: {n: cm_sampler(model, b.p, n) for n in STEP_COUNTS}, steps, every)


def method_ect(b, steps, every):
    """Pre-train an x0 diffusion model (counted), then tune it with ECT (dt halves every steps/6 iterations)."""
    from dstar_edu.objectives import denoising_loss
    from dstar_edu.objectives.trajectory import ect_loss
    model = b.net("x0")
    pre = steps // 2
    t0 = time.process_time()
    step = simple_step(model, lambda g: denoising_loss(model, b.data(256, g), generator=g), 2e-3)
    for k in range(pre):
        step(k)
    cpu0 = time.process_time() - t0
    d = max((steps - pre) // 6, 1)

    def loss(g, it=[0]):
        it[0] += 1
        return ect_loss(model, b.data(256, g), it[0], generator=g, d=d)
    return run_training(b, simple_step(model, loss, 5e-4),
                        lambda: {n: cm_sampler(model, b.p, n) for n in STEP_COUNTS}, steps - pre, every, cpu0)


def method_pcd(b, steps, every):
    from dstar_edu.objectives.trajectory import (PhasedPredictor, phase_edges,
                                                 phased_consistency_distillation_loss, phased_sampling)
    grid = _cm_grid(b, 21)
    out = {"sw": {}, "cpu_to_1.5x": None, "cpu_total": 0.0}
    for M in (1, 2, 4):
        model = PhasedPredictor(b.net("x0", seed=M))
        edges = phase_edges(grid, M)

        def loss(g, model=model, M=M):
            return phased_consistency_distillation_loss(model, None, b.teacher, b.data(256, g), grid, M, generator=g)
        r = run_training(b, simple_step(model, loss, 1e-3),
                         lambda model=model, edges=edges, M=M: {M: lambda z: phased_sampling(model, edges, z)},
                         steps // 3, every, out["cpu_total"])
        out["sw"].update(r["sw"])
        out["cpu_total"] = r["cpu_total"]
        if out["cpu_to_1.5x"] is None:
            out["cpu_to_1.5x"] = r["cpu_to_1.5x"]
    return out


def _pairs(b, teacher, process, n=4000, n_steps=64):
    from dstar_edu.objectives.trajectory import ode_pairs
    z = torch.randn(n, 2, generator=_g(77), dtype=torch.float64)
    t_end = 0.0
    ts = torch.linspace(process.t_max * (0.999 if process is b.rf else 1.0), t_end, n_steps + 1, dtype=torch.float64)
    t0 = time.process_time()
    x = ode_pairs(teacher, z, ts)
    return z.float(), x.float(), time.process_time() - t0


def method_reflow(b, steps, every):
    from dstar_edu.objectives.trajectory import reflow_loss
    z, x, cpu0 = _pairs(b, b.teacher_rf, b.rf)
    model = b.net("velocity", b.rf)

    def loss(g):
        idx = torch.randint(0, z.shape[0], (256,), generator=g)
        return reflow_loss(model, x[idx], z[idx], generator=g)
    return run_training(b, simple_step(model, loss, 2e-3),
                        lambda: {n: euler_rf_sampler(model, n) for n in STEP_COUNTS}, steps, every, cpu0)


def method_rectified_diffusion(b, steps, every):
    from dstar_edu.objectives.trajectory import rectified_diffusion_loss
    z, x, cpu0 = _pairs(b, b.teacher, b.p)
    model = b.net("eps")

    def loss(g):
        idx = torch.randint(0, z.shape[0], (256,), generator=g)
        return rectified_diffusion_loss(model, x[idx], z[idx], generator=g)
    return run_training(b, simple_step(model, loss, 2e-3),
                        lambda: {n: ddim_sampler(model, b.p, n) for n in STEP_COUNTS}, steps, every, cpu0)


def method_vm_eq35(b, steps, every):
    """Velocity mapping Approach 1 (Eq. 35): a separate RF velocity trained on the VP teacher's DDIM pairs."""
    from dstar_edu.objectives.trajectory import reflow_loss
    z, x, cpu0 = _pairs(b, b.teacher, b.p)
    model = b.net("velocity", b.rf)

    def loss(g):
        idx = torch.randint(0, z.shape[0], (256,), generator=g)
        return reflow_loss(model, x[idx], z[idx], generator=g)
    return run_training(b, simple_step(model, loss, 2e-3),
                        lambda: {n: euler_rf_sampler(model, n) for n in STEP_COUNTS}, steps, every, cpu0)


def method_vm_finetune(b, steps, every):
    """Velocity-mapped RF fine-tuning of a VP diffusion model (Sec. 2.4.4-2.4.5) on the teacher's coupled pairs."""
    from dstar_edu.objectives.trajectory import velocity_mapped_loss
    z, x, cpu0 = _pairs(b, b.teacher, b.p)
    model = b.net("eps")

    def loss(g):
        idx = torch.randint(0, z.shape[0], (256,), generator=g)
        t = 0.02 + 0.96 * torch.rand(256, generator=g, dtype=torch.float64)
        return velocity_mapped_loss(model, x[idx], t=t.float(), eps=z[idx])
    return run_training(b, simple_step(model, loss, 2e-3),
                        lambda: {n: ddim_sampler(model, b.p, n) for n in STEP_COUNTS}, steps, every, cpu0)


STUDENT_TIMES = {1: [1.0], 2: [1.0, 0.5], 4: [1.0, 0.75, 0.5, 0.25]}


def method_add(b, steps, every):
    from dstar_edu.objectives.trajectory import add_discriminator_loss, add_generator_loss
    student = b.net("x0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        disc = torch.nn.Sequential(torch.nn.Linear(2, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(),
                                   torch.nn.Linear(128, 1))
    opt_g, opt_d = adam(student.parameters(), 1e-3), adam(disc.parameters(), 1e-3)
    times = torch.tensor(STUDENT_TIMES[4])
    g = _g(11)

    def step(k):
        real = b.data(256, g)
        s = times[torch.randint(0, 4, (256,), generator=g)].double()
        x_s, _ = b.p.q_sample(b.data(256, g), s.float(), generator=g)
        x_hat = student.predict("x0", x_s, s.float())
        t = (0.02 + 0.96 * torch.rand(256, generator=g, dtype=torch.float64)).float()
        opt_g.zero_grad(set_to_none=True)
        add_generator_loss(x_hat, b.teacher, disc, t, distill_weight=2.5, generator=g).backward()
        opt_g.step()
        opt_d.zero_grad(set_to_none=True)
        add_discriminator_loss(x_hat.detach(), real, disc).backward()
        opt_d.step()
    return run_training(b, step, lambda: {n: x0_multistep_sampler(student, b.p, STUDENT_TIMES[n]) for n in (1, 2, 4)},
                        steps, every)


def method_dmd2(b, steps, every):
    """DMD2: 4-step student with backward simulation, fake score with a shared-backbone GAN head, 5 fake updates per
    generator update (two time scales), no regression loss."""
    from dstar_edu.objectives.distill import (FeatureDiscriminator, dmd_gan_discriminator_loss, dmd_loss,
                                              fake_score_loss)
    from dstar_edu.objectives.trajectory import dmd2_backward_simulation
    student, fake = b.net("x0"), b.net("x0", seed=2)
    fake.load_state_dict(student.state_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 * b.seed + 3)
        disc = FeatureDiscriminator(fake, "blocks.1", features=128, hidden=64)
    opt_g = torch.optim.Adam(student.parameters(), lr=5e-4, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(list(fake.parameters()) + list(disc.head.parameters()), lr=1e-3, betas=(0.0, 0.999))
    times = STUDENT_TIMES[4] + [0.0]
    g = _g(12)

    def gen_x0():
        z = torch.randn(256, 2, generator=g)
        x, t = dmd2_backward_simulation(student, times, z, generator=g)
        return student.predict("x0", x, t.expand(256))

    def step(k):
        for _ in range(5):
            with torch.no_grad():
                x0 = gen_x0()
            opt_f.zero_grad(set_to_none=True)
            tt = (0.02 + 0.96 * torch.rand(256, generator=g, dtype=torch.float64)).float()
            (fake_score_loss(fake, x0, generator=g, t=tt)
             + 0.01 * dmd_gan_discriminator_loss(x0, b.data(256, g), disc, tt, b.p, generator=g)).backward()
            opt_f.step()
        opt_g.zero_grad(set_to_none=True)
        t = (0.02 + 0.96 * torch.rand(256, generator=g, dtype=torch.float64)).float()
        dmd_loss(gen_x0(), b.teacher, fake, t, generator=g, discriminator=disc, gan_weight=0.01).backward()
        opt_g.step()
    return run_training(b, step, lambda: {n: x0_multistep_sampler(student, b.p, STUDENT_TIMES[n]) for n in (1, 2, 4)},
                        max(steps // 5, 1), max(every // 5, 1))


METHODS = {"pd": ("PD (16->8->4->2->1)", method_pd), "cd": ("CD / LCM (m=1)", method_cd),
           "ct": ("CT (Eq. 25)", method_ct), "ect": ("ECT (pre-train + tune)", method_ect),
           "pcd": ("PCD (M = 1, 2, 4 phases)", method_pcd), "reflow": ("2-rectified flow (Eq. 29)", method_reflow),
           "rectdiff": ("rectified diffusion", method_rectified_diffusion),
           "vm35": ("velocity mapping Eq. 35 (RF on DDIM pairs)", method_vm_eq35),
           "vmft": ("velocity-mapped fine-tune (Sec. 2.4.5)", method_vm_finetune),
           "add": ("ADD (Sec. 3.2.5)", method_add), "dmd2": ("DMD2 (backward sim + GAN)", method_dmd2)}


def table(rows: dict, floor: float) -> str:
    lines = [f"noise floor (SW of two 2000-samples of the teacher) = {floor:.4f}; entries: SW / floor",
             "| method | 1 step | 2 steps | 4 steps | 8 steps | CPU s to 1.5x floor |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cells = [f"{r['sw'][n]:.2f}" if n in r["sw"] else "n/a" for n in STEP_COUNTS]
        hit = r.get("cpu_to_1.5x")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if hit is None else f'{hit:.1f}'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = Bench(args.seed)
    rows = teacher_rows(b)
    from tqdm.auto import tqdm
    for key in tqdm(args.methods.split(","), desc="methods"):
        if key not in METHODS:
            raise SystemExit(f"--methods: {key!r} is unknown; allowed: {', '.join(METHODS)}")
        name, fn = METHODS[key]
        rows[name] = fn(b, args.steps, args.every)
        tqdm.write(f"{name}: {rows[name]['sw']} cpu_to_1.5x={rows[name].get('cpu_to_1.5x')}")
    print(table(rows, b.floor))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"floor": b.floor, "rows": rows, "args": vars(args)}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
