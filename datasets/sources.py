"""Source readers for the label job: list a collection of images as ``(key, uri, cls)`` and read bytes.

A source is any of (``open_source(url, kind="auto")`` decides from the URL):

* ``imagefolder`` – ImageNet-style ``root/<class>/.../<image>``: ``cls`` is the index of the class
  folder in the sorted list of class folders (recorded as :attr:`Source.classes`);
* ``folder``      – images anywhere below ``root`` (no classes);
* ``list``        – a ``.txt`` file with one URI per line (relative URIs are resolved against the
  file's folder; blank lines and ``#`` comments are ignored);
* ``parquet``     – a ``.parquet`` file with a ``uri`` column and optional ``key`` and ``cls`` columns;
* ``tars``        – existing WebDataset shards: one ``.tar``, a brace pattern
  (``shards-{000000..000009}.tar``) or a folder holding only ``.tar`` files. Sample keys are the
  shards' ``__key__`` values and the image member's bytes are read unchanged (JPEG stays JPEG).

Every URL is an fsspec URL (local path, ``file://``, ``s3://``, ``memory://``, ...).

Keys are *stable*: they are derived from the path relative to the source root (or the tar's
``__key__``), never from a running counter, so a re-run maps each image to the same key. They contain
no ``.`` or ``/`` (WebDataset splits a member name at the first dot of its basename): the extension is
dropped, ``/`` becomes ``__`` and any other character outside ``[\\w-]`` becomes ``_``, e.g.
``n01440764/n01440764_10026.JPEG`` → ``n01440764__n01440764_10026``. Two inputs that map to one key
raise :class:`SourceError` naming both.

Tar members are addressed as ``{tar_url}#offset={byte offset}&size={bytes}&member={name}`` so they can
be read back with one ranged read, without scanning the tar again.

Decoding (:func:`decode_image`) turns a source file's bytes into 8-bit RGB or a :class:`BadImage` whose
``reason`` (:data:`SKIP_REASONS`) the label job counts: bit depths above 8 are scaled by the bit depth, float
images are read as ``[0, 1]``, HEIF/HEIC and float TIFFs decode through pillow-heif / tifffile where installed
(the ``formats`` extra) and are otherwise ``unsupported``; images under ``min_side`` pixels or more elongated
than ``max_aspect`` are ``too_small`` / ``too_elongated``.

Tars are listed without downloading them (:func:`list_tars`): from a DALI ``wds2idx`` index beside the tar
(``shards-000001.idx``, checked against the tar) where there is one, else from the tar headers, read with
seeks over the member data (a few ranged reads of :data:`TAR_LIST_READAHEAD` bytes per sample on an object
store). ``Source.extra["tar_listing"]`` records what listing cost (bytes and reads).
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple
from urllib.parse import parse_qs, quote, unquote

import fsspec
import numpy as np
from fsspec.core import url_to_fs
from PIL import Image, ImageOps, UnidentifiedImageError

from polymae.datasets.storage import full_url, protocol

log = logging.getLogger("polymae.sources")

# Listed as images; one without a decoder here (e.g. HEIC without pillow-heif) becomes a counted
# ``unsupported`` skip when it is labelled (:func:`decode_image`), never a silently dropped file.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jxl")
# Preference order of the image member in a WebDataset sample (the first present wins).
TAR_IMAGE_EXTS = ("jpg", "jpeg", "rgb.jpg", "png", "webp", "jfif", "bmp", "tif", "tiff", "ppm", "heic", "heif",
                  "avif", "jp2", "jxl", "image")
TAR_CLS_EXTS = ("cls", "cls.txt", "class", "label")
SOURCE_KINDS = ("auto", "imagefolder", "folder", "list", "parquet", "tars")
_BAD_KEY_CHARS = re.compile(r"[^\w\-]")


class SourceError(ValueError):
    """A source that cannot be listed: missing, empty, ambiguous, or with colliding keys."""


class SourceEntry(NamedTuple):
    """One input image: ``key`` (stable, no ``.``/``/``), ``uri`` (readable by :func:`read_uri`),
    ``cls`` (class index or ``None``)."""

    key: str
    uri: str
    cls: int | None


@dataclass
class Source:
    """A listed source: its ``url``, resolved ``kind``, ``entries`` sorted by key, and ``classes``
    (class names indexed by ``cls``; ``None`` when the source has none)."""

    url: str
    kind: str
    entries: list[SourceEntry]
    classes: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SourceEntry]:
        return iter(self.entries)

    def describe(self) -> dict:
        """JSON-able summary: url, kind, number of entries, classes."""
        return {"url": self.url, "kind": self.kind, "num_entries": len(self.entries),
                "num_classes": len(self.classes) if self.classes is not None else None}


# ------------------------------------------------------------------------------------------- keys
def make_key(relpath: str) -> str:
    """Stable sample key from a path relative to the source root.

    The extension of the basename is dropped, ``/`` (and ``\\``) become ``__``, every other character
    outside ``[\\w-]`` (dots, spaces, ...) becomes ``_``.

    Raises:
        SourceError: the path yields an empty key.
    """
    rel = relpath.replace("\\", "/").strip("/")
    head, base = posixpath.split(rel)
    stem, ext = posixpath.splitext(base)
    if stem and ext:
        base = stem
    parts = [p for p in (head.split("/") if head else []) + [base] if p not in ("", ".")]
    key = "__".join(_BAD_KEY_CHARS.sub("_", p) for p in parts)
    if not key:
        raise SourceError(f"cannot derive a sample key from {relpath!r}")
    return key


def sanitise_key(key: str) -> str:
    """A WebDataset ``__key__`` (may hold ``/``) made safe: ``/`` → ``__``, ``.`` etc. → ``_``."""
    parts = [p for p in key.replace("\\", "/").split("/") if p]
    out = "__".join(_BAD_KEY_CHARS.sub("_", p) for p in parts)
    if not out:
        raise SourceError(f"empty sample key {key!r}")
    return out


def _check_unique(entries: Iterable[SourceEntry], url: str) -> list[SourceEntry]:
    seen: dict[str, str] = {}
    out = []
    for e in entries:
        if e.key in seen:
            raise SourceError(
                f"two inputs of {url} map to the same sample key {e.key!r}: {seen[e.key]} and {e.uri}. "
                "Keys drop the extension and replace '.', '/' and other characters; rename one of them, "
                "or list the images in a .parquet with an explicit 'key' column.")
        seen[e.key] = e.uri
        out.append(e)
    out.sort(key=lambda e: e.key)
    return out


# ------------------------------------------------------------------------------------------ urls
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return path.lstrip("/")


# --------------------------------------------------------------------------------------- readers
def _list_dir(url: str) -> tuple[object, str, list[str]]:
    fs, root = url_to_fs(url)
    if not fs.isdir(root):
        raise SourceError(f"source folder {url} does not exist")
    files = sorted(p for p in fs.find(root) if not any(
        part.startswith(".") for part in _relative(p, root).split("/")))
    return fs, root.rstrip("/"), files


def _folder_entries(url: str, fs, root: str, files: list[str]) -> list[SourceEntry]:
    return [SourceEntry(make_key(_relative(p, root)), full_url(fs, p), None) for p in files if _is_image(p)]


def _imagefolder(url: str, fs, root: str, files: list[str]) -> Source:
    images = [p for p in files if _is_image(p)]
    classes = sorted({_relative(p, root).split("/", 1)[0] for p in images if "/" in _relative(p, root)})
    # a class folder without images is still a class (torchvision ImageFolder counts every sub-folder)
    for p in fs.ls(root, detail=True):
        name = posixpath.basename(p["name"].rstrip("/"))
        if p["type"] == "directory" and not name.startswith(".") and name not in classes:
            classes.append(name)
    classes.sort()
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for p in images:
        rel = _relative(p, root)
        if "/" not in rel:
            raise SourceError(f"imagefolder source {url} has an image outside a class folder: {rel}")
        entries.append(SourceEntry(make_key(rel), full_url(fs, p), index[rel.split("/", 1)[0]]))
    return Source(url, "imagefolder", _check_unique(entries, url), classes)


def _resolve(uri: str, base_fs, base_dir: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return full_url(base_fs, posixpath.normpath(posixpath.join(base_dir, uri)))


def _key_for_uri(uri: str, base_dir: str) -> str:
    _, path = url_to_fs(uri.split("#", 1)[0])
    return make_key(_relative(path, base_dir))


def _list_file(url: str) -> Source:
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise SourceError(f"list file {url} does not exist")
    base_dir = posixpath.dirname(path)
    with fs.open(path, "r") as fh:
        lines = [ln.strip() for ln in fh.read().splitlines()]
    uris = [_resolve(ln, fs, base_dir) for ln in lines if ln and not ln.startswith("#")]
    entries = [SourceEntry(_key_for_uri(u, base_dir), u, None) for u in uris]
    return Source(url, "list", _check_unique(entries, url))


def _parquet(url: str) -> Source:
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise SourceError(f"parquet source {url} does not exist")
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    cols = set(table.column_names)
    if "uri" not in cols:
        raise SourceError(f"parquet source {url} has no 'uri' column (columns: {sorted(cols)})")
    base_dir = posixpath.dirname(path)
    uris = [_resolve(str(u), fs, base_dir) for u in table.column("uri").to_pylist()]
    keys = ([sanitise_key(str(k)) for k in table.column("key").to_pylist()] if "key" in cols
            else [_key_for_uri(u, base_dir) for u in uris])
    clss = ([None if c is None else int(c) for c in table.column("cls").to_pylist()] if "cls" in cols
            else [None] * len(uris))
    classes = None
    meta = table.schema.metadata or {}
    if b"classes" in meta:
        import json

        classes = json.loads(meta[b"classes"])
    entries = [SourceEntry(k, u, c) for k, u, c in zip(keys, uris, clss)]
    return Source(url, "parquet", _check_unique(entries, url), classes)


def tar_member_uri(tar_url: str, offset: int, size: int, member: str) -> str:
    """URI of one member's bytes inside a tar: ``{tar_url}#offset=..&size=..&member=..``."""
    return f"{tar_url}#offset={offset}&size={size}&member={quote(member, safe='')}"


