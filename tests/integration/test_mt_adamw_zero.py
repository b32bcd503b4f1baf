"""MT-AdamW as DeepSpeed's client optimizer on 2 CPU ranks (ZeRO 0-3) equals the same optimizer in one process on
the whole batch over 10 steps of a 3-task unmixed run, and never touches the decoders of the tasks not drawn
(see mt_adamw_zero.py, which torchrun runs)."""

import json
import os
import subprocess
import sys

import pytest

from train_helpers import free_port, train_env

pytestmark = pytest.mark.integration


def test_zero_stages_equal_one_process_and_leave_other_tasks_untouched():
    script = os.path.join(os.path.dirname(__file__), "mt_adamw_zero.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        f"--master_port={free_port()}", script, "0,1,2,3"], capture_output=True, text=True,
                       env=train_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    rows = {row["stage"]: row for row in map(json.loads, [ln for ln in r.stdout.splitlines() if ln.startswith("{")])}
    assert sorted(rows) == [0, 1, 2, 3], r.stdout[-2000:]
    assert len(set(rows[0]["drawn"])) == 3  # every task was drawn at least once in the 10 steps
    for stage, row in rows.items():
        assert row["untouched"], (stage, row)
        assert row["rel"] < 1e-5, (stage, row)
