"""Multi-node safety of the label job: local paths refused on a cluster of several nodes (unless
``shared_fs=true``), relative paths made absolute in the driver, the storage environment sent to every worker
through Ray's runtime environment, a clear error when workers cannot be placed, and a pool that grows as nodes
join. The two-node cluster is Ray's own ``ray.cluster_utils.Cluster`` (two raylets on this machine), in a
subprocess so that it does not meet the session's embedded Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from polymae.pipeline.config import ConfigError
from polymae.pipeline.label.driver import LabelConfig, absolute_paths
from polymae.pipeline.label.scheduler import PlacementError, ShardScheduler, check_shared_paths, storage_env
from polymae.pipeline.label.worker import LabelWorker

pytestmark = pytest.mark.integration

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_local_paths_are_refused_on_several_nodes(tmp_path, monkeypatch):
    local = {"input": str(tmp_path / "photos"), "output": "s3://bucket/shards"}
    check_shared_paths(local, nodes=1, shared_fs=False)  # one node: every worker sees the driver's disk
    check_shared_paths(local, nodes=3, shared_fs=True)  # the user says every node mounts it
    check_shared_paths({"input": "s3://b/in", "output": "s3://b/out"}, nodes=3, shared_fs=False)
    with pytest.raises(ConfigError) as e:
        check_shared_paths(local, nodes=2, shared_fs=False)
    assert e.value.key == "input" and "the Ray cluster has 2 nodes" in str(e.value) and "shared_fs=true" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_shared_paths({"input": "s3://b/in", "output": "file:///data/shards"}, nodes=2, shared_fs=False)
    assert e.value.key == "output"
    # relative paths become absolute in the driver (a worker's working folder is not the driver's)
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(LabelConfig(input="photos", output="work/shards"))
    assert (cfg.input, cfg.output) == (str(tmp_path / "photos"), str(tmp_path / "work" / "shards"))
    assert absolute_paths(LabelConfig(input="s3://b/in", output="s3://b/out")).output == "s3://b/out"


def test_storage_env_carries_credentials_and_storage_options(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", "/models/hf")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = storage_env({"s3": {"endpoint_url": "http://minio:9000", "requester_pays": True}})
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["HF_HOME"] == "/models/hf"
    assert "UNRELATED_SECRET" not in env
    assert json.loads(env["FSSPEC_S3"]) == {"endpoint_url": "http://minio:9000", "requester_pays": True}
    import fsspec.config

    conf: dict = {}
    fsspec.config.set_conf_env(conf, env)  # what fsspec does with it at import in a worker
    assert conf["s3"] == {"endpoint_url": "http://minio:9000", "requester_pays": True}


def test_unplaceable_workers_fail_naming_the_resource(ray_local):
    specs = LabelConfig(input="x", teacher_short_side=64).teacher_specs()
    with pytest.raises(PlacementError) as e:  # this machine has no GPU
        ShardScheduler(LabelWorker, (specs, 1, None), 1, 0, num_cpus=1, num_gpus=1, placement_timeout_s=1.0)
    message = str(e.value)
    assert "no node of the cluster has GPU=1" in message and "placement_timeout_s=1 s" in message
    with pytest.raises(PlacementError, match="no node of the cluster has CPU=64"):
        ShardScheduler(LabelWorker, (specs, 1, None), 1, 0, num_cpus=64, num_gpus=0, placement_timeout_s=1.0)
    from ray.util import placement_group_table

    assert {pg["state"] for pg in placement_group_table().values()} <= {"REMOVED"}  # nothing left reserved


CLUSTER_SCRIPT = textwrap.dedent('''
    """Two Ray nodes on this machine: refuse local paths, grow the pool as a node joins, deliver the env."""
    import json, os, sys, time

    import ray
    from ray.cluster_utils import Cluster

    from polymae.pipeline.config import ConfigError
    from polymae.pipeline.label import scheduler
    from polymae.pipeline.label.driver import LabelConfig, run_label
    from polymae.pipeline.label.worker import ShardJob

    flag, photos, out = sys.argv[1:4]
    scheduler.GROW_INTERVAL_S = 0.5  # ask the cluster's size often: this test waits on it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    os.environ["AWS_POLYMAE_PROBE"] = "through the runtime env"  # set after the raylets started
    ray.init(address=cluster.address, logging_level="WARNING")
    result = {}


    class Body:
        """A label worker stand-in: shard 0 waits until the pool has grown; every shard reports its worker."""

        def __init__(self, *args):
            pass

        def metadata(self):
            return {}

        def label(self, job):
            deadline = time.time() + 120
            while job.index == 0 and not os.path.exists(flag) and time.time() < deadline:
                time.sleep(0.05)
            return {"index": job.index, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                    "probe": os.environ.get("AWS_POLYMAE_PROBE")}


    pool = scheduler.ShardScheduler(Body, (), 1, 0, num_cpus=1, num_gpus=0, placement_timeout_s=60,
                                    target=scheduler.worker_target(False, 1), env_vars=scheduler.storage_env())
    cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)  # a node joins while the run goes on
    cluster.wait_for_nodes()
    done = []

    def on_done(job, out):
        done.append(out)

    import threading

    def release_when_grown():
        while pool.peak_workers < 2:
            time.sleep(0.05)
        open(flag, "w").close()

    threading.Thread(target=release_when_grown, daemon=True).start()
    pool.run([ShardJob("train", i, f"x{i}", f"y{i}", []) for i in range(6)], on_done)
    pool.close()
    result.update(peak=pool.peak_workers, failed=pool.failed, nodes=sorted({d["node"] for d in done}),
                  probes=sorted({d["probe"] for d in done}), shards=sorted(d["index"] for d in done),
                  alive=scheduler.alive_nodes())
    try:
        run_label(LabelConfig(input=photos, output=out, ray_address=cluster.address, progress=False))
    except ConfigError as e:
        result["refused"] = [e.key, str(e)]
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


def test_two_nodes_grow_the_pool_send_the_env_and_refuse_local_paths(tmp_path, photo_writer):
    photo_writer(tmp_path / "photos", ["coins"])
    script = tmp_path / "two_nodes.py"
    script.write_text(CLUSTER_SCRIPT)
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "grown"), str(tmp_path / "photos"),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=400,
                          cwd=tmp_path)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["alive"] == 2 and result["failed"] == {}
    assert result["peak"] == 2 and len(result["nodes"]) == 2  # the pool grew onto the node that joined
    assert result["shards"] == list(range(6))
    assert result["probes"] == ["through the runtime env"]  # the raylets never had it: only the runtime env
    key, message = result["refused"]
    assert key == "input" and "the Ray cluster has 2 nodes" in message
    assert not (tmp_path / "out" / "train" / "train-000000.tar").exists()
