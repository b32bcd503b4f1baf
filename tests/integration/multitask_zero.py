"""Run by torchrun (2 ranks, gloo) from test_multitask.py: the multitask job's trainer at the ZeRO stages given in
argv[2] (comma-separated), with the tiny settings of multitask_helpers.py (argv[1] = a JSON list of overrides
holding an ``OUT`` placeholder for the run folder). Before and after every step it snapshots the decoders of the
tasks not drawn (module parameters, MT-AdamW's parameter partitions and moments) and checks them bit-identical;
at the end it saves a checkpoint. Rank 0 prints one JSON line per stage: ``{"stage", "untouched", "drawn", "losses"}`` (each step's loss, averaged
over the ranks)."""

import json
import os
import sys

import torch
import torch.distributed as dist

from polymae.pipeline.config import load_config
from polymae.pipeline.train.multitask import MultitaskTrainer
from polymae.pipeline.train.multitask_config import MultitaskConfig


def snapshot(trainer: MultitaskTrainer, task: str) -> list[torch.Tensor]:
    """Task ``task``'s head: its module parameters, then every tensor MT-AdamW holds for its groups (the groups'
    parameters, which are ZeRO's flat fp32 partitions at stages 1-2, and their moments), copied. At ZeRO-3 a module
    parameter is this rank's partition (``ds_tensor``; the full tensor may or may not be gathered at the time), and
    the optimizer's tensors are the fp32 partitions of the sub-groups that hold only this head's parameters."""
    params = list(trainer.engine.module.heads[task].parameters())
    out = [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for p in params]
    zero = trainer.engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: the optimizer sees one sub-group at a time
        own = {id(p) for p in params}
        flats = [f for group, f in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat)
                 if group and all(id(p) in own for p in group)]
        assert flats, f"no ZeRO-3 sub-group holds only {task}'s head"
    else:
        flats = [p for g in trainer.optimizer.param_groups if g.get("task") == task for p in g["params"]]
    for p in flats:
        out.append(p.detach().clone())
        out += [v.clone() for v in trainer.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return out


def run_stage(args: list[str], stage: int) -> tuple[bool, list[str]]:
    cfg = load_config(MultitaskConfig, overrides=[a.replace("OUT", f"z{stage}") for a in args] +
                      [f"train.zero_stage={stage}"])
    trainer = MultitaskTrainer(cfg)
    trainer.setup()
    untouched, drawn, losses = True, [], []
    with trainer.process_settings():
        for step in range(cfg.train.steps):
            task = trainer.sampler.draw(step)
            others = {t: snapshot(trainer, t) for t in trainer.tasks if t != task}
            row, _ = trainer.train_step(step, log_row=True)
            losses.append(row["loss"])
            for t, before in others.items():
                after = snapshot(trainer, t)
                untouched &= len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
            drawn.append(task)
    trainer.checkpointer.save(cfg.train.steps)
    return untouched, drawn, losses


def main():
    args, stages = json.loads(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
    for stage in stages:
        untouched, drawn, losses = run_stage(args, stage)
        flag = torch.tensor([int(untouched)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if dist.get_rank() == 0:
            print(json.dumps({"stage": stage, "untouched": bool(flag.item()), "drawn": drawn, "losses": losses}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
