"""What every evaluation protocol shares: its context, its pictures, ``results.json`` and the results table.

A protocol (``pipeline/evaluate/classification.py``, ``dense.py``, ``coco.py``, the pre-training check in
``reconstruction.py``) is a function ``run(protocol_cfg, ctx: EvalContext) -> dict`` returning::

    {"metrics": {name: float, ...},                     # the numbers of the table (flat)
     "dataset": {"path": str, "fingerprint": sha256, "samples": {split: n}},
     ...anything else worth keeping in results.json (curves, per-class values, settings)}

and :func:`finish` writes ``{output}/results.json`` (metrics, config, checkpoint sha256, dataset fingerprint),
``results.md``, the config, and appends one row per metric to the results table (``results.parquet`` +
``results.md`` under ``results_table``, rebuilt from one row file per ``(checkpoint, protocol)`` under ``rows/``, so
concurrent evaluate jobs lose no rows), keyed by ``(checkpoint, protocol)``: a re-run replaces its rows.
:func:`compare` prints checkpoints side by side from that table.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

TABLE_FILE = "results.parquet"
TABLE_MD = "results.md"
ROWS_DIR = "rows"
TABLE_COLUMNS = ("checkpoint", "checkpoint_sha256", "protocol", "metric", "value", "dataset", "dataset_fingerprint",
                 "created")


@dataclass
class EvalContext:
    """What a protocol gets besides its own config.

    Attributes:
        checkpoint: the checkpoint as the user gave it (run folder, release folder or URL, official file).
        output: the folder of this protocol's ``results.json`` and pictures (local path or URL).
        device: ``"cpu"`` or ``"cuda"``; seed: the seed of everything random; batch_size: images per forward
        pass; max_samples: stop each split after this many images (0 = all; tests and smoke runs).
        pictures: relative paths of the PNG files written through :meth:`save_picture`.
    """

    checkpoint: str
    output: str
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 8
    max_samples: int = 0
    pictures: list[str] = field(default_factory=list)
    _tb: Any = None

    def save_picture(self, name: str, image: Any, step: int = 0) -> str:
        """Write ``image`` (uint8 ``[H, W, 3]`` numpy array or tensor) as ``{output}/pictures/{name}.png`` and
        into TensorBoard (``{output}/tb``, tag ``name``). Returns the URL of the PNG."""
        import io

        import numpy as np
        from PIL import Image

        from polymae.datasets import storage

        arr = np.asarray(image.cpu() if hasattr(image, "cpu") else image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"picture {name!r}: expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rel = f"pictures/{name}.png"
        url = storage.join(self.output, rel)
        storage.makedirs(os.path.dirname(url) if storage.is_local(url) else url.rsplit("/", 1)[0])
        storage.write_bytes_atomic(url, buf.getvalue())
        self.pictures.append(rel)
        if storage.is_local(self.output):
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self.output, "tb"))
            self._tb.add_image(name, arr, step, dataformats="HWC")
        return url

    def close(self) -> None:
        """Flush the TensorBoard writer, if pictures were written."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def fingerprint_files(root: str, paths: Iterable[str]) -> str:
    """sha256 over the sorted ``(path relative to root, size in bytes)`` of a dataset's files: cheap (one recursive
    listing of ``root``, no reads) and changes when a file is added, removed, renamed or resized. ``root`` and
    ``paths`` are local paths or fsspec URLs of one filesystem.

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    from polymae.datasets import storage

    fs, base_path = storage.get_fs(root)
    sizes = {}
    if fs.exists(base_path):
        sizes = {k.rstrip("/"): v.get("size") for k, v in fs.find(base_path, detail=True).items()}
    h = hashlib.sha256()
    base = root.rstrip("/")
    for p in sorted(paths):
        inside = p.startswith(base + "/")
        rel = p[len(base):].lstrip("/") if inside else p
        path = f"{base_path.rstrip('/')}/{rel}" if inside else storage.get_fs(p)[1].rstrip("/")
        size = sizes.get(path)
        if size is None:
            size = fs.size(path)
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def table_rows(protocol: str, results: dict) -> list[dict]:
    """The results table rows of one protocol run (one per metric)."""
    ds = results.get("dataset", {})
    return [{"checkpoint": results["checkpoint"], "checkpoint_sha256": results["checkpoint_sha256"],
             "protocol": protocol, "metric": k, "value": float(v), "dataset": ds.get("path", ""),
             "dataset_fingerprint": ds.get("fingerprint", ""), "created": results["created"]}
            for k, v in results["metrics"].items()]


def _parquet_bytes(rows: Sequence[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=_schema()), buf)
    return buf.getvalue()


def _row_file(table_dir: str, checkpoint: str, protocol: str) -> str:
    """The file of one ``(checkpoint, protocol)``'s rows: ``{table_dir}/rows/<sha256 of the key, 24 hex>.parquet``."""
    key = hashlib.sha256(f"{checkpoint}\0{protocol}".encode()).hexdigest()[:24]
    return f"{table_dir.rstrip('/')}/{ROWS_DIR}/{key}.parquet"


