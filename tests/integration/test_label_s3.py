"""The label job on S3 (a local moto server) with more than one driver run: a failed upload is aborted, not
left half done; incomplete uploads under the output are cleaned on the next run; a second ``run_label`` in the
same process sees the shards the first one finished (fsspec's listing cache is invalidated); the workers get
the storage environment through Ray's runtime environment; a second driver refuses an output that a live run
holds the lease of.

Faults are injected through botocore's own event hooks on the client s3fs uses (a ``before-call`` handler that
raises the error a failed request raises), never by mocking the code under test."""

from __future__ import annotations

import json
import os
import socket

import pytest
import s3fs

from polymae.datasets import storage
from polymae.patches import fsspec_defaults
from polymae.datasets import shards as S
from polymae.pipeline.label.driver import LabelConfig, fresh_done_markers, run_label
from polymae.pipeline.label.lease import LeaseHeld, OutputLease

pytestmark = pytest.mark.integration

BUCKET = "polymae-label"


@pytest.fixture()
def s3(moto_s3):
    """The s3fs filesystem polymae's storage calls use (one instance per process), with the bucket made."""
    fs, _ = storage.get_fs(f"s3://{BUCKET}/x")
    fs.mkdir(BUCKET)
    return fs


def _uploads(fs, prefix: str = "") -> list[str]:
    return sorted(u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=prefix).get("Uploads", []))


def _start_upload(fs, key: str) -> str:
    """An upload begun with one 5 MiB part and never completed, as a killed writer leaves it."""
    up = fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=key)
    fs.call_s3("upload_part", Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 5 * 2**20)
    return up["UploadId"]


def test_failed_upload_is_aborted(s3):
    """A multipart upload whose completion fails is aborted, so nothing of it stays behind in the bucket."""
    import botocore.exceptions

    s3.connect()

    def fail_completion(**kw):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1 (injected)")

    s3.s3.meta.events.register("before-call.s3.CompleteMultipartUpload", fail_completion)
    try:
        writer = storage.AtomicWriter(f"s3://{BUCKET}/shards/train/train-000000.tar", block_size=5 * 2**20)
        writer.write(os.urandom(6 * 2**20))  # one part is uploaded while writing: a multipart upload is open
        assert _uploads(s3) == ["shards/train/train-000000.tar"]
        with pytest.raises(Exception, match="injected"):
            writer.close()
        writer.abort()  # what ShardTarWriter does next: nothing left to abort
    finally:
        s3.s3.meta.events.unregister("before-call.s3.CompleteMultipartUpload", fail_completion)
    assert _uploads(s3) == []
    assert not s3.exists(f"{BUCKET}/shards/train/train-000000.tar")


def test_two_runs_in_one_process_on_s3(s3, tmp_path, ray_local, photo_writer, monkeypatch):
    """The endpoint is given only as ``storage_options`` (no AWS_ENDPOINT_URL): it reaches the driver's calls and
    the workers (started before this test's S3 server existed) through their runtime environment. The re-run
    sees the finished shards, leaves stale uploads of other prefixes alone and cleans its own."""
    local = tmp_path / "photos"
    photo_writer(local, ["chelsea", "coins", "rocket"])
    for p in local.iterdir():
        s3.pipe(f"{BUCKET}/photos/{p.name}", p.read_bytes())
    _start_upload(s3, "shards/train/train-000000.tar")  # left by a killed run of this split
    _start_upload(s3, "other/train-000000.tar")  # another job's: not ours to touch
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = LabelConfig(input=f"s3://{BUCKET}/photos", output=f"s3://{BUCKET}/shards", samples_per_shard=2,
                      teacher_short_side=64, num_workers=1, progress=False, read_threads=2,
                      storage_options={"s3": {"endpoint_url": endpoint}})
    first = run_label(cfg)
    assert first["shards_labelled"] == 2 and first["written"] == 3
    assert _uploads(s3) == ["other/train-000000.tar"]
    manifest = json.loads(s3.cat_file(f"{BUCKET}/shards/train/manifest.json"))
    assert manifest["complete"] is True
    config = s3.cat_file(f"{BUCKET}/shards/train/config.yaml").decode()
    assert endpoint in config and "testing" not in config  # options saved, credentials never
    again = run_label(cfg)
    assert again["shards_labelled"] == 0 and again["shards_reused"] == 2 and again["written"] == 3
    assert not s3.exists(f"{BUCKET}/shards/train/.label-lease.json")  # released
    # another process removes shard 1 (e.g. to relabel it) while this process's listing cache still shows it
    with fsspec_defaults(cfg.storage_options):
        driver_fs, split = storage.get_fs(f"s3://{BUCKET}/shards/train")
        assert f"{split}/train-000001.stats.json" in driver_fs.ls(split)
        other = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint)
        other.rm([f"{split}/train-000001.stats.json", f"{split}/train-000001.tar"])
        assert 1 in S.list_done_markers(cfg.output, "train")  # the cached listing is stale
        assert set(fresh_done_markers(cfg.output, "train")) == {0}
    third = run_label(cfg)  # looks past the cache: shard 1 is pending again
    assert third["shards_labelled"] == 1 and third["shards_reused"] == 1 and third["written"] == 3
    assert json.loads(s3.cat_file(f"{BUCKET}/shards/train/manifest.json"))["complete"] is True


def test_second_driver_refuses_a_leased_output(s3, tmp_path, photo_writer):
    """While another run holds a fresh lease on the split (same host, live process), run_label refuses before
    any work; once it is released, the output is free again."""
    photo_writer(tmp_path / "photos", ["coins"])
    split = f"s3://{BUCKET}/shards/train"
    holder = OutputLease(split, ttl_s=60).acquire()
    try:
        with pytest.raises(LeaseHeld) as refused:
            run_label(LabelConfig(input=str(tmp_path / "photos"), output=f"s3://{BUCKET}/shards", progress=False))
        assert f"@{socket.gethostname()} pid {os.getpid()}" in str(refused.value)
        assert not s3.exists(f"{BUCKET}/shards/train/plan.parquet")  # refused before planning
        lease = json.loads(s3.cat_file(f"{BUCKET}/shards/train/.label-lease.json"))
        assert lease["token"] == holder.token and lease["owner"] and "AWS" not in json.dumps(lease)
    finally:
        holder.release()
    assert not s3.exists(f"{BUCKET}/shards/train/.label-lease.json")
    OutputLease(split, ttl_s=60).acquire().release()  # free again