def _split_wds_name(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: key = dir + basename up to its first dot; ext = the rest."""
    d, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (posixpath.join(d, stem) if d else stem), ext


# ----------------------------------------------------------------------------------- tar listing
TAR_LIST_READAHEAD = 4096
"""Bytes fetched per read while listing a tar's headers: a 512-byte header and what follows it, so the small
members of a WebDataset sample (``cls``, ``json``) usually come with their neighbours' headers in one request."""
TAR_LIST_THREADS = 16  # tars listed at the same time (each listing is a chain of small ranged reads)
DALI_INDEX_VERSION = "v1.2"


class TarMember(NamedTuple):
    """One regular file of a tar: ``name`` (as stored), ``offset`` (byte offset of its data in the tar),
    ``size`` (bytes)."""

    name: str
    offset: int
    size: int


@dataclass
class TarListing:
    """The members of one tar and what listing them cost.

    ``members``: regular files in tar order; ``small``: ``{member name: bytes}`` of the class members
    (:data:`TAR_CLS_EXTS`), read on the way; ``tar_bytes``: the tar's size; ``bytes_read``: bytes fetched from
    storage to list it (headers, read-ahead, class members, the index); ``requests``: reads issued (ranged GETs
    on an object store); ``index``: URL of the index file used, or None when the headers were read.
    """

    url: str
    members: list[TarMember]
    small: dict[str, bytes]
    tar_bytes: int
    bytes_read: int
    requests: int
    index: str | None = None


class _CountingRaw(io.RawIOBase):
    """Unbuffered reader over an open file (an OS file, or an fsspec file without a cache): every ``readinto``
    is one read from storage (one ranged GET on an object store); counts them (``requests``) and their bytes
    (``bytes_read``)."""

    def __init__(self, fh):
        super().__init__()
        self._fh = fh
        self.bytes_read = 0
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buf) -> int:
        data = self._fh.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.bytes_read += n
        self.requests += 1
        return n

    def close(self) -> None:
        try:
            self._fh.close()
        finally:
            super().close()


