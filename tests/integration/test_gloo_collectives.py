"""``polymae.patches.bucketed_all_gather`` on 2 gloo ranks: ZeRO-1/2's parameter all-gather through DeepSpeed's bucketed
path gathers the same bytes as its one-message path, and the switch is reversible."""

import json
import subprocess
import sys

import pytest

from train_helpers import free_port, train_env

pytestmark = pytest.mark.integration

# Each rank owns half of two flat "parameter groups" (sizes not multiples of the bucket, one smaller than a
# bucket) filled with rank-specific values; both paths must leave every rank with the whole of both groups.
SNIPPET = """
import json, torch, torch.distributed as dist
from deepspeed.runtime.utils import all_gather_dp_groups
import deepspeed.comm.comm as dcomm
from polymae.patches import bucketed_all_gather
from polymae.pipeline.train.distributed import GLOO_ALLGATHER_BUCKET, init_deepspeed_distributed
init_deepspeed_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
sizes = [2 * 5_000_002, 2 * 1_000]
want = [torch.cat([torch.arange(n // world, dtype=torch.float32) + 1e7 * r for r in range(world)]) for n in sizes]
out = {}
for mode in (True, False):
    flats = [torch.full((n,), -1.0) for n in sizes]
    parts = [list(f.chunk(world)) for f in flats]
    for f, w in zip(flats, want):
        h = f.numel() // world
        f[rank * h:(rank + 1) * h] = w[rank * h:(rank + 1) * h]
    with bucketed_all_gather(mode):
        has = dcomm.cdb.has_all_gather_into_tensor()
        all_gather_dp_groups(groups_flat=flats, partitioned_param_groups=parts, dp_process_group=[dist.group.WORLD] * 2,
                             start_alignment_factor=2, allgather_bucket_size=GLOO_ALLGATHER_BUCKET)
    out[str(mode)] = {"has_all_gather_into_tensor": has, "equal": [bool(torch.equal(f, w)) for f, w in zip(flats, want)],
                      "restored": dcomm.cdb.has_all_gather_into_tensor()}
if rank == 0:
    print(json.dumps(out))
"""


def test_bucketed_all_gather_matches_one_message(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(SNIPPET)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script)],
                       capture_output=True, text=True, env=train_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["True"] == {"has_all_gather_into_tensor": False, "equal": [True, True], "restored": True}
    assert out["False"] == {"has_all_gather_into_tensor": True, "equal": [True, True], "restored": True}
