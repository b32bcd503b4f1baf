"""Storage pieces of the label job's failure handling: which errors are transient, retries with backoff, a
failed local publish leaving nothing behind, ``storage_options`` reaching fsspec, and the config keys that
govern failures (each bad value names its key)."""

from __future__ import annotations

import errno
import os

import pytest

from polymae.datasets import storage
from polymae.patches import fsspec_defaults
from polymae.pipeline.config import ConfigError, load_config
from polymae.pipeline.label.config import LabelConfig

pytestmark = pytest.mark.unit


def _client_error(code: str, status: int):
    import botocore.exceptions

    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": code},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_transient_errors_are_told_from_permanent_ones():
    import aiohttp
    import botocore.exceptions
    from s3fs.errors import translate_boto_error

    transient = [_client_error("SlowDown", 503), _client_error("InternalError", 500),
                 translate_boto_error(_client_error("ServiceUnavailable", 503)),  # as s3fs raises it: OSError(EIO)
                 ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("read timed out"),
                 botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"),
                 botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"),
                 aiohttp.ServerDisconnectedError(), OSError(errno.ETIMEDOUT, "timed out")]
    permanent = [FileNotFoundError("gone"), PermissionError("denied"), IsADirectoryError("a folder"),
                 translate_boto_error(_client_error("AccessDenied", 403)), _client_error("NoSuchKey", 404),
                 ValueError("bad"), OSError(errno.ENOSPC, "disk full")]
    assert [storage.is_transient(e) for e in transient] == [True] * len(transient)
    assert [storage.is_transient(e) for e in permanent] == [False] * len(permanent)


def test_retry_transient_retries_then_gives_up():
    calls = []

    def flaky(n_failures, error):
        def fn():
            calls.append(1)
            if len(calls) <= n_failures:
                raise error
            return b"bytes"
        return fn

    assert storage.retry_transient(flaky(2, ConnectionResetError()), attempts=3, backoff_s=0.001) == b"bytes"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):
        storage.retry_transient(flaky(5, ConnectionResetError()), attempts=3, backoff_s=0.001)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: one call
        storage.retry_transient(flaky(5, FileNotFoundError("x")), attempts=3, backoff_s=0.001)
    assert len(calls) == 1
    calls.clear()  # a first call the caller made counts as one attempt
    assert storage.retry_transient(flaky(1, TimeoutError()), attempts=3, backoff_s=0.001,
                                   first_error=TimeoutError()) == b"bytes"
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(PermissionError):
        storage.retry_transient(flaky(0, None), attempts=3, first_error=PermissionError("denied"))
    assert calls == []


def test_a_failed_local_publish_leaves_nothing(tmp_path):
    target = tmp_path / "shard.tar"
    target.mkdir()  # os.replace of a file onto a folder fails
    writer = storage.AtomicWriter(str(target))
    writer.write(b"x" * 1000)
    with pytest.raises(OSError):
        writer.close()
    writer.abort()  # idempotent after the failed close
    assert os.listdir(tmp_path) == ["shard.tar"] and os.listdir(target) == []  # no temporary left


def test_storage_options_reach_every_filesystem_and_are_restored():
    with fsspec_defaults({"s3": {"endpoint_url": "http://minio.example:9000", "anon": True}}):
        fs, _ = storage.get_fs("s3://bucket/key")
        assert fs.anon is True and fs.client_kwargs.get("endpoint_url", fs.endpoint_url) == "http://minio.example:9000"
    fs, _ = storage.get_fs("s3://bucket/key")
    assert fs.anon is not True


@pytest.mark.parametrize("override, key", [
    ("max_skip_fraction=1.5", "max_skip_fraction"), ("read_retries=-1", "read_retries"),
    ("read_backoff_s=-1", "read_backoff_s"), ("placement_timeout_s=0", "placement_timeout_s"),
    ("lease_ttl_s=0", "lease_ttl_s"), ("shared_fs=maybe", "shared_fs"),
    ("storage_options={s3: {secret: abc}}", "storage_options.s3.secret"),
    ("storage_options={s3: {key: AKIA}}", "storage_options.s3.key"),
    ("storage_options={'s3-x': {}}", "storage_options.s3-x"),
    ("storage_options={s3: 1}", "storage_options.s3")])
def test_failure_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(LabelConfig, None, ["input=x", override], preflight=False)
    assert e.value.key == key


def test_failure_config_defaults():
    cfg = load_config(LabelConfig, None, ["input=x", "storage_options={s3: {endpoint_url: 'http://m:9000'}}"],
                      preflight=False)
    assert (cfg.max_skip_fraction, cfg.shard_retries, cfg.shared_fs) == (0.01, 2, False)
    assert cfg.placement_timeout_s > 0 and cfg.lease_ttl_s > 0 and cfg.read_retries > 0
    assert cfg.storage_options == {"s3": {"endpoint_url": "http://m:9000"}}