def append_table(table_dir: str, rows: Sequence[dict]) -> str:
    """Add ``rows`` to the results table at ``table_dir`` and return the URL of ``results.parquet``.

    Each ``(checkpoint, protocol)`` keeps its rows in its own file under ``{table_dir}/rows/`` (written atomically;
    a re-run replaces it), so evaluate jobs running at the same time (a Slurm array, on a shared folder or S3)
    never lose each other's rows: there is no read-modify-write of one shared file. ``results.parquet`` and
    ``results.md`` are then rebuilt from every row file (atomically; of two jobs finishing together the later
    rebuild may miss the other's rows until the next run, but :func:`read_table` reads the row files).
    """
    from polymae.datasets import storage

    by_key: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["checkpoint"], r["protocol"]), []).append(r)
    storage.makedirs(f"{table_dir.rstrip('/')}/{ROWS_DIR}")
    for (ckpt, protocol), group in by_key.items():
        storage.write_bytes_atomic(_row_file(table_dir, ckpt, protocol), _parquet_bytes(group))
    every = read_table(table_dir)
    url = f"{table_dir.rstrip('/')}/{TABLE_FILE}"
    storage.write_bytes_atomic(url, _parquet_bytes(every))
    storage.write_bytes_atomic(f"{table_dir.rstrip('/')}/{TABLE_MD}", compare_markdown(every).encode())
    return url


def _schema():
    import pyarrow as pa

    return pa.schema([(c, pa.float64() if c == "value" else pa.string()) for c in TABLE_COLUMNS])


def read_table(table_dir: str) -> list[dict]:
    """Every row of the results table at ``table_dir``: the row files under ``rows/`` (:func:`append_table`), or a
    table written without them, ``results.parquet`` alone; empty when there is neither."""
    import io

    import pyarrow.parquet as pq

    from polymae.datasets import storage

    rows_dir = f"{table_dir.rstrip('/')}/{ROWS_DIR}"
    if storage.exists_fresh(rows_dir):  # fresh: other jobs' row files, not a listing cached by this process
        files = sorted(storage.list_files(rows_dir, suffixes=(".parquet",)))
        return [r for f in files for r in pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pylist()]
    url = f"{table_dir.rstrip('/')}/{TABLE_FILE}"
    if not storage.exists(url):
        return []
    return pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()


def pivot(rows: Sequence[dict], checkpoints: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, str, list]]]:
    """Checkpoints side by side: ``(checkpoint columns, [(protocol, metric, [value or None per column])])``.
    ``checkpoints`` selects and orders the columns (default: every checkpoint in the rows, sorted by name).

    Raises:
        KeyError: a requested checkpoint with no row (names it and the ones there are).
    """
    cols = list(dict.fromkeys(checkpoints or sorted({r["checkpoint"] for r in rows})))
    have = {r["checkpoint"] for r in rows}
    missing = [c for c in cols if c not in have]
    if missing:
        raise KeyError(f"no results for {missing}; the table has {sorted(have)}")
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["checkpoint"] in cols:
            cells.setdefault((r["protocol"], r["metric"]), {})[r["checkpoint"]] = r["value"]
    return cols, [(p, m, [cells[(p, m)].get(c) for c in cols]) for (p, m) in sorted(cells)]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def compare_markdown(rows: Sequence[dict], checkpoints: Sequence[str] = ()) -> str:
    """The results table as markdown: one row per (protocol, metric), one column per checkpoint."""
    if not rows:
        return "# polymae results\n\n(no results yet)\n"
    cols, lines = pivot(rows, checkpoints)
    out = ["# polymae results", "", "| protocol | metric | " + " | ".join(cols) + " |",
           "|---|---|" + "---:|" * len(cols)]
    out += [f"| {p} | {m} | " + " | ".join(_fmt(v) for v in vals) + " |" for p, m, vals in lines]
    return "\n".join(out) + "\n"


def compare(table_dir: str, checkpoints: Sequence[str] = ()) -> str:
    """Print (rich) and return (markdown) the checkpoints of the results table side by side.

    Raises:
        FileNotFoundError: no results table in ``table_dir``; KeyError: as :func:`pivot`.
    """
    from rich.console import Console
    from rich.table import Table

    rows = read_table(table_dir)
    if not rows:
        raise FileNotFoundError(f"no results table {table_dir}/{TABLE_FILE}: run `polymae evaluate` first")
    cols, lines = pivot(rows, checkpoints)
    t = Table(title=f"polymae results ({table_dir})")
    t.add_column("protocol")
    t.add_column("metric")
    for c in cols:
        t.add_column(c, justify="right", overflow="fold")
    for p, m, vals in lines:
        t.add_row(p, m, *(_fmt(v) for v in vals))
    Console().print(t)
    return compare_markdown(rows, cols)


def finish(protocol: str, results: dict, ctx: EvalContext, cfg: Any, table_dir: str) -> dict:
    """Complete a protocol's results (checkpoint, its sha256, the redacted config, time, pictures) and write ``results.json``,
    ``results.md``, ``config.yaml`` to ``ctx.output`` and its rows to the results table at ``table_dir`` (skipped
    when empty). Returns the completed results."""
    from polymae.datasets import storage
    from polymae.pipeline.config import save_config, to_dict
    from polymae.pipeline.train.checkpoint import weights_digest

    ctx.close()
    results = dict(results, protocol=protocol, checkpoint=ctx.checkpoint, config=to_dict(cfg),
                   checkpoint_sha256=results.get("checkpoint_sha256") or weights_digest(ctx.checkpoint),
                   created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   pictures=list(ctx.pictures))
    storage.makedirs(ctx.output)
    storage.write_json_atomic(f"{ctx.output.rstrip('/')}/results.json", results)
    md = [f"# {protocol}: {ctx.checkpoint}", "", "| metric | value |", "|---|---:|"]
    md += [f"| {k} | {_fmt(float(v))} |" for k, v in results["metrics"].items()]
    storage.write_bytes_atomic(f"{ctx.output.rstrip('/')}/results.md", ("\n".join(md) + "\n").encode())
    save_config(cfg, f"{ctx.output.rstrip('/')}/config.yaml")
    if table_dir:
        append_table(table_dir, table_rows(protocol, results))
        log.info("results table: %s", table_dir)
    return results
