"""Worker of tests/test_scaled_fsdp.py, started with `torchrun --nproc_per_node 2` (gloo, CPU).

    fsdp OUT   FSDP2-shard generator and online score (torch's fully_shard), run dstar_edu.distillation.distill for
               3 steps with an EMA (updated by the callback), then one extra Adam step on the generator (to have optimiser state); save the
               full tensors (rank 0) to OUT/fsdp.pt and the sharded state with torch.distributed.checkpoint to OUT/dcp
    load OUT   fresh, differently initialised sharded networks and optimiser; load OUT/dcp; save full tensors to
               OUT/load.pt
    single OUT the same run as `fsdp` in one process without sharding: OUT/single.pt
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dstar_edu.distillation import distill  # noqa: E402
from dstar_edu.generators import MLPGenerator  # noqa: E402
from dstar_edu.objectives.distill import p_edm, p_sim, sim_generator_loss  # noqa: E402
from dstar_edu.predictors import MLPPredictor  # noqa: E402
from dstar_edu.process import VP  # noqa: E402


def full(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = full(v)
        elif hasattr(v, "full_tensor"):
            out[k] = v.full_tensor().detach().clone()
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        else:
            out[k] = v
    return out


def nets(seed: int):
    process = VP()
    torch.manual_seed(seed)
    return (process, MLPGenerator(2, hidden=16, depth=1), MLPPredictor(process, "v", dim=2, hidden=16, depth=1),
            MLPPredictor(process, "v", dim=2, hidden=16, depth=1))


def main(mode: str, out: str) -> None:
    from scaled_runs.checkpoints import load_sharded, save_sharded
    out = Path(out)
    sharded = mode in ("fsdp", "load")
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    from dstar_edu.training import EMA
    process, gen, fake, teacher = nets(0 if mode != "load" else 7)
    ema = EMA(gen, 0.9)          # built before sharding (FSDP modules cannot be deep-copied), then sharded itself
    if sharded:
        for m in (gen, fake, ema.model):
            fully_shard(m, mesh=mesh)
    if mode == "load":
        opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
        load_sharded(out / "dcp", {"generator": gen, "fake": fake, "generator_ema": ema.model}, {"generator": opt})
    else:
        # identical batches on every rank (one seeded generator): FSDP averages identical gradients
        hist = distill(gen, teacher, fake, functools.partial(sim_generator_loss, distance="l2", space="x0"), steps=3,
                       lr_gen=1e-3, lr_fake=1e-3, batch_size=8, progress=False, callback_every=1,
                       callback=lambda step, model: ema.update(),
                       t_sampler_gen=p_sim(process), t_sampler_fake=p_edm(process),
                       generator=torch.Generator().manual_seed(1))
        assert len(hist["gen_loss"]) == 3 and ema.num_updates == 3
        opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
        gen.sample(4, torch.Generator().manual_seed(2)).square().mean().backward()
        opt.step()
    state = {"generator": full(gen.state_dict()), "fake": full(fake.state_dict()),
             "generator_ema": full(ema.model.state_dict())}
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state["optim"] = full(get_optimizer_state_dict(gen, opt)["state"])
    else:
        state["optim"] = {n: full(opt.state[p]) for n, p in gen.named_parameters()}
    if mode == "fsdp":
        save_sharded(out / "dcp", {"generator": gen, "fake": fake, "generator_ema": ema.model}, {"generator": opt})
    if not sharded or dist.get_rank() == 0:
        torch.save(state, out / f"{mode}.pt")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
