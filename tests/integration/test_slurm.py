"""The sbatch scripts of slurm/ on a real single-node Slurm cluster (``slurm_cluster``, slurm_helpers.py), on CPU:

* ``pretrain.sbatch`` with 2 tasks is sent SIGTERM mid-run (``scancel --signal=TERM``: every process of the step,
  as Slurm does ahead of a time limit or on preemption); the ranks save and exit 75, the script requeues the job,
  the restarted job resumes from that checkpoint and finishes with the losses of an uninterrupted torchrun run;
* ``ray_label.sbatch`` starts a Ray head inside the allocation, runs the label job against it and stops it: no
  process of the job (nor any using its Ray folder) is left;
* ``evaluate.sbatch`` evaluates the pre-training run folder on the held-out split.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from polymae.pipeline.train.metrics_log import read_metrics
from polymae.pipeline.train.trainer import PREEMPTED_EXIT_CODE

from slurm_helpers import FINAL_STATES, free_ports, report_line
from train_helpers import free_port, run_pretrain, train_env, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV = sys.prefix  # the virtualenv running the tests (POLYMAE_VENV of the jobs)
STEPS = 8
# the tiny settings of test_checkpoint_atomic.py; checkpoints only on the preemption signal and at the end
COMMON = ["data.img_size=32", "model.num_visible=4", "data.num_workers=1", "data.shuffle_buffer=4",
          f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=2",
          "optim.base_lr=0.01", "train.save_interval=100"]
# sbatch options overriding the scripts' #SBATCH lines for a 2-CPU node without GPUs
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def _job_env(**extra: str) -> dict:
    """What the jobs inherit (sbatch exports the submitting environment)."""
    return {**train_env(), "POLYMAE_VENV": VENV, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **extra}


def _log(info: dict) -> str:
    return Path(info["StdOut"]).read_text(errors="replace")


def _processes_of(job_id: int, needle: str) -> list[str]:
    """Live processes that belong to Slurm job ``job_id`` (``SLURM_JOB_ID`` in their environment) or whose
    command line contains ``needle``: ``pid cmdline`` each."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X") or int(pid) == os.getpid():
            continue
        if f"\0SLURM_JOB_ID={job_id}\0".encode() in b"\0" + environ or needle in cmdline:
            found.append(f"{pid} {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def reference_losses(synthetic_shards, tmp_path_factory) -> list[float]:
    """Per-step losses of an uninterrupted 2-rank torchrun run with the same config."""
    run = tmp_path_factory.mktemp("slurm_ref") / "run"
    run_pretrain(2, [f"data.shards={synthetic_shards}", f"output={run}", *COMMON], timeout=300)
    losses = [r["loss"] for r in read_metrics(str(run))]
    assert len(losses) == STEPS
    return losses


@pytest.fixture(scope="module")
def preempted_pretrain(slurm_cluster, synthetic_shards, tmp_path_factory) -> dict:
    """``sbatch slurm/pretrain.sbatch`` (2 tasks), SIGTERM to its step after 2 logged steps, then wait until the
    requeued job has finished. Returns the run folder, the job's final ``scontrol show job`` and the times."""
    work = tmp_path_factory.mktemp("slurm_pretrain")
    run = work / "run"
    t0 = time.perf_counter()
    job = slurm_cluster.sbatch(["--ntasks-per-node=2", *CPU_NODE, f"--output={work}/slurm-%x-%j.out",
                                str(REPO / "slurm" / "pretrain.sbatch"),
                                f"data.shards={synthetic_shards}", f"output={run}", *COMMON,
                                # a release every step from a background process: one is publishing when the
                                # signal comes (Slurm signals it too); that must not cost the requeue
                                "train.save_interval=1", "train.publish_every=1", f"train.publish_to={work}/releases"],
                               cwd=work, env=_job_env(POLYMAE_MASTER_PORT=str(free_port()), POLYMAE_LOG_LEVEL="INFO"))
    running = wait_for(lambda: len(read_metrics(str(run))) >= 2
                       or slurm_cluster.job(job)["JobState"] not in ("PENDING", "RUNNING"), timeout=240, every=0.1)
    info = slurm_cluster.job(job)
    assert running and info["JobState"] == "RUNNING", f"{info}\n{_log(info)[-4000:]}"
    signalled_at = len(read_metrics(str(run)))
    assert signalled_at < STEPS, "the run ended before the signal: raise STEPS"
    t_signal = time.perf_counter()
    slurm_cluster.scancel("--signal=TERM", str(job))
    requeued = slurm_cluster.wait_job(job, lambda i: int(i.get("Restarts", 0)) >= 1 or i["JobState"] != "RUNNING",
                                      timeout=120)
    t_requeued = time.perf_counter()
    # a held job (priority 0: `scontrol requeuehold`, or a hold after too many launch failures) would never start
    info = slurm_cluster.wait_job(job, lambda i: i["JobState"] in FINAL_STATES or i.get("Priority") == "0", timeout=300)
    return {"run": run, "job": job, "info": info, "requeued": requeued, "signalled_at": signalled_at,
            "releases": work / "releases",
            "seconds": {"until_signal": t_signal - t0, "signal_to_requeue": t_requeued - t_signal,
                        "requeue_to_end": time.perf_counter() - t_requeued}}


def test_pretrain_sbatch_preempted_requeued_resumes_exactly(preempted_pretrain, reference_losses, request):
    p = preempted_pretrain
    info, log = p["info"], _log(p["info"])
    report_line(request.config, "pretrain.sbatch: " + ", ".join(f"{k} {v:.1f} s" for k, v in p["seconds"].items()))
    assert int(p["requeued"]["Restarts"]) == 1 and p["requeued"].get("Priority") != "0", p["requeued"]  # not held
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), f"{info}\n{log[-6000:]}"
    # one log file for both starts (--open-mode=append): checkpoint + status 75 + requeue, then the second start
    assert f"job {p['job']}, start 1 on" in log and f"job {p['job']}, start 2 on" in log, log[-6000:]
    # both ranks finished their step, saved and left with status 75; the script requeued the job on it
    stopped = re.findall(
        rf"stopped at step (\d+) after SIGTERM \(checkpoint saved\); exit status {PREEMPTED_EXIT_CODE}", log)
    assert len(stopped) == 2 and len(set(stopped)) == 1, log[-6000:]
    assert f"preempted after saving a checkpoint (status {PREEMPTED_EXIT_CODE}): requeueing job {p['job']}" in log
    assert "pretrain ended with status 0 (finished)" in log
    # both ranks of the second start resumed from the checkpoint the signal made, after the logged steps
    resumed = re.findall(r"resumed from \S*/(step-\d+)/\S* at step (\d+)", log)
    assert len(resumed) == 2 and len(set(resumed)) == 1, log[-6000:]
    assert p["signalled_at"] <= int(resumed[0][1]) == int(stopped[0]) < STEPS
    rows = read_metrics(str(p["run"]))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == reference_losses
    # background releases: the preemption stopped the one in flight without failing the job; the last one is whole
    from polymae.pipeline.publish import verify_release

    assert (p["releases"] / "latest").read_text().strip() == f"step-{STEPS:08d}", log[-6000:]
    assert verify_release(str(p["releases"] / f"step-{STEPS:08d}")) == []
    assert "background publish of" in log and "FAILED" not in log, log[-6000:]  # a killed publish is no failure
    assert re.search(r"preempted: step-\d+ was not published; after the requeue: polymae publish", log), log[-6000:]
    # the requeued start published the checkpoint the preemption made first
    assert f"step-{int(stopped[0]):08d} of an earlier start has no release yet; publishing it now" in log, log[-6000:]
    assert verify_release(str(p["releases"] / f"step-{int(stopped[0]):08d}")) == []


