"""CIFAR-scale trajectory distillation on CPU: PD and CD (LCM-style, CFG teacher) of the EXACT class-conditional
empirical teacher of real CIFAR-10 images into a small conv student, through the library's loss functions.

Teacher: ``toy_data.mixtures.EmpiricalDistribution`` of ``--n_per_class`` images of each of the 10 classes of the
shipped CIFAR-10 test sample (``toy_data.cifar.load_cifar10_sample``), labels as classes, VP process; its posterior
mean is exact, so the teacher's guided DDIM (Eq. 21 + Eq. 23) is the reference sampler. Students: a 4-block conv net
with time and class embeddings (~60k parameters).

* PD (``objectives.trajectory.progressive_distillation_loss``, guided teacher w): 8 -> 4 -> 2 -> 1 steps;
* CD (``objectives.pretrain.consistency_distillation_loss``, m = 1, guided teacher w, cm_f parameterisation): sampled
  with multistep CM sampling at 1, 2, 4 steps.

Metrics on 200 samples per method and step count (class c = i mod 10): ``nn_rmse`` = RMS pixel distance to the
nearest teacher image (0 = a teacher image; the teacher's own DDIM at 8 steps is the reference), ``class_acc`` =
fraction whose nearest teacher image has the requested class. Figures: ``<out>/pd_cd_grid.png`` (rows: teacher DDIM,
PD, CD at each step count) and ``<out>/losses.png``.

    PYTHONPATH=. python bench/bench_cifar_trajectory.py [--steps 300] [--out /tmp/cifar_traj]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from dstar_edu.predictors import Predictor, sinusoidal_embedding


class ConvPredictor(Predictor):
    """Small conv net for 3x32x32: 4 residual conv blocks at 16x16 with time and class embeddings."""

    def __init__(self, process, prediction: str, ch: int = 48, num_classes: int = 10):
        super().__init__(process, prediction)
        self.inp = nn.Conv2d(3, ch, 3, stride=2, padding=1)
        self.temb = nn.Sequential(nn.Linear(64, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.cemb = nn.Embedding(num_classes + 1, ch)
        self.blocks = nn.ModuleList([nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
                                     for _ in range(4)])
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.ConvTranspose2d(ch, 3, 4, stride=2, padding=1))
        self.num_classes = num_classes

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        c = torch.full((x.shape[0],), self.num_classes, dtype=torch.long) if cond is None else torch.as_tensor(cond).long()
        h = self.inp(x)
        e = (self.temb(sinusoidal_embedding(1000 * t, 64)) + self.cemb(c))[:, :, None, None]
        for blk in self.blocks:
            h = h + blk(h + e)
        return self.out(h)


def _g(s):
    return torch.Generator().manual_seed(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per PD round and for CD")
    ap.add_argument("--n_per_class", type=int, default=10)
    ap.add_argument("--w", type=float, default=1.0, help="CFG scale of the teacher (Eq. 23)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="/tmp/cifar_traj")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from dstar_edu.objectives import consistency_distillation_loss
    from dstar_edu.objectives.pretrain import ddim_denoise
    from dstar_edu.objectives.trajectory import progressive_distillation_loss
    from dstar_edu.predictors import FunctionPredictor
    from dstar_edu.process import VP
    from dstar_edu.samplers.common import uniform_grid
    from dstar_edu.samplers.consistency import consistency_multistep
    from toy_data.cifar import load_cifar10_sample
    from toy_data.mixtures import EmpiricalDistribution

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_all, y_all = load_cifar10_sample(dtype=torch.float64)
    keep = torch.cat([torch.nonzero(y_all == c).flatten()[:args.n_per_class] for c in range(10)])
    images, labels = x_all[keep], y_all[keep]
    p = VP()
    teacher = EmpiricalDistribution(images, process=p, labels=labels)
    flat = images.reshape(images.shape[0], -1).float()

    def metrics(x, cond):
        d = torch.cdist(x.reshape(x.shape[0], -1).float(), flat)
        nn_d, idx = d.min(1)
        return {"nn_rmse": float((nn_d / 3072 ** 0.5).mean()), "class_acc": float((labels[idx] == cond).float().mean())}

    n_eval = 200
    cond_eval = torch.arange(n_eval) % 10
    z_eval = torch.randn(n_eval, 3, 32, 32, generator=_g(1))

    def teacher_ddim(n):
        x = z_eval.double()
        ts = uniform_grid(p, n)
        for i in range(n):
            x = ddim_denoise(teacher, x, ts[i].expand(n_eval), ts[i + 1].expand(n_eval), cond_eval, args.w)
        return x.float()

    def data_batch(g):
        idx = torch.randint(0, images.shape[0], (args.batch,), generator=g)
        return images[idx].float(), labels[idx]

    results, samples, losses = {"teacher DDIM": {}}, {"teacher DDIM": {}}, {}
    for n in (1, 2, 4, 8):
        samples["teacher DDIM"][n] = teacher_ddim(n)
        results["teacher DDIM"][n] = metrics(samples["teacher DDIM"][n], cond_eval)

    # ---- PD: 8 -> 4 -> 2 -> 1 with the guided exact teacher, then the previous student (unguided: it is guided) ----
    t0 = time.process_time()
    torch.manual_seed(0)
    student = ConvPredictor(p, "v")
    tea, N, w, results["PD"], samples["PD"], losses["PD"] = teacher, 8, args.w, {}, {}, []
    g = _g(2)
    while N > 1:
        grid = uniform_grid(p, N)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        for _ in tqdm(range(args.steps), desc=f"PD {N}->{N // 2}", leave=False):
            x0, c = data_batch(g)
            loss = progressive_distillation_loss(student, tea, x0, grid, generator=g, cond=c,
                                                 cfg_scale=w if tea is teacher else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses["PD"].append(float(loss.detach()))
        N //= 2
        with torch.no_grad():
            from dstar_edu.samplers.diffusion import ddim
            samples["PD"][N] = ddim(student, uniform_grid(p, N), z_eval, cond=cond_eval)
        results["PD"][N] = metrics(samples["PD"][N], cond_eval)
        tea = copy.deepcopy(student).eval().requires_grad_(False)
    results["PD"]["cpu_s"] = time.process_time() - t0

    # ---- CD (LCM-style): guided exact teacher, m = 1 on a 16-point grid, cm_f parameterisation ----------------------
    t0 = time.process_time()
    torch.manual_seed(1)
    cm = ConvPredictor(p, "x0")
    opt = torch.optim.Adam(cm.parameters(), lr=1e-3)
    grid = torch.linspace(0.002, 1.0, 16, dtype=torch.float64)
    losses["CD"] = []
    for _ in tqdm(range(2 * args.steps), desc="CD", leave=False):
        x0, c = data_batch(g)
        loss = consistency_distillation_loss(cm, None, teacher, x0, grid, 1, args.w, generator=g, cond=c,
                                             parameterization="cm_f")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses["CD"].append(float(loss.detach()))
    f = FunctionPredictor(lambda x, t, c: cm.predict("cm_f", x, t, c), p, "cm_f")
    results["CD"], samples["CD"] = {}, {}
    for n in (1, 2, 4):
        with torch.no_grad():
            times = torch.linspace(1.0, 0.0, n + 1).tolist()
            samples["CD"][n] = consistency_multistep(f, times[:-1] + [0.0], z_eval, generator=_g(3), cond=cond_eval)
        results["CD"][n] = metrics(samples["CD"][n], cond_eval)
    results["CD"]["cpu_s"] = time.process_time() - t0

    # ---- figures --------------------------------------------------------------------------------------------------
    rows = [(m, n) for m in ("teacher DDIM", "PD", "CD") for n in (1, 2, 4, 8) if n in samples[m]]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.1 * len(rows)), layout="constrained")
    for ax, (m, n) in zip(axes, rows):
        x = samples[m][n][:10].clamp(-1, 1)
        ax.imshow(((torch.cat(list(x), dim=2).permute(1, 2, 0) + 1) / 2).numpy())
        r = results[m][n]
        ax.set_title(f"{m}, {n} step(s): nn_rmse {r['nn_rmse']:.3f}, class acc {r['class_acc']:.2f}", fontsize=8)
        ax.axis("off")
    fig.savefig(out / "pd_cd_grid.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3), layout="constrained")
    for k, v in losses.items():
        ax.semilogy(v, label=k, lw=0.8)
    ax.legend()
    ax.set_xlabel("Adam step")
    fig.savefig(out / "losses.png", dpi=110)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| method | steps | nn_rmse | class_acc |\n|---|---|---|---|")
    for m, r in results.items():
        for n, v in r.items():
            if n != "cpu_s":
                print(f"| {m} | {n} | {v['nn_rmse']:.3f} | {v['class_acc']:.2f} |")
        if "cpu_s" in r:
            print(f"| {m} CPU s | {r['cpu_s']:.0f} | | |")
    print(f"figures: {out / 'pd_cd_grid.png'}, {out / 'losses.png'}")


if __name__ == "__main__":
    main()