def _open_counted(tar_url: str) -> tuple[_CountingRaw, io.BufferedReader, int]:
    """``(raw, buffered reader, tar size)`` for reading a tar with seeks: local files unbuffered by the OS layer,
    object-store files without fsspec's read-ahead cache (its default block would fetch megabytes per header), both
    behind a :data:`TAR_LIST_READAHEAD`-byte buffer.

    Raises:
        SourceError: the tar does not exist.
    """
    fs, path = url_to_fs(tar_url)
    try:
        if protocol(fs) in ("file", "local"):
            fh = open(path, "rb", buffering=0)
        else:
            fh = fs.open(path, "rb", cache_type="none")
    except FileNotFoundError as e:
        raise SourceError(f"tar shard {tar_url} does not exist") from e
    size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    raw = _CountingRaw(fh)
    return raw, io.BufferedReader(raw, buffer_size=TAR_LIST_READAHEAD), size


def _is_cls_member(name: str) -> bool:
    return _split_wds_name(name)[1].lower() in TAR_CLS_EXTS


def list_tar_members(tar_url: str) -> TarListing:
    """List a tar from its headers, seeking over member data (never downloading it): tarfile's header parsing
    (ustar, GNU long names, pax) over a file that fetches :data:`TAR_LIST_READAHEAD` bytes per header, i.e. one
    small ranged read per header on an object store. Class members' bytes are read on the way (``small``).

    Returns:
        :class:`TarListing` (``index`` None).
    Raises:
        SourceError: the tar is missing or not a readable (uncompressed) tar.
    """
    raw, buf, size = _open_counted(tar_url)
    members: list[TarMember] = []
    small: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=buf, mode="r:") as tf:  # seekable: tarfile seeks over member data
            for m in tf:
                if not m.isfile() or m.issparse():
                    continue
                members.append(TarMember(m.name, m.offset_data, m.size))
                if _is_cls_member(m.name):
                    small[m.name] = tf.extractfile(m).read()
    except tarfile.TarError as e:
        raise SourceError(f"tar shard {tar_url} cannot be listed (not an uncompressed tar, or truncated): {e}") from e
    finally:
        buf.close()
    return TarListing(tar_url, members, small, size, raw.bytes_read, raw.requests)


def tar_index_url(tar_url: str) -> str:
    """The index file DALI's ``wds2idx`` writes beside a tar: ``shards-000001.tar`` → ``shards-000001.idx``."""
    return (tar_url[:-4] if tar_url.lower().endswith(".tar") else tar_url) + ".idx"


