"""Failures that fail: a missing or unreadable source, a teacher exception and an output write error fail the
shard (no done marker, retried on a fresh worker, the run fails naming the shard and the error); transient
read errors are retried; only the image's own problems are counted skips, up to ``max_skip_fraction``.

Real photographs (scikit-image), tiny random-weight teachers, embedded Ray. Faults are injected on storage (a
list naming a file that does not exist, a folder in place of an image, an fsspec filesystem registered for
the test that raises real botocore/aiohttp/socket errors on the first reads) and on the teacher (a real tiny
teacher whose ``predict`` raises the error a failing GPU raises), never by mocking the code under test."""

from __future__ import annotations

import collections
import importlib
import json
import logging
import re
import shutil
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from polymae.datasets import shards as S
from polymae.datasets.sources import SourceEntry, make_key
from polymae.pipeline.label.driver import LabelConfig, run_label
from polymae.pipeline.label.worker import (ShardJob, SourceReadFailed, TeacherFailed, TooManySkips,
                                           label_shard)

pytestmark = pytest.mark.integration

PHOTOS = ["chelsea", "coins", "rocket", "camera"]


def _cfg(**kw) -> LabelConfig:
    base = dict(teacher_short_side=64, batch_size=4, num_workers=2, progress=False, read_threads=2,
                shard_retries=1, read_backoff_s=0.01)
    base.update(kw)
    return LabelConfig(**base)


def _stats(split: Path) -> dict[int, dict]:
    return {int(p.name[-17:-11]): json.loads(p.read_text()) for p in split.glob("train-*.stats.json")}


def test_missing_source_fails_its_shard_on_a_fresh_worker_then_resume(tmp_path, ray_local, photo_writer, caplog):
    photos = tmp_path / "photos"
    photo_writer(photos, ["chelsea", "coins", "rocket"])
    listing = tmp_path / "images.txt"
    listing.write_text("photos/chelsea.jpg\nphotos/coins.png\nphotos/rocket.jpg\nphotos/gone.jpg\n")  # no gone.jpg
    out = tmp_path / "out"
    split = out / "train"
    cfg = _cfg(input=str(listing), output=str(out), samples_per_shard=2, num_workers=1)

    with caplog.at_level(logging.WARNING, logger="polymae.label"), pytest.raises(RuntimeError) as failed:
        run_label(cfg)
    plan = pq.read_table(split / "plan.parquet").to_pydict()
    bad = dict(zip(plan["key"], plan["shard"]))["photos__gone"]
    message = str(failed.value)
    assert "1 of 2 shard(s) failed after up to 2 attempt(s)" in message
    assert re.search(rf"shard {bad}: SourceReadFailed: source photos__gone .*gone.jpg\) is missing: "
                     "FileNotFoundError", message)
    # no done marker for the failed shard, so the next run labels it; the good shard is done, nothing skipped
    assert set(_stats(split)) == {1 - bad} and not _stats(split)[1 - bad]["skipped"]
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["missing_shards"] == [bad]
    # tried twice (shard_retries=1), the retry on a fresh worker (another process)
    first = [r.getMessage() for r in caplog.records if f"shard {bad}: attempt 1 of 2 failed" in r.getMessage()]
    assert len(first) == 1
    pid_first = int(re.search(r"pid (\d+)\)", first[0]).group(1))
    assert pid_first != int(re.search(rf"shard {bad}: .*?pid (\d+)\)", message).group(1))

    # the file appears: a re-run labels exactly the failed shard
    shutil.copy(photos / "chelsea.jpg", photos / "gone.jpg")
    before = _stats(split)[1 - bad]["sha256"]
    summary = run_label(cfg)
    assert summary["shards_labelled"] == 1 and summary["shards_reused"] == 1 and summary["shards_failed"] == []
    assert summary["written"] == 4 and summary["skipped"] == 0
    assert _stats(split)[1 - bad]["sha256"] == before
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["missing_shards"] == []


