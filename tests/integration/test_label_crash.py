"""Exactly once after real crashes: the label driver's process group SIGKILLed mid-run and rerun, and a
Ray worker process SIGKILLed mid-shard (the runner retries its shards on a replacement worker)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from polymae.datasets import shards as S
from polymae.datasets.sources import make_key
from polymae.pipeline.label.driver import LabelConfig, run_label
from proc_helpers import session_members

pytestmark = pytest.mark.integration

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TAR_RE = re.compile(r"^train-(\d{6})\.tar$")
TEMP_RE = re.compile(r"^\.train-\d{6}\.tar\.tmp-[0-9a-f]+$")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source(folder: Path, photos_dir: Path, copies: int) -> set[str]:
    """The scikit-image photos plus ``copies`` renamed copies of each; returns the expected keys."""
    shutil.copytree(photos_dir, folder)
    for p in sorted(photos_dir.iterdir()):
        for c in range(copies):
            shutil.copy(p, folder / f"{p.stem}_copy{c}{p.suffix}")
    return {make_key(p.name) for p in folder.iterdir()}


def _keys_per_tar(split: Path) -> dict[str, list[str]]:
    """``{tar name: sample keys}`` read with plain ``tarfile`` (every member name is ``key.ext``)."""
    out = {}
    for p in sorted(split.glob("train-*.tar")):
        with tarfile.open(p) as tf:
            names = tf.getnames()
        keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
        assert len(names) == 4 * len(keys), p  # rgb.jpg, depth.png, semseg.png, json per sample
        out[p.name] = keys
    return out


def _assert_exactly_once(split: Path, expected_keys: set[str]) -> dict:
    """Every key in exactly one shard; tars readable by tarfile and webdataset; manifest sha256 right."""
    per_tar = _keys_per_tar(split)
    counts = collections.Counter(k for keys in per_tar.values() for k in keys)
    assert set(counts) == expected_keys
    assert [k for k, n in counts.items() if n != 1] == []
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["written"] == len(expected_keys)
    assert sorted(e["name"] for e in manifest["shards"]) == sorted(per_tar)
    for e in manifest["shards"]:
        p = split / e["name"]
        assert e["sha256"] == _sha(p) and e["size"] == p.stat().st_size, e["name"]
        assert e["samples"] == len(per_tar[e["name"]])
    raw = list(S.iter_raw_samples([str(split / e["name"]) for e in manifest["shards"]]))  # webdataset
    assert sorted(r["__key__"] for r in raw) == sorted(expected_keys)
    for r in raw:
        d = S.decode_sample(r)
        assert d["depth"].shape == d["semseg"].shape == d["rgb"].shape[:2]
    return manifest


def test_driver_sigkill_then_rerun_is_exactly_once(tmp_path, photos_dir):
    src = tmp_path / "src"
    expected = _source(src, photos_dir, copies=1)  # 16 images -> 8 shards of 2
    n_shards = len(expected) // 2
    out = tmp_path / "out"
    split = out / "train"
    cmd = [sys.executable, "-m", "polymae.jobs.label", f"input={src}", f"output={out}", "samples_per_shard=2",
           "num_workers=2", "progress=false"]
    env = {**os.environ, **RAY_ENV}
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 150
            while True:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "no shard finished in time"
                names = os.listdir(split) if split.exists() else []
                n_done = sum(n.endswith(".stats.json") for n in names)
                if 1 <= n_done < n_shards and any(TEMP_RE.match(n) for n in names):
                    break  # some shards done, others half written: kill now
                time.sleep(0.02)
            # A real crash of the whole run, as when the machine or container dies: the driver's process
            # group (driver, GCS, raylet) and, at once, the Ray workers, which Ray puts in process groups
            # of their own (killing only the driver's group lets them finish the shard in hand).
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in session_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            t_kill = time.time()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.time() + 30
    while session_members(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert session_members(proc.pid) == []

    # What the kill left: finished shards (tar + stats), hidden temporaries, nothing else trusted.
    names = sorted(os.listdir(split))
    done = {int(n[6:12]) for n in names if n.endswith(".stats.json")}
    temps = [n for n in names if TEMP_RE.match(n)]
    assert 1 <= len(done) < n_shards and temps
    assert "manifest.json" not in names
    for n in names:
        m = TAR_RE.match(n)
        if m and int(m.group(1)) in done:
            stats = json.loads((split / S.stats_name("train", int(m.group(1)))).read_text())
            assert stats["sha256"] == _sha(split / n)  # complete, as its done marker says
        elif m:  # renamed into place but killed before its done marker: complete, yet not trusted
            with tarfile.open(split / n) as tf:
                tf.getnames()
        else:
            assert n.endswith(".stats.json") or TEMP_RE.match(n) or n in (
                "plan.parquet", "config.yaml", "fingerprint.json", ".label-lease.json"), n
    assert set(S.done_shards(str(out), "train")) == done
    assert all(".tmp-" not in u for u in S.trusted_shard_urls(str(out), "train"))
    before = {n: (_sha(split / n), (split / n).stat().st_mtime_ns) for n in names
              if n.startswith("train-") and int(n[6:12]) in done}

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    after_names = os.listdir(split)
    assert not [n for n in after_names if ".tmp-" in n]  # the rerun removed the leftovers
    _assert_exactly_once(split, expected)
    # shards finished before the kill were not redone: same bytes, same mtime (tar and stats)
    assert {n: (_sha(split / n), (split / n).stat().st_mtime_ns) for n in before} == before
    # the embedded Ray started the workers at the driver's niceness (worker_nice=0), not Ray's 15
    assert {json.loads(p.read_text())["nice"] for p in split.glob("*.stats.json")} == {0}
    relabelled = {i for i in range(n_shards)
                  if json.loads((split / S.stats_name("train", i)).read_text())["started"] > t_kill}
    assert relabelled == set(range(n_shards)) - done


def test_worker_sigkill_mid_shard_is_retried(tmp_path, photos_dir, ray_local):
    src = tmp_path / "src"
    expected = _source(src, photos_dir, copies=1)  # 16 images, 1 per shard
    out = tmp_path / "out"
    split = out / "train"
    killed: dict = {}

    def kill_first_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for p in sorted(split.glob("train-*.stats.json")) if split.exists() else []:
                pid = json.loads(p.read_text())["pid"]  # the LabelWorker's process, now on its next shard
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, after=p.name, time=time.time())
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    summary = run_label(LabelConfig(input=str(src), output=str(out), samples_per_shard=1, teacher_short_side=64,
                                    batch_size=2, num_workers=2, read_threads=2, progress=False))
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert summary["shards_failed"] == [] and summary["workers_replaced"] >= 1
    assert summary["retries"] >= 1 and summary["shards_retried"]
    manifest = _assert_exactly_once(split, expected)
    assert len(manifest["shards"]) == len(expected)
    # a retried shard is finished by another process, unless the killed worker had already marked it done (an
    # actor holds two shards in flight: one may be done, its result not yet returned; the retry then finds the
    # done marker and writes nothing)
    finished_by_other = 0
    for index in summary["shards_retried"]:
        marker = split / S.stats_name("train", int(index))
        if json.loads(marker.read_text())["pid"] == killed["pid"]:
            assert marker.stat().st_mtime <= killed["time"], index
        else:
            finished_by_other += 1
    assert finished_by_other >= 1
