"""One-step distillation at CIFAR dimension from an exact teacher: the bridge between 2D and scaled_runs.

    python bench/bench_distill_cifar_exact.py [--steps 400] [--batch 32] [--methods sim di] [--json out.json]

Teacher: the exact class-conditional empirical distribution of the 1000 packaged real CIFAR-10 test images
(``toy_data.EmpiricalDistribution`` with labels, VE/EDM process): its diffused score is closed-form, so
the only approximations are the generator's and the online score's. Generator: a small class-conditional
convolutional network (a ``tiny_unet`` evaluated at one fixed noise level, input ``z ~ N(0, I)``); online
("fake") score: another class-conditional ``tiny_unet`` with EDM preconditioning, warmed up on the initial
generator. Both are trained by the library's own loop (``dstar_edu.distillation.distill``) and losses:
SIM (Alg. 2, pseudo-Huber, ``space="x0"``) and Diff-Instruct (``space="x0"``), time distributions p_SIM /
p_EDM as in ``bench/experiment_distill_2d.py``.

Reported per method, on 10 samples per class: CPU seconds; the RMS pixel distance (images in [-1, 1]) of
each sample to its nearest of the 1000 images, against the same for the teacher's own samples (40-step
DDIM, Karras grid, exact score: these reproduce training images, distance ~ 0) and the typical distance
between two different training images; class accuracy (the nearest image has the requested class) and
coverage (distinct nearest images / samples, per class and in total).
The class label reaches the generator through ``cond_sampler``: the generator draws its labels when it
samples and the loop's ``cond_sampler`` returns those same labels for the teacher and the online score.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dstar_edu.diffusers_interop import DiffusersUNetPredictor, tiny_unet  # noqa: E402
from dstar_edu.distillation import distill  # noqa: E402
from dstar_edu.generators import Generator  # noqa: E402
from dstar_edu.objectives.distill import diff_instruct_loss, p_edm, p_sim, sim_generator_loss  # noqa: E402
from dstar_edu.process import VE  # noqa: E402
from dstar_edu.samplers.common import karras_sigmas  # noqa: E402
from dstar_edu.samplers.diffusion import ddim  # noqa: E402
from toy_data.cifar import CIFAR10_CLASSES, load_cifar10_sample  # noqa: E402
from toy_data.mixtures import EmpiricalDistribution  # noqa: E402

PER_CLASS = 10


class ConditionalConvGenerator(Generator):
    """``x0 = net(z, sigma_g, class)`` for ``z ~ N(0, I)`` and a class drawn uniformly at sampling time."""

    def __init__(self, classes: int = 10, seed: int = 1):
        super().__init__()
        self.net = tiny_unet(num_class_embeds=classes, seed=seed).train()
        self.classes = classes
        self.event_shape = self.latent_shape = (3, 32, 32)
        self.last_labels = None

    def forward(self, z, labels=None):
        z = self._check_z(z)
        if labels is None:
            labels = torch.zeros(z.shape[0], dtype=torch.long)
        return self.net(z, torch.full((z.shape[0],), 500.0), class_labels=labels).sample

    def sample(self, n, generator=None, return_noise=False, labels=None):
        z = self.noise(n, generator)
        if labels is None:
            labels = torch.randint(0, self.classes, (n,), generator=generator)
        self.last_labels = labels
        x0 = self(z, labels)
        return (x0, z) if return_noise else x0


def nearest(samples: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS pixel distance of each sample to its nearest image, and that image's index."""
    d2 = torch.cdist(samples.flatten(1).double(), images.flatten(1).double()) ** 2 / images[0].numel()
    best, idx = d2.min(1)
    return best.sqrt(), idx


def report(name: str, samples, labels, images, image_labels, seconds) -> dict:
    dist, idx = nearest(samples, images)
    hit = image_labels[idx] == labels
    per_class = {CIFAR10_CLASSES[c]: len(set(idx[labels == c].tolist())) / int((labels == c).sum())
                 for c in range(10)}
    out = {"method": name, "cpu_seconds": seconds, "nn_rms_median": float(dist.median()),
           "nn_rms_mean": float(dist.mean()), "class_accuracy": float(hit.double().mean()),
           "coverage": len(set(idx.tolist())) / len(idx), "coverage_per_class": per_class}
    print(f"{name:14} {seconds:9.1f} {out['nn_rms_median']:10.4f} {out['class_accuracy']:9.2f} "
          f"{out['coverage']:9.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--methods", nargs="+", default=["sim", "di"], choices=["sim", "di"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    images, image_labels = load_cifar10_sample(dtype=torch.float32)
    process = VE(80.0)
    teacher = EmpiricalDistribution(images, process=process, labels=image_labels)
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    g = torch.Generator().manual_seed(0)
    typical = torch.cdist(images[:200].flatten(1).double(), images[200:400].flatten(1).double())
    typical = float((typical ** 2 / images[0].numel()).sqrt().median())

    print(f"{'method':14} {'CPU s':>9} {'NN RMS':>10} {'class acc':>9} {'coverage':>9}   "
          f"(median RMS distance between two training images: {typical:.3f})")
    results = []
    t0 = time.process_time()
    x_T = 80.0 * torch.randn(len(labels), 3, 32, 32, generator=g)
    ts = karras_sigmas(40, sigma_min=0.002, sigma_max=80.0)
    ts = torch.cat([ts, torch.zeros(1, dtype=ts.dtype)]) if float(ts[-1]) > 0 else ts
    with torch.no_grad():
        teacher_samples = ddim(teacher, ts, x_T, cond=labels)
    results.append(report("teacher DDIM40", teacher_samples, labels, images, image_labels, time.process_time() - t0))

    losses = {"sim": functools.partial(sim_generator_loss, distance="pseudo_huber", space="x0"),
              "di": functools.partial(diff_instruct_loss, space="x0")}
    for method in args.methods:
        torch.manual_seed(0)
        gen = ConditionalConvGenerator()
        fake = DiffusersUNetPredictor(tiny_unet(num_class_embeds=10, seed=2).train(), process, preconditioning="edm")
        t0 = time.process_time()
        distill(gen, teacher, fake, losses[method], steps=args.steps, fake_steps=1, lr_gen=args.lr, lr_fake=args.lr,
                batch_size=args.batch, t_sampler_gen=p_sim(process, sigma_min=0.002, sigma_max=80.0),
                t_sampler_fake=p_edm(process, sigma_min=0.002, sigma_max=80.0), fake_warmup=args.warmup,
                generator=torch.Generator().manual_seed(3), cond_sampler=lambda n, _g: gen.last_labels,
                fake_weighting="edm", progress=True)
        seconds = time.process_time() - t0
        with torch.no_grad():
            samples = gen.sample(len(labels), torch.Generator().manual_seed(4), labels=labels)
        results.append(report(method, samples, labels, images, image_labels, seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "typical_rms": typical, "args": vars(args)},
                                              indent=1))


if __name__ == "__main__":
    main()
