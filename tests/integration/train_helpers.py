"""Helpers for training tests: small labelled shards written straight through the shard format, torchrun.

``synthetic_shards`` skips the teachers (those are tested in test_label.py): the RGB is a real
scikit-image photograph, the depth pseudo-label its inverted luminance and the semseg pseudo-label its
luminance quantised into 8 classes, so the shards are small, fast to build and fully deterministic.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import numpy as np

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "camera", "coins"]


def write_synthetic_shards(root: str, split: str = "train", per_shard: int = 3, names=PHOTOS, size: int = 96) -> int:
    """Write ``len(names)`` samples into ``ceil(len / per_shard)`` shards + stats + manifest; returns shards."""
    import skimage.data
    from PIL import Image

    from polymae.datasets import shards
    from polymae.datasets import storage

    samples = []
    for name in names:
        arr = np.asarray(getattr(skimage.data, name)())
        img = Image.fromarray(arr).convert("RGB").resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        rgb = np.asarray(img).astype(np.float32)
        lum = rgb.mean(-1) / 255.0
        samples.append(shards.LabelledSample(
            key=name, rgb_jpeg=buf.getvalue(), depth=1.0 - lum + 0.05, semseg=np.minimum(lum * 8, 7).astype(np.int64),
            num_classes=8, meta={"source": name, "teachers": {"synthetic": True}}))
    storage.makedirs(shards.split_dir(root, split))
    entries = []
    for i in range(0, len(samples), per_shard):
        idx = i // per_shard
        url = shards.shard_url(root, split, idx)
        with shards.ShardTarWriter(url) as w:
            for s in samples[i:i + per_shard]:
                w.write(s)
        n = len(samples[i:i + per_shard])
        storage.write_json_atomic(shards.stats_url(root, split, idx), {"samples_in": n, "written": n})
        digest, sz = storage.sha256_of(url)
        entries.append({"index": idx, "samples": n, "size": sz, "sha256": digest})
    storage.write_json_atomic(shards.manifest_url(root, split), {
        "schema_version": shards.SCHEMA_VERSION, "shards": entries,
        "teachers": {"semseg": {"num_classes": 8, "label_set": "luminance-8"}}})
    return len(entries)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "polymae.jobs.pretrain", *args]


def train_env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", POLYMAE_LOG_LEVEL="WARNING")


def run_pretrain(nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(torchrun_cmd(nproc, args), capture_output=True, text=True, env=train_env(), timeout=timeout)
    assert r.returncode == 0, r.stderr[-6000:]
    return r


def run_job_killable(cmd: list[str], kill: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``cmd`` (a training job) in its own session with INFO logs on stderr; ``kill`` = the fault-injection point
    (``POLYMAE_TEST_KILL_AT``), after which the job must have failed by it; else it must succeed. The whole
    session is SIGKILLed on a timeout. Returns the process with its stderr."""
    import signal

    from polymae.pipeline.train.checkpoint import KILL_ENV

    env = {**train_env(), "POLYMAE_LOG_LEVEL": "INFO", **({KILL_ENV: kill} if kill else {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if kill:
        assert proc.returncode != 0 and "fault injection" in err, err[-3000:]
    else:
        assert proc.returncode == 0, err[-6000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, None, err)


def wait_for(pred, timeout: float, every: float = 0.2) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(every)
    return False