def _parse_dali_index(text: str) -> list[TarMember]:
    """Members of a DALI ``v1.2`` index (``v1.2 <samples>``, then per sample ``ext offset size name ...``; the
    offsets are those of the member data).

    Raises:
        ValueError: another version, a malformed line, or a sample count that does not match.
    """
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION:
        raise ValueError(f"expected a '{DALI_INDEX_VERSION} <samples>' first line, got {lines[:1]}")
    rows = [ln.split() for ln in lines[1:] if ln.strip()]
    if len(rows) != int(head[1]):
        raise ValueError(f"the header says {head[1]} samples, the index has {len(rows)}")
    members = []
    for row in rows:
        if not row or len(row) % 4:
            raise ValueError(f"malformed sample line {' '.join(row)[:200]!r}")
        for i in range(0, len(row), 4):
            members.append(TarMember(row[i + 3], int(row[i + 1]), int(row[i + 2])))
    return members


def _check_index(fs, path: str, members: list[TarMember], tar_bytes: int) -> None:
    """Check an index against its tar: offsets on 512-byte blocks inside the tar, and the last member's header
    (read with one 512-byte ranged read) naming the same size (and name, where it fits a plain header).

    Raises:
        ValueError: the index does not describe this tar (stale or for another file).
    """
    if not members:
        raise ValueError("the index lists no members")
    for m in members:
        if m.offset < 512 or m.offset % 512 or m.offset + m.size > tar_bytes:
            raise ValueError(f"member {m.name} at {m.offset}+{m.size} does not fit a {tar_bytes}-byte tar")
    last = members[-1]
    try:
        info = tarfile.TarInfo.frombuf(fs.cat_file(path, start=last.offset - 512, end=last.offset), "utf-8",
                                       "surrogateescape")
    except tarfile.HeaderError as e:
        raise ValueError(f"no tar header before offset {last.offset} ({e})") from e
    plain_name = len(last.name.encode()) <= 100 and last.name.isascii()
    if info.size != last.size or (plain_name and info.name != last.name):
        raise ValueError(f"the tar's header before offset {last.offset} is {info.name} ({info.size} bytes), the "
                         f"index says {last.name} ({last.size} bytes)")


def list_tar_index(tar_url: str, index_url: str) -> TarListing:
    """List a tar from a DALI ``wds2idx`` index (``v1.2``) instead of its headers: one read of the index, one
    512-byte check of the tar (see :func:`_check_index`) and one ranged read per class member (concurrent on
    object stores, ``fs.cat_ranges``).

    Returns:
        :class:`TarListing` with ``index`` set.
    Raises:
        SourceError: the tar is missing. ValueError: the index is malformed or does not match the tar.
        OSError: the index or a class member cannot be read.
    """
    fs, path = url_to_fs(tar_url)
    try:
        tar_bytes = int(fs.size(path))
    except FileNotFoundError as e:
        raise SourceError(f"tar shard {tar_url} does not exist") from e
    with fsspec.open(index_url, "rb") as fh:
        raw = fh.read()
    members = _parse_dali_index(raw.decode("utf-8"))
    _check_index(fs, path, members, tar_bytes)
    cls_members = [m for m in members if _is_cls_member(m.name)]
    datas = fs.cat_ranges([path] * len(cls_members), [m.offset for m in cls_members],
                          [m.offset + m.size for m in cls_members]) if cls_members else []
    small = {}
    for m, data in zip(cls_members, datas):
        if isinstance(data, BaseException):
            raise data
        small[m.name] = data
    return TarListing(tar_url, members, small, tar_bytes, len(raw) + 512 + sum(len(d) for d in small.values()),
                      2 + len(cls_members), index_url)


def _list_one_tar(tar_url: str, index_url: str | None) -> TarListing:
    """:func:`list_tar_index` where an index exists and matches the tar, else :func:`list_tar_members` (a stale
    or malformed index is logged and ignored)."""
    if index_url is not None:
        try:
            return list_tar_index(tar_url, index_url)
        except (ValueError, OSError) as e:
            if isinstance(e, SourceError):
                raise
            log.warning("ignoring the index %s of %s (reading the tar's headers instead): %s", index_url, tar_url, e)
    return list_tar_members(tar_url)


def _tar_entries(listing: TarListing) -> tuple[list[SourceEntry], list[str]]:
    """Sample entries of one listed WebDataset tar: members grouped by key (up to the first dot of the base
    name), the image member chosen by :data:`TAR_IMAGE_EXTS` preference, the class from a class member; and the
    keys of the samples without an image member (not listed)."""
    samples: dict[str, dict] = {}
    order: list[str] = []
    for m in listing.members:
        raw_key, ext = _split_wds_name(m.name)
        s = samples.get(raw_key)
        if s is None:
            s = samples[raw_key] = {}
            order.append(raw_key)
        lext = ext.lower()
        if lext in TAR_CLS_EXTS:
            try:
                s["cls"] = int(listing.small[m.name].decode().strip())
            except (ValueError, UnicodeDecodeError):
                pass
        elif lext in TAR_IMAGE_EXTS:
            s.setdefault("images", {})[lext] = m
    entries, no_image = [], []
    for raw_key in order:
        s = samples[raw_key]
        imgs = s.get("images")
        if not imgs:
            no_image.append(raw_key)
            continue
        m = imgs[next(e for e in TAR_IMAGE_EXTS if e in imgs)]
        entries.append(SourceEntry(sanitise_key(raw_key), tar_member_uri(listing.url, m.offset, m.size, m.name),
                                   s.get("cls")))
    return entries, no_image


