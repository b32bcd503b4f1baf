"""Run by torchrun (2 ranks, gloo) from test_mt_adamw_zero.py: MT-AdamW as DeepSpeed's client optimizer at ZeRO
0-3 against the same optimizer in one plain process on the whole batch, 10 steps of a 3-task run. Prints one JSON
line per stage on rank 0: the largest relative parameter difference, and whether every step left the decoders of
the tasks not drawn (parameters and optimizer moments) bit-identical."""

import json
import os
import sys

import torch
import torch.distributed as dist

from polymae.pipeline.train.mt_adamw import MTAdamW
from polymae.pipeline.train.sampler import UnmixedSampler

TASKS = ["depth", "semseg", "cls"]
PROBS = [0.5, 0.3, 0.2]
WEIGHTS = {"depth": 1.0, "semseg": 0.5, "cls": 2.0}
STEPS, MICRO, GA = 10, 3, 2


class Net(torch.nn.Module):
    """A shared encoder and one linear decoder per task."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
        self.decoders = torch.nn.ModuleDict({t: torch.nn.Linear(16, 4) for t in TASKS})

    def forward(self, x, y, task, touch_all=False):
        """MSE of task ``task``'s decoder on ``x`` [B, 8] against ``y`` [B, 4]; ``touch_all`` adds the other
        decoders' outputs on one sample with weight 0, so their parameters take part in the backward with zero
        gradients (ZeRO-3 keeps a parameter's last gradient partition when it gets none)."""
        features = self.encoder(x)
        loss = torch.nn.functional.mse_loss(self.decoders[task](features), y)
        if touch_all:  # through the decoders' forward, so ZeRO-3 gathers their parameters
            loss = loss + 0.0 * sum(self.decoders[t](features[:1].detach()).sum() for t in TASKS if t != task)
        return loss


def groups(net):
    """Shared encoder (decayed) + one group per task decoder (not decayed)."""
    return [{"params": list(net.encoder.parameters()), "weight_decay": 0.05}] + [
        {"params": list(net.decoders[t].parameters()), "task": t, "weight_decay": 0.0} for t in TASKS]


def batch(step, micro, rank):
    """Micro-batch ``micro`` of ``rank`` at ``step``: inputs [MICRO, 8], targets [MICRO, 4]."""
    g = torch.Generator().manual_seed(step * 1000 + micro * 10 + rank)
    return torch.randn(MICRO, 8, generator=g), torch.randn(MICRO, 4, generator=g)


def reference(world, sampler):
    """One process, every rank's micro-batches of a step averaged (as DeepSpeed's data-parallel mean)."""
    torch.manual_seed(0)
    net = Net()
    opt = MTAdamW(groups(net), lr=0.01)
    for step in range(STEPS):
        task = sampler.draw(step)
        opt.zero_grad(set_to_none=True)
        for micro in range(GA):
            for rank in range(world):
                x, y = batch(step, micro, rank)
                (net(x, y, task) / (GA * world)).backward()
        opt.set_task(task, PROBS[TASKS.index(task)], WEIGHTS[task])
        opt.step()
    return net


def snapshot(engine, opt, task):
    """Task ``task``'s decoder parameters (this rank's view) and optimizer moments, copied."""
    import deepspeed

    module_params = list(engine.module.decoders[task].parameters())
    with deepspeed.zero.GatheredParameters(module_params):  # whole values under ZeRO-3; a no-op below it
        params = [p.detach().clone() for p in module_params]
    group = next(g for g in opt.param_groups if g.get("task") == task)
    moments = [v.clone() for p in group["params"] for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
    return params, moments


def run_stage(stage, world, sampler):
    import deepspeed

    torch.manual_seed(0)
    net = Net()
    opt = MTAdamW(groups(net), lr=0.01)
    zero = {"stage": stage}
    if stage:
        zero.update(reduce_scatter=False, overlap_comm=False, reduce_bucket_size=1000, allgather_bucket_size=1000)
    config = {"train_batch_size": MICRO * GA * world, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": GA, "gradient_clipping": 0.0, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    if stage:
        opt.grad_norm = lambda: engine.optimizer._global_grad_norm  # computed across ZeRO partitions
    rank, untouched = dist.get_rank(), True
    for step in range(STEPS):
        task = sampler.draw(step)
        others = {t: snapshot(engine, opt, t) for t in TASKS if t != task}
        opt.set_task(task, PROBS[TASKS.index(task)], WEIGHTS[task])
        for micro in range(GA):
            x, y = batch(step, micro, rank)
            engine.backward(engine(x, y, task, touch_all=stage == 3))
            engine.step()
        for t, (params, moments) in others.items():
            now = snapshot(engine, opt, t)
            untouched &= all(torch.equal(a, b) for a, b in zip(params + moments, now[0] + now[1]))
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            final = {k: v.detach().double().clone() for k, v in engine.module.state_dict().items()}
    else:
        final = {k: v.detach().double().clone() for k, v in engine.module.state_dict().items()}
    return final, untouched


def main():
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    sampler = UnmixedSampler(TASKS, PROBS, seed=11)
    ref = reference(world, sampler).state_dict()
    for stage in [int(s) for s in sys.argv[1].split(",")]:
        final, untouched = run_stage(stage, world, sampler)
        rel = max(float((final[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
        flags = torch.tensor([int(untouched)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if dist.get_rank() == 0:
            drawn = [sampler.draw(s) for s in range(STEPS)]
            print(json.dumps({"stage": stage, "rel": rel, "untouched": bool(flags.item()), "drawn": drawn}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
