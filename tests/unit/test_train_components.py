"""The Trainer's reusable parts on their own: MetricsLogger + read_metrics, Checkpointer (with a stand-in engine)."""

import json
import os

import pytest

from polymae.pipeline.train.checkpoint import Checkpointer, latest_tag, step_tag
from polymae.pipeline.train.metrics_log import MetricsLogger, read_metrics

pytestmark = pytest.mark.unit


def _row(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "losses": {"rgb": loss}, "lr": 1e-3, "grad_norm": None,
            "images_per_s": 10.0, "tokens_per_s": 100.0, "data_wait_pct": 1.0, "step_s": 0.1,
            "tflops_per_s": 0.0, "mfu": None, "peak_memory_gib": 1.0}


def test_metrics_logger_writes_due_steps_and_read_metrics_keeps_the_newest(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run, total_steps=5, log_interval=2, progress=False) as logger:
        written = [logger.record(s, _row(s, float(s))) for s in range(1, 6)]
    assert written == [True, True, False, True, True]  # step 1, every 2nd, the last
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 4, 5]
    assert os.listdir(tmp_path / "tb")  # TensorBoard event file
    # a resumed run appends steps again: the later line of a step wins
    with MetricsLogger(run, total_steps=5, first_step=3, progress=False) as logger:
        logger.record(4, _row(4, 40.0))
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 1.0), (2, 2.0), (4, 40.0), (5, 5.0)]
    with open(tmp_path / "metrics.jsonl") as fh:
        assert json.loads(fh.readlines()[-1]) == _row(4, 40.0)


def test_disabled_metrics_logger_writes_nothing(tmp_path):
    with MetricsLogger(str(tmp_path / "other"), total_steps=2, enabled=False) as logger:
        assert logger.record(1, _row(1, 1.0)) is False
    assert read_metrics(str(tmp_path / "other")) == [] and not (tmp_path / "other").exists()


class _Engine:
    """Stands in for a DeepSpeed engine: save_checkpoint / load_checkpoint with DeepSpeed's folder layout."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        os.makedirs(os.path.join(folder, tag))
        with open(os.path.join(folder, tag, "state.json"), "w") as fh:
            json.dump(client_state, fh)
        if save_latest:
            with open(os.path.join(folder, "latest"), "w") as fh:
                fh.write(tag)

    def load_checkpoint(self, folder, tag=None):
        if tag is None:
            if not os.path.exists(os.path.join(folder, "latest")):
                return None, None
            with open(os.path.join(folder, "latest")) as fh:
                tag = fh.read()
        with open(os.path.join(folder, tag, "state.json")) as fh:
            self.loaded = tag
            return os.path.join(folder, tag), json.load(fh)


def test_checkpointer_saves_prunes_and_resumes(tmp_path):
    ck = Checkpointer(_Engine(), str(tmp_path) + "/", keep_last=2)
    assert ck.latest_tag() is None and ck.load() == 0
    for step in (3, 6, 9):
        assert ck.save(step) == step_tag(step)
    assert sorted(d for d in os.listdir(ck.folder) if d.startswith("step-")) == ["step-00000006", "step-00000009"]
    assert ck.latest_tag() == latest_tag(str(tmp_path)) == "step-00000009"
    fresh = Checkpointer(_Engine(), str(tmp_path))
    assert fresh.load() == 9 and fresh.engine.loaded == "step-00000009"
