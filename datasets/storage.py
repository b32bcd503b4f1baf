"""Object storage through fsspec, and atomic writes: the one I/O module every layer uses.

Local folders, ``file://``, ``s3://`` (s3fs) and anything else fsspec knows. All writes that others may
read are atomic: local targets get a temporary name beside them and an ``os.replace`` (after fsync);
object stores get one buffered upload that becomes visible only when complete (a multipart upload is
aborted on error). Readers therefore never see half a file.

Transient errors (timeouts, dropped connections, HTTP 429/5xx, S3 throttling) are recognised by
:func:`is_transient` and retried with backoff by :func:`retry_transient`; listings are read past fsspec's
cache with :func:`invalidate_cache` / :func:`exists_fresh`; :func:`abort_incomplete_uploads` cleans the
multipart uploads a killed writer left.

S3 endpoints and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...), never from configs, so nothing secret is written beside outputs.

It lives at the bottom (``datasets/``) because the shard format's writer and reader need it and
``datasets`` may not import ``pipeline`` (docs/ARCHITECTURE.md, "Import rules").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import random
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("polymae.storage")

CHUNK = 8 * 2**20  # bytes per read when hashing/copying
T = TypeVar("T")


def protocol(fs) -> str:
    """The primary protocol name of an fsspec filesystem (``"file"``, ``"s3"``, ...)."""
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def full_url(fs, path: str) -> str:
    """A path returned by ``fs.ls``/``fs.find`` as a URL that opens anywhere: local paths stay plain,
    others get their protocol back (``s3://bucket/key``)."""
    proto = protocol(fs)
    return path if proto in ("file", "local") else f"{proto}://{path}"


def is_local(url: str) -> bool:
    """True for local paths and ``file://`` URLs."""
    fs, _ = url_to_fs(url)
    return protocol(fs) in ("file", "local")


class CommitOnExit:
    """Context-manager protocol for writers that publish on ``close()`` and discard on ``abort()``:
    a clean ``with`` block commits, an exception aborts."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _tmp_name(path: str) -> str:
    d, b = posixpath.split(path)
    return posixpath.join(d, f".{b}.tmp-{uuid.uuid4().hex[:8]}")


class AtomicWriter(CommitOnExit):
    """File-like writer that publishes ``url`` only on a clean ``close()``.

    Local: writes ``.{name}.tmp-XXXX`` then ``os.replace``. Remote: fsspec's buffered upload, which an
    object store makes visible only once the (multipart) upload completes; on error the upload is
    aborted. Errors raised while flushing/uploading at close propagate to the caller.
    """

    def __init__(self, url: str, block_size: int = 64 * 2**20):
        self.url = url
        self.fs, self.path = url_to_fs(url)
        self.local = is_local(url)
        if self.local:
            self.fs.makedirs(posixpath.dirname(self.path) or ".", exist_ok=True)
            self.tmp = _tmp_name(self.path)
            self._fh = open(self.tmp, "wb")
        else:
            self.tmp = None
            self._fh = self.fs.open(self.path, "wb", block_size=block_size)
        self.bytes_written = 0
        self._closed = False

    def write(self, data: bytes) -> int:
        n = self._fh.write(data)
        self.bytes_written += len(data)
        return n

    def flush(self) -> None:
        self._fh.flush()

    def tell(self) -> int:
        return self.bytes_written

    def close(self) -> None:
        """Publish the file: fsync + rename (local) or complete the upload (remote).

        Raises:
            OSError (or the filesystem's error): the publish failed; the temporary file is then removed,
            or the multipart upload aborted, before the error propagates, and the target is unchanged.
        """
        if self._closed:
            return
        try:
            if self.local:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                os.replace(self.tmp, self.path)
            else:
                self._fh.close()  # completes the multipart upload; raises on failure
        except BaseException:
            self._discard()
            raise
        finally:
            self._closed = True

    def abort(self) -> None:
        """Discard everything written: remove the temporary file or abort the multipart upload (idempotent;
        a failure to abort is logged, not raised: :func:`abort_incomplete_uploads` cleans up later)."""
        if self._closed:
            return
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        """Remove the local temporary / abort the remote upload; never raises."""
        try:
            if self.local:
                with contextlib.suppress(OSError):
                    self._fh.close()
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.tmp)
                return
            discard = getattr(self._fh, "discard", None)
            if discard is not None:
                discard()  # s3fs: AbortMultipartUpload of the upload begun for this file
            else:  # pragma: no cover - filesystems without discard
                self._fh.close()
        except Exception as e:  # noqa: BLE001 - the caller is already handling a failure
            log.warning("could not discard the unfinished write of %s (%s: %s); an incomplete upload may remain "
                        "until the next run cleans it", self.url, type(e).__name__, e)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (see :class:`AtomicWriter`)."""
    with AtomicWriter(url) as w:
        w.write(data)


def get_fs(url: str):
    """``(filesystem, path)`` for a URL or local path."""
    return url_to_fs(url)


def join(base: str, *parts: str) -> str:
    """Join URL/path components with ``/`` (keeps ``s3://bucket`` intact)."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def exists(url: str) -> bool:
    """True when ``url`` exists (file or folder)."""
    fs, path = url_to_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    """Create a local folder and its parents (object stores need none)."""
    fs, path = url_to_fs(url)
    if is_local(url):
        fs.makedirs(path, exist_ok=True)


def read_bytes(url: str) -> bytes:
    """All bytes of the object at ``url``."""
    with fsspec.open(url, "rb") as fh:
        return fh.read()


def _chunks(url: str) -> Iterator[bytes]:
    """The object's bytes in ``CHUNK``-sized pieces."""
    with fsspec.open(url, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def sha256_of(url: str) -> tuple[str, int]:
    """``(hex sha256, size in bytes)`` of the object at ``url``, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    for chunk in _chunks(url):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def copy_atomic(src: str, dst: str) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` atomically, returning ``(sha256, size)`` of the bytes copied."""
    h = hashlib.sha256()
    size = 0
    with AtomicWriter(dst) as w:
        for chunk in _chunks(src):
            h.update(chunk)
            size += len(chunk)
            w.write(chunk)
    return h.hexdigest(), size


def list_files(url: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> Iterator[str]:
    """Full URLs of files under ``url`` (sorted), optionally filtered by lower-case suffix."""
    fs, path = url_to_fs(url)
    found = fs.find(path) if recursive else [p for p in fs.ls(path, detail=False)]
    for p in sorted(found):
        name = posixpath.basename(p)
        if name.startswith("."):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        yield full_url(fs, p)


def remove(url: str) -> None:
    """Delete ``url`` (recursively for folders) if it exists."""
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json_atomic(url: str, obj: Any) -> None:
    """Pretty, key-sorted JSON written atomically to ``url`` (any fsspec URL)."""
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    """Parsed JSON at ``url`` (any fsspec URL)."""
    with fsspec.open(url, "r") as fh:
        return json.load(fh)


# ------------------------------------------------------------------------- caches, uploads, transient errors
def invalidate_cache(url: str) -> None:
    """Forget fsspec's cached listings of ``url`` and its parents, so the next ``ls``/``exists`` asks the
    store. s3fs caches every listing for the life of the process, so another process's new files (a
    worker's shard and done marker) stay invisible to this one until the cache is dropped."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)


def exists_fresh(url: str) -> bool:
    """:func:`exists` after :func:`invalidate_cache`: what the store holds now, not a cached listing."""
    invalidate_cache(url)
    return exists(url)


def abort_incomplete_uploads(url: str) -> list[str]:
    """Abort the multipart uploads under the prefix ``url`` (S3 only; other stores have none and return
    ``[]``): what a process killed mid-upload leaves behind, invisible to readers but billed by the store.
    Call it only while no other writer uploads under ``url`` (the label job holds its output lease).

    Returns:
        the ``s3://bucket/key`` of every aborted upload.
    """
    fs, path = url_to_fs(url)
    if protocol(fs) not in ("s3", "s3a"):
        return []
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    aborted, kw = [], {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kw)
        for up in page.get("Uploads", []):
            fs.abort_mpu(bucket, up["Key"], up["UploadId"])
            aborted.append(f"s3://{bucket}/{up['Key']}")
        if not page.get("IsTruncated"):
            break
        kw.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
    if aborted:
        log.info("aborted %d incomplete upload(s) under %s (e.g. %s)", len(aborted), url, aborted[0])
    return aborted


TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_ERROR_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                                   "RequestLimitExceeded", "RequestTimeout", "RequestTimeoutException",
                                   "InternalError", "ServiceUnavailable", "ServiceUnavailableException"})
TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT,
                              errno.EPIPE, errno.EAGAIN, errno.EREMOTEIO, errno.ENETUNREACH, errno.EHOSTUNREACH})


def _transient_types() -> tuple[type, ...]:
    """Exception types of the HTTP stacks under fsspec that mean "try again" (those installed)."""
    types: list[type] = [TimeoutError, ConnectionError]  # ConnectionResetError, BrokenPipeError, socket.timeout
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        types += [be.HTTPClientError, be.ConnectionError, be.ResponseStreamingError, be.IncompleteReadError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    return tuple(types)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes/contexts (s3fs re-raises a botocore error as an ``OSError`` from it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True when a storage error is worth retrying: a timeout or dropped connection, an HTTP 408/429/5xx,
    an S3 throttling or internal error (``SlowDown``, ``InternalError``, ``ServiceUnavailable``, ...), in
    ``exc`` or any exception it was raised from. A missing file, a denied access or a bad request is not."""
    transient = _transient_types()
    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, transient):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in TRANSIENT_HTTP_STATUS or response.get("Error", {}).get("Code") in TRANSIENT_ERROR_CODES:
                return True
        status = getattr(e, "status", None)  # aiohttp ClientResponseError (http:// filesystems)
        if isinstance(status, int) and status in TRANSIENT_HTTP_STATUS:
            return True
    return False


def retry_transient(fn: Callable[[], T], attempts: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                    what: str = "", first_error: BaseException | None = None) -> T:
    """``fn()``, called again after a transient error (:func:`is_transient`) up to ``attempts`` calls in
    all, sleeping ``backoff_s * 2**(i - 1)`` seconds (at most ``max_backoff_s``, with 50-100 % jitter)
    before retry ``i``; each retry is logged with ``what``. ``first_error``: the error of a first call the
    caller already made (it counts as one of the ``attempts``).

    Raises:
        the first non-transient error at once, or the last transient one after ``attempts`` calls.
    """
    jitter = random.Random()
    error, calls = first_error, int(first_error is not None)
    while True:
        if error is not None:
            if calls >= attempts or not is_transient(error):
                raise error
            delay = min(max_backoff_s, backoff_s * 2 ** (calls - 1)) * jitter.uniform(0.5, 1.0)
            log.warning("%s: transient error %s: %s; retry %d of %d in %.2f s", what or "storage",
                        type(error).__name__, str(error)[:200], calls, attempts - 1, delay)
            time.sleep(delay)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - re-raised unless transient
            error, calls = e, calls + 1