def test_too_many_skips_fail_the_shard_without_retry(tmp_path, ray_local, photo_writer, caplog):
    src = tmp_path / "src"
    photo_writer(src, ["chelsea", "coins", "rocket"])
    astro = (src / "chelsea.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(astro[: len(astro) // 3])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="polymae.label"), pytest.raises(RuntimeError) as failed:
        run_label(_cfg(input=str(src), output=str(out), samples_per_shard=4, num_workers=1, max_skip_fraction=0.2))
    message = str(failed.value)
    assert "shard 0: TooManySkips: shard 0: 1 of 4 images skipped ({'undecodable': 1})" in message
    assert "max_skip_fraction=0.2" in message and "truncated" in message
    assert not [r for r in caplog.records if "attempt 1 of" in r.getMessage()]  # not retried: it would skip again
    assert _stats(out / "train") == {}
    assert not list((out / "train").glob("train-*.tar")) and not S.list_temporaries(str(out), "train")
    # at the limit (1 of 4 = 0.25) the shard is labelled; the skip is counted by reason
    summary = run_label(_cfg(input=str(src), output=str(out), samples_per_shard=4, num_workers=1,
                             max_skip_fraction=0.25))
    assert summary["written"] == 3 and summary["skipped_by_reason"] == {"undecodable": 1}
    stats = _stats(out / "train")[0]
    assert stats["skipped"] == {"undecodable": 1} and stats["max_skip_fraction"] == 0.25


# ------------------------------------------------------------------------- one shard, in this process
@pytest.fixture(scope="module")
def teachers():
    """Tiny random-weight DPT + SegFormer, as a label worker loads them."""
    from polymae.pipeline.label.teachers import load_teacher

    specs = LabelConfig(input="x", teacher_short_side=64, batch_size=4).teacher_specs()
    return {slot: load_teacher(**spec) for slot, spec in specs.items()}


def _job(tmp_path: Path, files: list[Path], uri=str, **kw) -> ShardJob:
    out = tmp_path / "out" / "train"
    base = dict(read_threads=2, read_backoff_s=0.01, batch_size=4)
    base.update(kw)
    return ShardJob("train", 0, str(out / S.shard_name("train", 0)), str(out / S.stats_name("train", 0)),
                    [SourceEntry(make_key(p.name), uri(p), None) for p in files], **base)


class _FailingGPU:
    """A real teacher whose forward pass raises what PyTorch raises after a GPU fault."""

    def __init__(self, teacher):
        self._teacher = teacher

    def predict(self, images, resized=None, input_sizes=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def __getattr__(self, name):
        return getattr(self._teacher, name)


def test_teacher_exception_fails_the_shard(tmp_path, teachers, photo_writer):
    files = photo_writer(tmp_path / "src", ["chelsea", "coins"])
    job = _job(tmp_path, files)
    with pytest.raises(TeacherFailed, match=r"teacher semseg failed on a batch of 2 image\(s\) \(chelsea, coins\): "
                                            "RuntimeError: CUDA error: an illegal memory access"):
        label_shard(job, {"depth": teachers["depth"], "semseg": _FailingGPU(teachers["semseg"])})
    split = Path(job.url).parent
    assert sorted(p.name for p in split.iterdir()) == []  # no tar, no temporary, no done marker
    assert label_shard(job, teachers)["written"] == 2  # the same shard on a sound teacher


def test_unreadable_source_fails_the_shard(tmp_path, teachers, photo_writer):
    files = photo_writer(tmp_path / "src", ["chelsea"])
    (tmp_path / "src" / "unreadable.jpg").mkdir()  # named like an image; reading it raises IsADirectoryError
    job = _job(tmp_path, [*files, tmp_path / "src" / "unreadable.jpg"])
    with pytest.raises(SourceReadFailed, match=r"source unreadable \(.*\) cannot be read: IsADirectoryError"):
        label_shard(job, teachers)
    assert sorted(p.name for p in Path(job.url).parent.iterdir()) == []


def test_output_write_error_fails_the_shard(tmp_path, teachers, photo_writer):
    files = photo_writer(tmp_path / "src", ["chelsea"])
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the done marker's folder should be")
    job = _job(tmp_path, files)
    job.stats_url = str(blocker / S.stats_name("train", 0))
    with pytest.raises(OSError):  # raised, not counted as a skip
        label_shard(job, teachers)
    assert blocker.is_file() and not S.list_done_markers(str(tmp_path / "out"), "train")


def test_existing_done_marker_is_not_relabelled(tmp_path, teachers, photo_writer):
    files = photo_writer(tmp_path / "src", ["chelsea"])
    job = _job(tmp_path, files)
    first = label_shard(job, teachers)
    tar = Path(job.url)
    mtime = tar.stat().st_mtime_ns
    again = label_shard(job, teachers)  # e.g. a retry after the first attempt's result was lost
    assert again == json.loads(Path(job.stats_url).read_text()) == first
    assert tar.stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- transient read errors
def _transient_errors() -> list[BaseException]:
    """Real exception types of the S3 stack meaning "try again": S3 SlowDown (HTTP 503), a reset
    connection, a dropped keep-alive connection."""
    import aiohttp
    import botocore.exceptions

    slow_down = botocore.exceptions.ClientError(
        {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
         "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    return [slow_down, ConnectionResetError(104, "Connection reset by peer"),
            aiohttp.ServerDisconnectedError()]


class FlakyFileSystem(LocalFileSystem):
    """Local files behind ``flaky://``: opening a path raises the errors queued for it in
    :attr:`faults`, one per open, before the file opens normally; :attr:`opens` counts opens per path."""

    protocol = "flaky"
    root_marker = "/"
    faults: dict[str, collections.deque] = {}
    opens: collections.Counter = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("flaky://"):] if str(path).startswith("flaky://") else path
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kw):
        path = self._strip_protocol(path)
        FlakyFileSystem.opens[path] += 1
        queue = FlakyFileSystem.faults.get(path)
        if "r" in mode and queue:
            raise queue.popleft()
        return super()._open(path, mode=mode, **kw)


@pytest.fixture()
def flaky():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.faults.clear()
    FlakyFileSystem.opens.clear()
    yield FlakyFileSystem
    FlakyFileSystem.faults.clear()
    importlib.import_module("fsspec.registry")._registry.pop("flaky", None)  # registered for this test only


def test_transient_read_errors_are_retried(tmp_path, teachers, photo_writer, flaky):
    files = photo_writer(tmp_path / "src", ["chelsea", "coins", "rocket"])
    for p in files:  # every image fails twice, with two different transient errors
        flaky.faults[str(p)] = collections.deque(_transient_errors()[:2] if p.suffix == ".jpg" else _transient_errors()[1:])
    job = _job(tmp_path, files, uri=lambda p: f"flaky://{p}", read_retries=2)
    stats = label_shard(job, teachers)
    assert stats["written"] == 3 and stats["skipped"] == {}
    assert {Path(p).name: n for p, n in flaky.opens.items()} == {p.name: 3 for p in files}
    assert not any(flaky.faults.values())


def test_persistent_or_permanent_read_errors_fail_the_shard(tmp_path, teachers, photo_writer, flaky):
    files = photo_writer(tmp_path / "src", ["chelsea", "coins"])
    flaky.faults[str(files[1])] = collections.deque([ConnectionResetError(104, "Connection reset by peer")] * 5)
    job = _job(tmp_path, files, uri=lambda p: f"flaky://{p}", read_retries=2)
    with pytest.raises(SourceReadFailed, match=r"reading coins \(flaky://.*coins.png\) failed 3 times; last error "
                                               "ConnectionResetError"):
        label_shard(job, teachers)
    assert flaky.opens[str(files[1])] == 3
    # access denied is not transient: no retry, the shard fails at once
    flaky.faults[str(files[1])] = collections.deque([PermissionError(13, "Access Denied")])
    flaky.opens.clear()
    with pytest.raises(SourceReadFailed, match="source coins .* cannot be read: PermissionError"):
        label_shard(job, teachers)
    assert flaky.opens[str(files[1])] == 1
    assert not S.list_done_markers(str(tmp_path / "out"), "train") and not list(Path(job.url).parent.glob("*.tar"))
