"""The label job submitted with ``ray job submit`` to a real Ray head (GCS, raylet, dashboard, job server)
started by ``ray start --head --block`` on free ports; the head is stopped by its process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from polymae.datasets import shards as S
from proc_helpers import free_ports, session_members

pytestmark = pytest.mark.integration

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A Ray head with dashboard and job server on free 127.0.0.1 ports.

    Yields ``{"dashboard": http URL, "gcs": host:port, "env": environment for the ray CLI}``; the head
    runs ``ray start --block`` in its own session and is stopped by signalling that process (SIGTERM), then
    its process group and any process left in its session (SIGKILL), never with ``ray stop``.
    """
    if not (BIN / "ray").exists():
        pytest.skip("the ray CLI is not installed")
    root = tmp_path_factory.mktemp("rayhead")
    gcs, dash, client, agent = free_ports(4)
    env = {**os.environ, **RAY_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # a short temp dir: Ray's unix socket paths must stay under 107 characters
    temp_dir = Path(f"/tmp/pmrh-{gcs}")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--object-store-memory={512 * 2**20}", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    log = open(root / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            assert head.poll() is None, (root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not answer in 90 s"
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield {"dashboard": url, "gcs": f"127.0.0.1:{gcs}", "env": {**env, "RAY_API_SERVER_ADDRESS": url}}
    finally:
        # SIGTERM to `ray start --block` alone: it drains the node through the GCS and stops its processes
        # (~2 s). Signalling the whole group first kills the GCS, and the drain then waits 30 s for it.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=40)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its process group is left
        except ProcessLookupError:
            pass
        deadline = time.time() + 20
        while session_members(head.pid) and time.time() < deadline:
            time.sleep(0.2)
        for pid in session_members(head.pid):  # started by this head (workers, agents): end them by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def test_label_under_ray_job_submit(ray_head, tmp_path, photo_writer):
    from ray.job_submission import JobStatus, JobSubmissionClient

    src, out, work = tmp_path / "photos", tmp_path / "out", tmp_path / "jobdir"
    photo_writer(src, ["astronaut", "coffee", "camera", "coins", "rocket"])
    work.mkdir()
    (work / "README.txt").write_text("working dir of a polymae test job; the code is pip-installed\n")
    job_id = f"polymae-label-{os.getpid()}-{int(time.time())}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(work),
           "--submission-id", job_id, "--",
           "python", "-m", "polymae.jobs.label", f"input={src}", f"output={out}", "samples_per_shard=2",
           "teacher_short_side=64", "num_workers=2", "progress=false", "--address", ray_head["gcs"]]
    done = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    client = JobSubmissionClient(ray_head["dashboard"])
    status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}\n{logs[-3000:]}"
    assert done.returncode == 0 and "images in" in logs
    info = client.get_job_info(job_id)
    assert info.entrypoint.startswith("python -m polymae.jobs.label")

    split = out / "train"
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["written"] == 5 and len(manifest["shards"]) == 3
    for e in manifest["shards"]:
        stats = json.loads((split / S.stats_name("train", e["index"])).read_text())
        assert stats["sha256"] == e["sha256"] and stats["host"] == socket.gethostname()
    raw = list(S.iter_raw_samples([str(split / e["name"]) for e in manifest["shards"]]))
    assert sorted(r["__key__"] for r in raw) == ["astronaut", "camera", "coffee", "coins", "rocket"]
    assert (split / "index.parquet").exists() and (split / "config.yaml").exists()
    # the job joined the head's cluster (2 workers on its CPUs), not an embedded Ray of its own
    assert len({json.loads(p.read_text())["pid"] for p in split.glob("*.stats.json")}) == 2
