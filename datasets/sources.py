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
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple
from urllib.parse import parse_qs, quote, unquote

import fsspec
from fsspec.core import url_to_fs

from polymae.datasets.storage import full_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm")
# Preference order of the image member in a WebDataset sample (the first present wins).
TAR_IMAGE_EXTS = ("jpg", "jpeg", "rgb.jpg", "png", "webp", "jfif", "bmp", "tif", "tiff", "ppm", "image")
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


def _list_tar(tar_url: str) -> list[SourceEntry]:
    """Entries of one WebDataset tar (streamed once; class members are read on the way)."""
    samples: dict[str, dict] = {}
    order: list[str] = []
    with fsspec.open(tar_url, "rb") as fh:
        with tarfile.open(fileobj=fh, mode="r|") as tf:  # uncompressed: offsets are file offsets
            for m in tf:
                if not m.isfile():
                    continue
                raw_key, ext = _split_wds_name(m.name)
                s = samples.get(raw_key)
                if s is None:
                    s = samples[raw_key] = {}
                    order.append(raw_key)
                lext = ext.lower()
                if lext in TAR_CLS_EXTS:
                    try:
                        s["cls"] = int(tf.extractfile(m).read().decode().strip())
                    except ValueError:
                        pass
                elif lext in TAR_IMAGE_EXTS:
                    s.setdefault("images", {})[lext] = (m.offset_data, m.size, m.name)
    entries = []
    for raw_key in order:
        s = samples[raw_key]
        imgs = s.get("images")
        if not imgs:
            continue
        ext = next(e for e in TAR_IMAGE_EXTS if e in imgs)
        off, size, name = imgs[ext]
        entries.append(SourceEntry(sanitise_key(raw_key), tar_member_uri(tar_url, off, size, name), s.get("cls")))
    return entries


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
    entries: list[SourceEntry] = []
    for u in urls:
        fs, p = url_to_fs(u)
        if not fs.exists(p):
            raise SourceError(f"tar shard {u} does not exist")
        entries.extend(_list_tar(u))
    return Source(url, "tars", _check_unique(entries, url), extra={"tars": urls})


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

