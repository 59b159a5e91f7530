"""End to end: ``scaled_runs/distill_cifar.py --method pd|cd|ect`` with a tiny random diffusers UNet teacher (CPU).

Each run takes 2 Adam steps; the logged losses are recomputed independently with the library losses on the same
seeded batch: step 0 with the student = the teacher's weights, step 1 with the weights of a separate 1-step run
(same seeds, so its checkpoint is the 2-step run's student after its first update).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:   # scaled_runs/ is not an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("accelerate", reason="scaled_runs needs accelerate")

from safetensors.torch import load_file  # noqa: E402

from scaled_runs import common, distill_cifar  # noqa: E402



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _argv(method, steps, out):
    return ["--tiny", "--method", method, "--steps", str(steps), "--batch_size", "2", "--lr_gen", "1e-3",
            "--adam_beta1", "0.9", "--student_steps", "2", "--cd_grid", "6", "--ect_d", "1", "--no-progress",
            "--output_dir", str(out), "--cpu"]


@pytest.mark.parametrize("method", ["pd", "cd", "ect"])
def test_trajectory_methods_run_and_log_the_library_loss(method, tmp_path):
    res2 = distill_cifar.main(_argv(method, 2, tmp_path / "two"))
    distill_cifar.main(_argv(method, 1, tmp_path / "one"))
    cfg = common.parse_config(distill_cifar.CifarConfig, _argv(method, 2, tmp_path / "two"))
    recs = common.read_metrics(tmp_path / "two")
    assert [r["step"] for r in recs] == [0, 1] and all(math.isfinite(r["loss"]) for r in recs)
    unet, scheduler = distill_cifar.load_teacher(cfg)
    process = distill_cifar.process_from_scheduler(scheduler)
    teacher = distill_cifar.teacher_predictor(unet, scheduler, process)
    images = distill_cifar.training_images(cfg)
    w1 = load_file(str(common.checkpoint_dir(tmp_path / "one", 1) / "student" / common.WEIGHTS_NAME))
    for step, state in ((0, None), (1, w1)):
        import copy
        net = copy.deepcopy(unet)
        if state is not None:
            net.load_state_dict(state)
        student = teacher.with_net(net)
        cpu, _ = common.step_generators(cfg.seed, step, "student", 0, 0, "cpu")
        idx = torch.randint(0, images.shape[0], (2,), generator=cpu)
        loss = distill_cifar.trajectory_loss(cfg, student, teacher, process, images[idx], cpu, step).detach()
        # float32 round-off of a tiny UNet forward (same ops, same order): 1e-5 relative
        assert abs(float(loss) - recs[step]["loss"]) <= 1e-5 * max(1.0, abs(recs[step]["loss"])), (step, float(loss))
    # the teacher is untouched, the student moved, the final checkpoint loads as a diffusers UNet
    from diffusers import UNet2DModel
    loaded = UNet2DModel.from_pretrained(common.checkpoint_dir(tmp_path / "two", 2) / "student", local_files_only=True)
    moved = max(float((a - b).abs().max()) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))
    assert moved > 1e-6
    assert all(torch.equal(a, b) for a, b in zip(res2["teacher"].unet.state_dict().values(), unet.state_dict().values()))


def test_trajectory_method_needs_data_without_tiny():
    with pytest.raises(ValueError, match="--data"):
        common.parse_config(distill_cifar.CifarConfig, ["--teacher", "x", "--method", "pd"])
