"""Atomic writes to any fsspec URL: the I/O primitive under the shard writer and every published file.

Local targets get a temporary name beside them and an ``os.replace`` (after fsync); object stores get
one buffered upload that becomes visible only when complete (a multipart upload is aborted on error).
Readers therefore never see half a file. It lives in ``datasets/`` because the shard format's writer
needs it and ``datasets`` may not import ``pipeline``; ``polymae.pipeline.storage`` re-exports it.
"""

from __future__ import annotations

import os
import posixpath
import uuid

from fsspec.core import url_to_fs


def is_local(url: str) -> bool:
    """True for local paths and ``file://`` URLs."""
    fs, _ = url_to_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


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
