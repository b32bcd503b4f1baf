"""No host synchronisation inside a training step that does not log: the Trainer keeps losses on the device and
reduces them once per logging interval (a GPU would otherwise stall on every ``.item()``). Counted on CPU by
wrapping the tensor methods that force a device-to-host copy, around real DeepSpeed steps."""

import json
import subprocess
import sys

import pytest

from train_helpers import train_env

pytestmark = pytest.mark.integration

SNIPPET = r"""
import collections, json, sys, traceback, torch
from polymae.pipeline.config import load_config
from polymae.pipeline.train.config import PretrainConfig
from polymae.pipeline.train.trainer import Trainer

shards, out, stage = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config(PretrainConfig, overrides=[f"data.shards={shards}", f"output={out}", f"train.zero_stage={stage}",
                  "data.img_size=32", "model.num_visible=4", "data.num_workers=0", "train.steps=6",
                  "train.global_batch=4", "train.micro_batch=2", "train.log_interval=5", "optim.warmup_steps=2"])
tr = Trainer(cfg)
tr.setup()
counts = collections.Counter()
originals = {}

def wrap(name):
    orig = getattr(torch.Tensor, name)
    originals[name] = orig
    def counted(self, *a, **k):
        frame = traceback.extract_stack(limit=3)[0]
        counts[f"{name} {'polymae' if '/deepspeed/' not in frame.filename and 'site-packages' not in frame.filename else 'library'} {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"] += 1
        return orig(self, *a, **k)
    setattr(torch.Tensor, name, counted)

rows = []
with tr.process_settings(), tr.metrics_logger() as logger:
    batches = iter(tr.loader)
    for step in range(6):
        log = logger.due(step + 1)
        if step == 1:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                wrap(name)
        if step == 4:
            for name, orig in originals.items():
                setattr(torch.Tensor, name, orig)
        r = tr.train_step(batches, step, log=log)
        logger.record(step + 1, r.metrics)
        rows.append(None if r.metrics is None else r.metrics["loss"])
tr.close()
print(json.dumps({"counts": counts, "rows": rows}))
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_non_logging_steps_make_no_host_sync(synthetic_shards, tmp_path, stage):
    script = tmp_path / "sync.py"
    script.write_text(SNIPPET)
    r = subprocess.run([sys.executable, str(script), synthetic_shards, str(tmp_path / "run"), str(stage)],
                       capture_output=True, text=True, env=train_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # steps 2-4 (1-based) are not logged with log_interval=5: nothing may force a device-to-host copy there
    assert out["counts"] == {}, out["counts"]
    rows = out["rows"]
    assert [x is not None for x in rows] == [True, False, False, False, True, True]  # steps 1, 5 and the last