def _index_files(urls: list[str]) -> dict[str, str]:
    """``{tar url: index url}`` for the tars with a DALI index beside them (one listing per folder)."""
    by_dir: dict[str, set[str]] = {}
    out = {}
    for u in urls:
        fs, path = url_to_fs(u)
        d = posixpath.dirname(path)
        if d not in by_dir:
            try:
                by_dir[d] = {posixpath.basename(p) for p in fs.ls(d, detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                by_dir[d] = set()
        idx = tar_index_url(u)
        if posixpath.basename(url_to_fs(idx)[1]) in by_dir[d]:
            out[u] = idx
    return out


def list_tars(urls: list[str], use_index: bool = True) -> list[TarListing]:
    """List tars (in the given order) without downloading them: from a DALI index beside a tar where there is
    one (``use_index``), else from its headers (:func:`list_tar_members`); :data:`TAR_LIST_THREADS` at a time.

    Raises:
        SourceError: a tar is missing or unreadable.
    """
    from concurrent.futures import ThreadPoolExecutor

    indexes = _index_files(urls) if use_index else {}
    if len(urls) <= 1:
        return [_list_one_tar(u, indexes.get(u)) for u in urls]
    with ThreadPoolExecutor(max_workers=min(TAR_LIST_THREADS, len(urls))) as ex:
        return list(ex.map(lambda u: _list_one_tar(u, indexes.get(u)), urls))


def _tars(url: str) -> Source:
    import braceexpand

    if "{" in url:
        urls = list(braceexpand.braceexpand(url))
    else:
        fs, path = url_to_fs(url)
        if fs.isdir(path):
            urls = [full_url(fs, p) for p in sorted(fs.find(path)) if p.endswith(".tar")
                    and not posixpath.basename(p).startswith(".")]
        else:
            urls = [url]
    if not urls:
        raise SourceError(f"no .tar shards at {url}")
    listings = list_tars(urls)
    entries: list[SourceEntry] = []
    no_image: list[str] = []
    for listing in listings:
        found, missing = _tar_entries(listing)
        entries += found
        no_image += [f"{listing.url}:{k}" for k in missing]
    cost = {"tars": len(listings), "tar_bytes": sum(t.tar_bytes for t in listings),
            "bytes_read": sum(t.bytes_read for t in listings), "requests": sum(t.requests for t in listings),
            "indexed": sum(t.index is not None for t in listings), "samples_without_image": len(no_image)}
    if no_image:
        log.warning("%d sample(s) of %s have no image member (%s) and are not listed, e.g. %s", len(no_image), url,
                    ", ".join(TAR_IMAGE_EXTS), ", ".join(no_image[:3]))
    log.info("listed %d tar(s) of %.1f MB by reading %.1f kB in %d reads (%d from an index)", cost["tars"],
             cost["tar_bytes"] / 1e6, cost["bytes_read"] / 1e3, cost["requests"], cost["indexed"])
    return Source(url, "tars", _check_unique(entries, url), extra={"tars": urls, "tar_listing": cost})


def detect_kind(url: str) -> str:
    """Source kind from the URL: ``.txt`` → list, ``.parquet`` → parquet, ``.tar``/brace pattern/folder of
    tars → tars; a folder with image files at its top level → folder; a folder whose images all lie in
    sub-folders → imagefolder.

    Raises:
        SourceError: the URL does not exist or holds no images.
    """
    low = url.lower().rstrip("/")
    if low.endswith(".txt"):
        return "list"
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(".tar") or "{" in url:
        return "tars"
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise SourceError(f"source {url} does not exist")
    if not fs.isdir(path):
        raise SourceError(f"source {url} is a file but not a .txt/.parquet/.tar")
    files = [p for p in fs.find(path) if not posixpath.basename(p).startswith(".")]
    images = [p for p in files if _is_image(p)]
    if not images:
        if any(p.endswith(".tar") for p in files):
            return "tars"
        raise SourceError(f"source folder {url} holds no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards")
    if any("/" not in _relative(p, path) for p in images):
        return "folder"
    return "imagefolder"


def open_source(url: str, kind: str = "auto") -> Source:
    """List a source (see the module docstring for the kinds).

    Args:
        url: local path or fsspec URL.
        kind: one of :data:`SOURCE_KINDS`; ``auto`` uses :func:`detect_kind`.
    Returns:
        :class:`Source` with entries sorted by key.
    Raises:
        SourceError: missing/empty source, an unknown kind, or two inputs mapping to one key.
    """
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {SOURCE_KINDS}")
    if kind == "auto":
        kind = detect_kind(url)
    if kind == "list":
        src = _list_file(url)
    elif kind == "parquet":
        src = _parquet(url)
    elif kind == "tars":
        src = _tars(url)
    else:
        fs, root, files = _list_dir(url)
        if kind == "imagefolder":
            src = _imagefolder(url, fs, root, files)
        else:
            src = Source(url, "folder", _check_unique(_folder_entries(url, fs, root, files), url))
    if not src.entries:
        raise SourceError(f"source {url} ({kind}) lists no images")
    return src


def read_uri(uri: str) -> bytes:
    """Bytes of one entry: a whole file, or a tar member addressed by :func:`tar_member_uri`.

    Raises:
        FileNotFoundError: the file or tar is gone. OSError: other read errors.
    """
    if "#offset=" in uri:
        base, frag = uri.rsplit("#", 1)
        q = parse_qs(frag)
        off, size = int(q["offset"][0]), int(q["size"][0])
        fs, path = url_to_fs(base)
        if size == 0:
            if not fs.exists(path):
                raise FileNotFoundError(base)
            return b""
        return fs.cat_file(path, start=off, end=off + size)
    with fsspec.open(uri, "rb") as fh:
        return fh.read()


def member_name(uri: str) -> str | None:
    """The tar member name of a tar-member URI, else ``None``."""
    if "#offset=" not in uri:
        return None
    return unquote(parse_qs(uri.rsplit("#", 1)[1])["member"][0])


def iter_bytes(uris: list[str], threads: int = 8) -> Iterator[tuple[str, bytes | BaseException]]:
    """``(uri, bytes)`` in the order of ``uris``, read by ``threads`` threads ahead of the consumer; a read
    error is yielded in place of the bytes (never raised), so one missing file does not stop a shard."""
    from concurrent.futures import ThreadPoolExecutor

    def _read(u: str):
        try:
            return read_uri(u)
        except Exception as e:  # noqa: BLE001 - handed to the caller as a value
            return e

    if threads <= 1:
        for u in uris:
            yield u, _read(u)
        return
    with ThreadPoolExecutor(max_workers=threads) as ex:
        window = threads * 2
        futs = [ex.submit(_read, u) for u in uris[:window]]
        nxt = len(futs)
        for i, u in enumerate(uris):
            res = futs[i].result()
            futs[i] = None  # free the bytes
            if nxt < len(uris):
                futs.append(ex.submit(_read, uris[nxt]))
                nxt += 1
            yield u, res


# -------------------------------------------------------------------------------------- decoding
SKIP_REASONS = ("empty", "undecodable", "unsupported", "too_large", "too_small", "too_elongated")
"""Reasons an image is skipped for a problem of its own (never a storage or teacher failure)."""
MIN_SIDE = 32  # the label job's default ``min_side`` (pixels)
MAX_ASPECT = 4.0  # the label job's default ``max_aspect`` (long side / short side)
FLOAT_RANGE_TOLERANCE = 1e-3  # float pixels may overshoot [0, 1] by this much (rounding) before being refused
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_FORMAT_HELP = {
    "heif": "a HEIF/HEIC image: install pillow-heif (pip install 'polymae[formats]') to decode it",
    "avif": "an AVIF image: this Pillow has no AVIF codec (Pillow >= 11.3 wheels have one: "
            "pip install 'polymae[formats]')",
    "tiff": "a TIFF with a pixel layout Pillow cannot read (float or multi-sample): install tifffile "
            "(pip install 'polymae[formats]') to decode it",
    "jpeg2000": "a JPEG 2000 image: this Pillow has no OpenJPEG codec",
    "jxl": "a JPEG XL image, which Pillow cannot decode",
}


class BadImage(ValueError):
    """An input that cannot become an RGB image for a problem of its own (the label job counts it as a
    skip, by ``reason``): ``reason`` is one of :data:`SKIP_REASONS`; the message gives the detail."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class DecodedImage(NamedTuple):
    """A decoded input: ``rgb`` uint8 ``[H, W, 3]`` (EXIF orientation applied), ``format`` (Pillow's name of
    the container, e.g. ``JPEG``, ``PNG``, ``HEIF``, ``TIFF``) and ``plain_jpeg`` (the source bytes are a
    JPEG that decodes to exactly ``rgb``: RGB or grayscale, no rotation, so they can be stored unchanged)."""

    rgb: np.ndarray
    format: str
    plain_jpeg: bool


def sniff_format(data: bytes) -> str | None:
    """The container of image bytes Pillow may lack a codec for, from their first bytes: ``heif``, ``avif``
    (ISO-BMFF ``ftyp`` brands), ``tiff``, ``jpeg2000``, ``jxl``; ``None`` for anything else."""
    if data[4:8] == b"ftyp":
        size = int.from_bytes(data[:4], "big")
        box = data[8:min(max(size, 16), 64)]
        brands = {box[i:i + 4] for i in range(0, len(box) - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
        return "jpeg2000"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "jxl"
    return None


def _check_size(width: int, height: int, max_pixels: int, min_side: int, max_aspect: float | None) -> None:
    """Raise :class:`BadImage` (``too_large``/``too_small``/``too_elongated``) for an image of
    ``width x height`` pixels outside the limits."""
    if width * height > max_pixels:
        raise BadImage("too_large", f"{width}x{height} > {max_pixels} pixels")
    if min(width, height) < min_side:
        raise BadImage("too_small", f"{width}x{height}: a side is under min_side={min_side} pixels")
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise BadImage("too_elongated", f"{width}x{height}: aspect ratio "
                                        f"{max(width, height) / min(width, height):.2f} > max_aspect={max_aspect:g}")


def _unit_float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 pixels from float ones in ``[0, 1]`` (the convention of float images).

    Raises:
        BadImage: ``undecodable`` for NaN/inf pixels, ``unsupported`` for values outside ``[0, 1]`` (beyond
        :data:`FLOAT_RANGE_TOLERANCE`): there is no bit depth to scale them by, and clipping would whiten them.
    """
    arr = np.asarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise BadImage("undecodable", "float image with NaN/inf pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -FLOAT_RANGE_TOLERANCE or hi > 1.0 + FLOAT_RANGE_TOLERANCE:
        raise BadImage("unsupported", f"float image with values in [{lo:.4g}, {hi:.4g}]; float images must "
                                      "be in [0, 1]")
    return np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _int_to_uint8(arr: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """uint8 pixels from integer ones of ``bits`` bits per sample, scaled by the bit depth (``2**bits - 1``,
    or ``2**(bits-1) - 1`` for signed samples, whose negatives become 0), never by the image's maximum."""
    top = float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
    return np.clip(np.asarray(arr, dtype=np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _bits_per_sample(img: Image.Image) -> tuple[int, bool]:
    """``(bits per sample, signed)`` of a Pillow ``I`` image: a TIFF's BitsPerSample/SampleFormat tags;
    16 otherwise (Pillow opens 16-bit PNG/PPM/PGM as ``I``, PPM scaled to 65535)."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return 16, False
    bits = tags.get(258, 16)
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    fmt = tags.get(339, 1)
    return bits, int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2


def _to_8bit(img: Image.Image) -> Image.Image:
    """A Pillow image of more than 8 bits per sample as 8-bit ``L``, scaled by its bit depth (16-bit:
    ``v / 65535``) or, for float (``F``), from ``[0, 1]``; other modes unchanged."""
    if img.mode.startswith("I;16"):
        return Image.fromarray(_int_to_uint8(np.array(img), 16), "L")
    if img.mode == "I":
        bits, signed = _bits_per_sample(img)
        return Image.fromarray(_int_to_uint8(np.array(img), bits, signed), "L")
    if img.mode == "F":
        return Image.fromarray(_unit_float_to_uint8(np.array(img)), "L")
    return img


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of a loaded Pillow image: EXIF orientation applied, high bit depths scaled
    (:func:`_to_8bit`), alpha composited on white, every other mode converted by Pillow.

    Raises:
        BadImage: ``unsupported`` for a mode Pillow cannot convert to RGB; ``undecodable``/``unsupported``
        from :func:`_unit_float_to_uint8`.
    """
    img = _to_8bit(ImageOps.exif_transpose(img))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return np.array(img.convert("RGB"))
    except ValueError as e:  # "conversion from LAB to RGB not supported", ...
        raise BadImage("unsupported", f"pixel mode {img.mode}: {e}") from None


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from a decoded pixel array ``[H, W]``, ``[H, W, C]`` or planar ``[C, H, W]``
    (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA): floats from ``[0, 1]``, integers by their bit depth,
    alpha composited on white.

    Raises:
        BadImage: ``unsupported`` for another layout or sample type.
    """
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise BadImage("unsupported", f"pixel array of shape {arr.shape}")
    if arr.dtype.kind == "f":
        unit = _unit_float_to_uint8(arr)
    elif arr.dtype == np.bool_:
        unit = arr.astype(np.uint8) * 255
    elif arr.dtype.kind in "ui":
        unit = _int_to_uint8(arr, arr.dtype.itemsize * 8, signed=arr.dtype.kind == "i")
    else:
        raise BadImage("unsupported", f"pixel type {arr.dtype}")
    color, alpha = (unit[..., :-1], unit[..., -1:]) if unit.shape[2] in (2, 4) else (unit, None)
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    if alpha is not None:
        a = alpha.astype(np.float64) / 255.0
        color = np.clip(color * a + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(color)


def _decode_tiff_array(data: bytes, limits: tuple[int, int, float | None]) -> DecodedImage:
    """A TIFF that Pillow cannot open (float or multi-sample layouts), decoded with ``tifffile`` (its first
    page; size limits checked before the pixels are decoded).

    Raises:
        BadImage: ``unsupported`` when tifffile is not installed or cannot read the layout;
        ``undecodable`` for a corrupt file; the size reasons of :func:`_check_size`.
    """
    try:
        import tifffile
    except ImportError:
        raise BadImage("unsupported", _FORMAT_HELP["tiff"]) from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape = page.shape
            planar = len(shape) == 3 and shape[0] in (1, 2, 3, 4) and shape[2] not in (1, 2, 3, 4)
            h, w = (shape[1], shape[2]) if planar else (shape[0], shape[1])
            _check_size(int(w), int(h), *limits)
            arr = page.asarray()
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for corrupt or exotic input
        raise BadImage("undecodable", f"tifffile: {type(e).__name__}: {e}") from None
    return DecodedImage(_array_to_rgb(arr), "TIFF", False)


def _open_heif(data: bytes) -> Image.Image:
    """A HEIF/HEIC image as a Pillow image through pillow-heif (no global plugin registration; libheif applies
    the image's rotation and mirroring, so its EXIF orientation is not applied again).

    Raises:
        BadImage: ``unsupported`` when pillow-heif is not installed, ``undecodable`` for a corrupt file.
    """
    try:
        import pillow_heif
    except ImportError:
        raise BadImage("unsupported", _FORMAT_HELP["heif"]) from None
    try:
        img = pillow_heif.open_heif(io.BytesIO(data)).to_pillow()
    except Exception as e:  # noqa: BLE001 - libheif errors
        raise BadImage("undecodable", f"pillow-heif: {type(e).__name__}: {e}") from None
    img.info.pop("exif", None)
    img.format = "HEIF"
    return img


def _open_image(data: bytes, limits: tuple[int, int, float | None]) -> Image.Image | DecodedImage:
    """Open image bytes with Pillow (falling back to pillow-heif for HEIF and tifffile for TIFF layouts
    Pillow cannot read) and check the size limits before decoding the pixels.

    Returns:
        a lazily opened Pillow image, or the finished :class:`DecodedImage` of the tifffile path.
    Raises:
        BadImage: see :func:`decode_image`.
    """
    kind = sniff_format(data)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except UnidentifiedImageError:
        if kind == "tiff":
            return _decode_tiff_array(data, limits)
        if kind == "heif":
            img = _open_heif(data)
        elif kind is not None:
            raise BadImage("unsupported", _FORMAT_HELP[kind]) from None
        else:
            raise BadImage("undecodable", "not an image (no decoder recognises the bytes)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt input
        raise BadImage("undecodable", f"{type(e).__name__}: {e}") from None
    _check_size(*img.size, *limits)
    return img


def decode_image(data: bytes, *, max_pixels: int = 178_956_970, min_side: int = 1,
                 max_aspect: float | None = None) -> DecodedImage:
    """Decode source image bytes to 8-bit RGB, or say why the image itself is unusable.

    Any container Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, PNM, AVIF with Pillow >= 11.3, ...), HEIF/HEIC
    through pillow-heif and float/multi-sample TIFFs through tifffile where those are installed. EXIF
    orientation is applied. Samples of more than 8 bits are scaled by their bit depth (16-bit ``v`` becomes
    ``round(v / 65535 * 255)``, never scaled by the image's maximum); float images are taken as ``[0, 1]``;
    CMYK, palette and grayscale become RGB; alpha is composited on white. The size limits are checked from
    the header, before the pixels are decoded.

    Args:
        data: the source file's bytes.
        max_pixels: more pixels (width x height) are ``too_large``.
        min_side: a shorter side (pixels) is ``too_small``.
        max_aspect: a long side over ``max_aspect`` x the short side is ``too_elongated``; ``None``: no limit.
    Returns:
        :class:`DecodedImage` (``rgb`` uint8 ``[H, W, 3]``).
    Raises:
        BadImage: ``empty`` (zero bytes), ``undecodable`` (not an image, truncated or corrupt), ``unsupported``
        (an image format or pixel layout without a decoder here, e.g. HEIC without pillow-heif, or float pixels
        outside ``[0, 1]``), ``too_large``, ``too_small``, ``too_elongated``.
    """
    if not data:
        raise BadImage("empty", "zero-byte file")
    limits = (max_pixels, min_side, max_aspect)
    img = _open_image(data, limits)
    if isinstance(img, DecodedImage):
        return img
    fmt, mode = img.format or "", img.mode
    try:
        orientation = img.getexif().get(0x0112, 1)
        img.load()
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
        raise BadImage("undecodable", f"{type(e).__name__}: {e}") from None
    try:
        rgb = _pil_to_rgb(img)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadImage("undecodable", f"{type(e).__name__}: {e}") from None
    return DecodedImage(rgb, fmt, fmt == "JPEG" and mode in ("RGB", "L") and orientation in (None, 1))
