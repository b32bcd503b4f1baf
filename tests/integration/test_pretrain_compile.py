"""``train.compile=true`` (regional torch.compile of the encoder blocks) on one CPU rank, ZeRO-2: the losses equal
eager training's, and checkpoints written with and without compilation resume into each other exactly.

Five short runs share the inductor cache: the first compiled run pays the one-off compile (~25 s on 2 CPU cores,
far less with a warm cache), later ones reuse it.
"""

import subprocess

import pytest

from polymae.pipeline.train.metrics_log import read_metrics

from train_helpers import torchrun_cmd, train_env

pytestmark = pytest.mark.integration

STEPS = 4
# 32 px, 2x2 patches per modality, 4 of 12 tokens visible; 2 micro-batches of 2 per step. Warm-up over all STEPS
# makes each step's lr independent of train.steps, so a run of 2 or 3 steps has the lrs of the 4-step reference.
COMMON = ["data.img_size=32", "model.num_visible=4", "data.num_workers=0", "data.shuffle_buffer=4",
          "train.global_batch=4", "train.micro_batch=2", f"optim.warmup_steps={STEPS}", "optim.base_lr=0.01",
          "train.zero_stage=2", "train.save_interval=100"]
# dynamo logs one line per traced frame; the compiled encoder block is timm's Block.forward
TRACED_BLOCK = "start tracing forward"


def _run(shards: str, run: str, steps: int, *extra: str) -> int:
    """One ``polymae pretrain`` on 1 rank; returns how many frames dynamo traced in the encoder blocks."""
    env = dict(train_env(), TORCH_LOGS="dynamo")
    r = subprocess.run(torchrun_cmd(1, [f"data.shards={shards}", f"output={run}", f"train.steps={steps}", *COMMON,
                                        *extra]), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-6000:]
    return sum(TRACED_BLOCK in line and "vision_transformer.py" in line for line in r.stderr.splitlines())


def _losses(run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def _assert_close(got: dict[int, float], ref: dict[int, float], steps: range, what: str) -> None:
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (what, s, got, ref)


def test_compiled_blocks_keep_state_dict_keys():
    """``compile_blocks`` is in place: the same keys, and state dicts load strictly both ways."""
    from polymae.models.multimae import create_model

    eager, compiled = create_model("multimae_tiny", img_size=32), create_model("multimae_tiny", img_size=32)
    compiled.encoder.compile_blocks()
    assert all(blk._compiled_call_impl is not None for blk in compiled.encoder)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(compiled.state_dict(), strict=True)


def test_compile_matches_eager_and_resumes_both_ways(synthetic_shards, tmp_path):
    ref = str(tmp_path / "eager")
    assert _run(synthetic_shards, ref, STEPS) == 0  # eager: dynamo traces nothing
    ref_losses = _losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))

    # (a) compiled steps 1-3 equal eager; one traced graph serves all 12 blocks. Then (b) eager resumes step 4.
    c2e = str(tmp_path / "compiled_then_eager")
    assert _run(synthetic_shards, c2e, 3, "train.compile=true") == 1
    _assert_close(_losses(c2e), ref_losses, range(1, 4), "compiled")
    assert _run(synthetic_shards, c2e, STEPS, "resume=true") == 0
    _assert_close(_losses(c2e), ref_losses, range(4, STEPS + 1), "eager resumed from a compiled checkpoint")

    # (b) the other way, with activation checkpointing (its first forward runs under the FLOP counter, eagerly)
    e2c = str(tmp_path / "eager_then_compiled")
    assert _run(synthetic_shards, e2c, 2) == 0
    assert _run(synthetic_shards, e2c, STEPS, "resume=true", "train.compile=true", "model.grad_checkpointing=true") == 1
    _assert_close(_losses(e2c), ref_losses, range(3, STEPS + 1), "compiled + checkpointing resumed from eager")