def test_evaluate_sbatch_on_the_pretrain_run(preempted_pretrain, slurm_cluster, synthetic_shards, tmp_path):
    run = preempted_pretrain["run"]
    job = slurm_cluster.sbatch(["--gpus=0", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/slurm-%x-%j.out",
                                str(REPO / "slurm" / "evaluate.sbatch"),
                                f"checkpoint={run}", f"shards={synthetic_shards}", "split=val", "batch_size=2"],
                               cwd=tmp_path, env=_job_env())
    info = slurm_cluster.wait_final(job, timeout=300)
    log = _log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log[-6000:]}"
    assert "evaluate ended with status 0" in log and f"StdOut={tmp_path}/slurm-polymae-evaluate-{job}.out" in log
    res = json.loads((run / "eval-val" / "results.json").read_text())
    assert res["samples"] == 3 and res["split"] == "val"
    assert set(res["reconstruction_loss"]) == {"rgb", "depth", "semseg"}
    assert 0.0 <= res["rgb_to_depth"]["delta1"] <= 1.0 and 0.0 <= res["rgb_to_semseg"]["miou"] <= 1.0


def test_ray_label_sbatch_starts_and_stops_its_ray(slurm_cluster, photo_writer, tmp_path):
    src, out = tmp_path / "photos", tmp_path / "shards"
    photo_writer(src, ["astronaut", "coffee", "camera", "coins", "rocket"])
    # a short Ray folder (socket paths < 107 characters) and free ports: other tests' Ray may be running
    ray_dir = tempfile.mkdtemp(prefix="pmray-")
    gcs, agent, client, metrics = free_ports(4)
    ray_args = (f"--dashboard-agent-listen-port={agent} --ray-client-server-port={client} "
                f"--metrics-export-port={metrics} --object-store-memory={256 * 2**20}")
    try:
        job = slurm_cluster.sbatch(["--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=10",
                                    f"--output={tmp_path}/slurm-%x-%j.out", str(REPO / "slurm" / "ray_label.sbatch"),
                                    f"input={src}", f"output={out}", "samples_per_shard=2", "teacher_short_side=64",
                                    "num_workers=2", "progress=false"],
                                   cwd=tmp_path, env=_job_env(POLYMAE_RAY_PORT=str(gcs), POLYMAE_RAY_TEMP_DIR=ray_dir,
                                                              POLYMAE_RAY_START_ARGS=ray_args))
        info = slurm_cluster.wait_final(job, timeout=300)
        log = _log(info)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log[-6000:]}"
        assert "Ray cluster up at" in log and "label job done" in log and "Ray stopped" in log, log[-6000:]
        assert "still runs after" not in log  # every node's Ray ended on its SIGTERM, without escalation
        assert f"StdOut={tmp_path}/slurm-polymae-label-{job}.out" in log
        left = _processes_of(job, ray_dir)
        assert left == [], left
        manifest = json.loads((out / "train" / "manifest.json").read_text())
        assert manifest["complete"] is True and manifest["counts"]["written"] == 5
        # the job ran on the cluster's 2 CPUs as 2 Ray workers, not on an embedded Ray of its own
        stats = [json.loads(p.read_text()) for p in (out / "train").glob("*.stats.json")]
        assert len({s["pid"] for s in stats}) == 2 and {s["host"] for s in stats} == {socket.gethostname()}
    finally:
        import shutil

        shutil.rmtree(ray_dir, ignore_errors=True)
