"""Object storage through fsspec: local folders, ``file://``, ``s3://`` (s3fs) and anything else fsspec knows.

All writes that others may read are atomic: bytes go to a temporary name beside the target and are
renamed (local) or land as one completed upload (object stores, where a PUT/multipart upload is only
visible once complete). Readers therefore never see half a file.

S3 endpoints and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...), never from configs, so nothing secret is written beside outputs.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

from polymae.datasets.atomic import AtomicWriter, is_local, write_bytes_atomic  # noqa: F401 (re-exported)

CHUNK = 8 * 2**20  # bytes per read when hashing/copying


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
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    for p in sorted(found):
        name = posixpath.basename(p)
        if name.startswith("."):
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        yield p if proto in ("file", "local") else f"{proto}://{p}"


def remove(url: str) -> None:
    """Delete ``url`` (recursively for folders) if it exists."""
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
