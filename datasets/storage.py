"""Object storage through fsspec, and atomic writes: the one I/O module every layer uses.

Local folders, ``file://``, ``s3://`` (s3fs) and anything else fsspec knows. All writes that others may
read are atomic: local targets get a temporary name beside them and an ``os.replace`` (after fsync);
object stores get one buffered upload that becomes visible only when complete (a multipart upload is
aborted on error). Readers therefore never see half a file.

S3 endpoints and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...), never from configs, so nothing secret is written beside outputs.

It lives at the bottom (``datasets/``) because the shard format's writer and reader need it and
``datasets`` may not import ``pipeline`` (docs/ARCHITECTURE.md, "Import rules").
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

CHUNK = 8 * 2**20  # bytes per read when hashing/copying


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
        if self._closed:
            return
        self._closed = True
        if self.local:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.path)
        else:
            self._fh.close()  # completes the multipart upload; raises on failure

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.local:
            self._fh.close()
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass
        else:
            discard = getattr(self._fh, "discard", None)
            if discard is not None:
                discard()
            else:  # pragma: no cover - filesystems without discard
                self._fh.close()


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
