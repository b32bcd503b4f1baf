"""The label job: pseudo-label a collection of images with a depth and a semantic-segmentation teacher
(MultiMAE, Bachmann et al. 2022, Sec. 3.2) and write WebDataset shards (format: ``datasets/shards.py``).

Flow of :func:`run_label`::

    source (datasets/sources.py) ──list──▶ plan.parquet (key → shard, seeded shuffle, reused on re-runs)
        │
        ▼  Ray: one LabelWorker actor per worker holds every teacher (loaded once); the driver keeps two
           shards queued per actor, retries a shard whose actor died on a replacement actor, and each
           shard is: read bytes (threads) → load_rgb + resize to the teachers' inputs (decode threads,
           batches ahead) → teachers in batches → ShardTarWriter
           → {split}-{index:06d}.stats.json (the done marker)
        ▼
    index.parquet (a row per sample) + manifest.json (teachers, label sets, counts, shards + sha256)

Exactly once: every key is in exactly one shard of the plan; a shard is published by an atomic rename
and then marked done by its stats file, so a run killed at any moment (driver or worker) leaves only
finished shards and hidden ``.{name}.tmp-*`` files that readers ignore; a re-run (or the runner's retry
of a shard whose worker died, ``shard_retries``) labels exactly the shards without a done marker.

Modes: ``resume`` (default) labels only shards without a stats file; ``overwrite`` deletes the split's
outputs and plans again; ``extend`` keeps every existing shard byte-identical and puts keys that are
new in the source into new shards after the last one.

Ray: embedded local Ray by default (``ray.init(address="local", ...)``); ``ray_address`` joins a cluster;
under ``ray job submit`` (``RAY_ADDRESS`` set) the job's cluster is joined.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import numpy as np

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.datasets.sources import SourceEntry, open_source
from polymae.pipeline.config import ConfigError, field_, save_config
from polymae.pipeline.label.worker import LabelWorker, ShardJob, slot_task, teacher_brief, teacher_list, teacher_slot

log = logging.getLogger("polymae.label")

PLAN_NAME = "plan.parquet"
CONFIG_NAME = "config.yaml"
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


# -------------------------------------------------------------------------------------- config
@dataclass
class LabelConfig:
    """Everything the label job takes (``polymae label key=value ...``)."""

    input: str = field_(help="images: folder (flat or ImageNet-style class folders), .txt list, .parquet with a "
                             "'uri' column, .tar shards (file, brace pattern or folder); local path or fsspec URL")
    output: str = field_("work/shards", help="root of the shards; they go to {output}/{split}/ (path or fsspec URL)")
    split: str = field_("train", help="split name: shards are {split}-{index:06d}.tar")
    input_kind: Literal["auto", "imagefolder", "folder", "list", "parquet", "tars"] = field_(
        "auto", help="how to read `input`; auto decides from the URL")
    samples_per_shard: int = field_(S.DEFAULT_SAMPLES_PER_SHARD, help="images per shard (kept from the plan on re-runs)")
    depth_teacher: str = field_("dpt", help="depth teacher (dpt, depth_anything), a comma list of them (the first "
                                            "writes depth.png, each further one depth.<name>.png) or none")
    semseg_teacher: str = field_("segformer", help="semseg teacher (segformer, mask2former, oneformer), a comma "
                                                   "list (first: semseg.png, further: semseg.<name>.png) or none")
    depth_weights: str | None = field_(
        None, help="save_pretrained folder/URL of the depth teacher, or a comma list matching depth_teacher "
                   "(an entry 'null' = tiny random); null = all tiny random")
    semseg_weights: str | None = field_(
        None, help="save_pretrained folder/URL of the semseg teacher, or a comma list matching semseg_teacher "
                   "(an entry 'null' = tiny random); null = all tiny random")
    teacher_short_side: int = field_(384, help="short side (pixels) of the teachers' input, rounded to the model's multiple")
    batch_size: int = field_(16, help="images per teacher forward pass")
    num_workers: int = field_(0, help="Ray actors, each holding both teachers; 0 = one per GPU, else per cpus_per_worker CPUs")
    cpus_per_worker: int = field_(1, help="CPUs (and torch threads) per actor")
    device: Literal["auto", "cpu", "cuda"] = field_("auto", help="teacher device; auto = cuda when the cluster has GPUs")
    ray_address: str | None = field_(None, help="Ray cluster to join (e.g. ray://host:10001, auto); null = embedded local Ray")
    mode: Literal["resume", "overwrite", "extend"] = field_(
        "resume", help="resume: skip finished shards; overwrite: redo all; extend: keep shards, add new keys")
    max_pixels: int = field_(40_000_000, help="images with more pixels are skipped (reason too_large)")
    seed: int = field_(0, help="seed of the plan's shuffle and of tiny random teachers")
    read_threads: int = field_(8, help="threads reading source bytes ahead of decoding, per actor")
    decode_threads: int = field_(1, help="threads decoding images and resizing them to the teachers' input "
                                         "ahead of the teacher stage (next batches overlap the current "
                                         "forward), per actor")
    worker_nice: int | None = field_(0, help="niceness of the labelling workers (Ray starts workers at 15, so "
                                             "any other process on the machine starves them); null keeps Ray's")
    shard_retries: int = field_(2, help="times a shard is labelled again after its worker died or it failed "
                                        "(each retry is logged; a dead worker is replaced)")
    progress: bool = field_(True, help="show a progress bar (images/s) on stderr")

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the key."""
        from polymae.pipeline.label.teachers import names

        if not str(self.input).strip():
            raise ConfigError("input", "is required: a folder, .txt/.parquet list or .tar shards")
        if not str(self.output).strip():
            raise ConfigError("output", "must not be empty")
        if not _SPLIT_RE.match(self.split):
            raise ConfigError("split", f"must match [A-Za-z0-9_]+, got {self.split!r}")
        for key, task in (("depth_teacher", "depth"), ("semseg_teacher", "semseg")):
            items = [v.strip() for v in str(getattr(self, key)).split(",")]
            if items == ["none"]:
                continue
            if "" in items:
                raise ConfigError(key, f"has an empty name in {getattr(self, key)!r}")
            if "none" in items:
                raise ConfigError(key, "'none' cannot be combined with teacher names")
            for value in items:
                if value not in names(task):
                    raise ConfigError(key, f"unknown {task} teacher {value!r}; choose from {names(task) + ['none']} "
                                           "(or a comma list of them)")
            dup = sorted({v for v in items if items.count(v) > 1})
            if dup:
                raise ConfigError(key, f"names {dup[0]!r} twice: each teacher of a modality runs once")
        if not teacher_list(self.depth_teacher) and not teacher_list(self.semseg_teacher):
            raise ConfigError("depth_teacher", "both teachers are 'none': nothing to label")
        if self.worker_nice is not None and not -20 <= self.worker_nice <= 19:
            raise ConfigError("worker_nice", f"must be in [-20, 19] or null, got {self.worker_nice}")
        for key, teacher in (("depth_weights", self.depth_teacher), ("semseg_weights", self.semseg_teacher)):
            w = getattr(self, key)
            if w is None:
                continue
            n = len(teacher_list(teacher))
            if n == 0:
                raise ConfigError(key, "is set but its teacher is 'none'")
            got = len(str(w).split(","))
            if got != n:
                raise ConfigError(key, f"has {got} comma-separated entries for {n} teacher(s) {teacher!r}; give one "
                                       "per teacher ('null' = tiny random) or null for all")
        for key, low in (("samples_per_shard", 1), ("teacher_short_side", 32), ("batch_size", 1), ("num_workers", 0),
                         ("cpus_per_worker", 1), ("max_pixels", 1), ("read_threads", 1), ("decode_threads", 1),
                         ("shard_retries", 0)):
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")

    def teacher_weights(self) -> dict[str, list[tuple[str, str | None]]]:
        """``{task: [(teacher name, weights URL or None = tiny random), ...]}``, the primary first; a task
        whose teacher is ``none`` is absent. Call after :meth:`validate` (lengths are not checked here)."""
        out = {}
        for task, names_, weights in (("depth", self.depth_teacher, self.depth_weights),
                                      ("semseg", self.semseg_teacher, self.semseg_weights)):
            teachers = teacher_list(names_)
            if not teachers:
                continue
            ws = [None] * len(teachers) if weights is None else [
                None if w.strip().lower() in ("", "null", "none") else w.strip() for w in str(weights).split(",")]
            out[task] = list(zip(teachers, ws))
        return out

    def teacher_specs(self, device: str = "cpu") -> dict[str, dict]:
        """``{slot: load_teacher kwargs}`` for the enabled teachers, depth first, each task's primary first.

        ``slot`` is the task (``depth``/``semseg``) for the primary teacher, which writes ``depth.png`` /
        ``semseg.png``, and ``{task}.{name}`` (the member name without ``.png``) for each further one.
        """
        out = {}
        for task, pairs in self.teacher_weights().items():
            for i, (name, weights) in enumerate(pairs):
                out[teacher_slot(task, name, primary=i == 0)] = dict(
                    name=name, weights=weights, seed=self.seed, short_side=self.teacher_short_side, device=device,
                    batch_size=self.batch_size)
        return out


# ---------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Which key goes to which shard; rows in shard order. Written once as ``{split}/plan.parquet`` and
    reused, so a key keeps its shard across re-runs."""

    keys: list[str]
    uris: list[str]
    cls: list[int | None]
    shard: list[int]
    meta: dict

    @property
    def key_set(self) -> set[str]:
        return set(self.keys)

    def shards(self) -> dict[int, list[SourceEntry]]:
        """``{shard index: [entries in shard order]}``."""
        out: dict[int, list[SourceEntry]] = collections.defaultdict(list)
        for k, u, c, s in zip(self.keys, self.uris, self.cls, self.shard):
            out[s].append(SourceEntry(k, u, c))
        return dict(sorted(out.items()))

    def save(self, url: str) -> None:
        """Write the plan as parquet (``meta`` in the schema metadata), atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"key": pa.array(self.keys, pa.string()), "uri": pa.array(self.uris, pa.string()),
                          "cls": pa.array(self.cls, pa.int32()), "shard": pa.array(self.shard, pa.int32())})
        table = table.replace_schema_metadata({b"polymae_plan": json.dumps(self.meta).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(url, buf.getvalue())

    @classmethod
    def load(cls, url: str) -> "Plan":
        """Read a plan written by :meth:`save`."""
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(storage.read_bytes(url)))
        meta = json.loads((table.schema.metadata or {}).get(b"polymae_plan", b"{}"))
        d = table.to_pydict()
        return cls(d["key"], d["uri"], d["cls"], d["shard"], meta)


def make_plan(entries: list[SourceEntry], samples_per_shard: int, seed: int, first_shard: int = 0) -> tuple[list, list]:
    """Shuffle ``entries`` with ``seed`` (so class folders mix across shards) and cut them into shards.

    Returns:
        ``(entries in plan order, shard index of each)``; shards are numbered from ``first_shard``.
    """
    ordered = sorted(entries, key=lambda e: e.key)
    perm = np.random.default_rng([seed, first_shard]).permutation(len(ordered))
    planned = [ordered[i] for i in perm]
    return planned, [first_shard + i // samples_per_shard for i in range(len(planned))]


# ------------------------------------------------------------------------------------ one shard
def _start_ray(address: str | None, worker_nice: int | None = None) -> bool:
    """Connect to Ray; returns True when this call started it (the caller then shuts it down).

    ``address``: a cluster to join; ``None`` joins ``RAY_ADDRESS`` (set under ``ray job submit``) or
    starts an embedded local Ray whose workers get niceness ``worker_nice`` (when >= 0; Ray's own
    default is 15, and an exported ``RAY_worker_niceness`` wins).
    """
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    elif os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`
        ray.init(logging_level=logging.WARNING)
    else:
        # The label workers are this job's compute: run them at the driver's priority rather than Ray's
        # niceness 15, which lets any other process on the machine starve them.
        set_nice = worker_nice is not None and worker_nice >= 0 and "RAY_worker_niceness" not in os.environ
        if set_nice:
            os.environ["RAY_worker_niceness"] = str(worker_nice)
        try:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=EMBEDDED_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
        finally:
            if set_nice:
                os.environ.pop("RAY_worker_niceness", None)
    return True


def _existing_stats(split_url: str, split: str) -> dict[int, str]:
    """``{index: stats url}`` of the split's finished shards (one listing, not one request per shard)."""
    if not storage.exists(split_url):
        return {}
    out = {}
    pat = re.compile(rf"(?:^|/){re.escape(split)}-(\d{{6}})\.stats\.json$")
    for url in storage.list_files(split_url, suffixes=(".stats.json",), recursive=False):
        m = pat.search(url)
        if m:
            out[int(m.group(1))] = url
    return out


def _clear_split(output: str, split: str) -> None:
    """Delete a split's labelling outputs (manifest and index first, so readers stop trusting them)."""
    d = S.split_dir(output, split)
    if not storage.exists(d):
        return
    for name in ("manifest.json", "index.parquet"):
        storage.remove(f"{d}/{name}")
    pat = re.compile(rf"(?:^|/){re.escape(split)}-\d{{6}}\.(stats\.json|tar)$")
    files = [u for u in storage.list_files(d, recursive=False) if pat.search(u)]
    for u in sorted(files, key=lambda u: not u.endswith(".stats.json")):  # done markers before tars
        storage.remove(u)
    storage.remove(f"{d}/{PLAN_NAME}")


def _same_input(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.rstrip("/")
        if u.startswith("file://"):
            u = u[len("file://"):]
        return os.path.abspath(u) if "://" not in u else u

    return norm(a) == norm(b)


def _write_outputs(cfg: LabelConfig, plan: Plan, stats: dict[int, dict], teachers: dict[str, dict],
                   source_desc: dict) -> tuple[str, str]:
    """Write ``index.parquet`` and ``manifest.json`` from the shards' stats; returns their URLs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {k: [] for k in ("key", "shard", "cls", "width", "height", "skipped", "uri")}
    uri_of = dict(zip(plan.keys, plan.uris))
    for idx in sorted(stats):
        for r in stats[idx]["samples"]:
            cols["key"].append(r["key"])
            cols["shard"].append(idx)
            cols["cls"].append(r["cls"])
            cols["width"].append(r["width"])
            cols["height"].append(r["height"])
            cols["skipped"].append(r["skipped"])
            cols["uri"].append(uri_of.get(r["key"]))
    table = pa.table({"key": pa.array(cols["key"], pa.string()), "shard": pa.array(cols["shard"], pa.int32()),
                      "cls": pa.array(cols["cls"], pa.int32()), "width": pa.array(cols["width"], pa.int32()),
                      "height": pa.array(cols["height"], pa.int32()),
                      "skipped": pa.array(cols["skipped"], pa.string()), "uri": pa.array(cols["uri"], pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    index_url = S.index_url(cfg.output, cfg.split)
    storage.write_bytes_atomic(index_url, buf.getvalue())

    counts = _totals(stats.values())
    label_sets = {}
    for m in teachers.values():
        if m.get("task") == "semseg":
            label_sets[m["label_set"]] = {"num_classes": m["num_classes"], "class_names": m.get("class_names"),
                                          "ignore_index": m["ignore_index"], "teacher": m["name"]}
    planned = sorted(set(plan.shard))
    manifest = {
        "schema_version": S.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "split": cfg.split, "root": cfg.output,
        "source": {**source_desc, "classes": plan.meta.get("classes")},
        "plan": {"samples_per_shard": plan.meta.get("samples_per_shard"), "seed": plan.meta.get("seed"),
                 "num_shards": len(planned), "num_keys": len(plan.keys)},
        "teachers": teachers, "label_sets": label_sets,
        "members": {"rgb": S.RGB,
                    **{slot: S.member(slot_task(slot), None if slot == slot_task(slot) else m["name"])
                       for slot, m in teachers.items()}, "meta": S.META, "cls": S.CLS},
        "counts": {**counts, "shards": len(stats)},
        "complete": set(planned) <= set(stats),
        "shards": [{"index": i, "name": stats[i]["name"], "url": S.shard_url(cfg.output, cfg.split, i),
                    "size": stats[i]["size"], "sha256": stats[i]["sha256"], "samples": stats[i]["written"],
                    "samples_in": stats[i]["samples_in"],
                    "teachers": {t: m.get("revision") for t, m in stats[i].get("teachers", {}).items()}}
                   for i in sorted(stats)],
        "urls": S.brace_pattern(cfg.output, cfg.split, sorted(stats)) if stats else None,
    }
    manifest_url = S.manifest_url(cfg.output, cfg.split)
    storage.write_json_atomic(manifest_url, manifest)
    return index_url, manifest_url


STAGES = ("read", "decode", "resize", "depth", "semseg", "encode", "write")


def stage_totals(stats: Iterable[dict]) -> dict[str, dict[str, float]]:
    """Per-stage work of shards from their stats files.

    Returns:
        ``{stage: {"busy_seconds": s, "images_per_s": r}}`` for the stages in :data:`STAGES` that ran:
        ``busy_seconds`` summed over shards and workers (seconds a worker spent in the stage),
        ``images_per_s`` = images in / ``busy_seconds`` (what one worker would sustain if it did only
        that stage; 0 when no time was spent).
    """
    busy: collections.Counter = collections.Counter()
    n = 0
    for s in stats:
        n += s["samples_in"]
        busy.update(s.get("busy_seconds", {}))
    return {k: {"busy_seconds": round(busy[k], 3), "images_per_s": round(n / busy[k], 2) if busy[k] > 0 else 0.0}
            for k in (*STAGES, *sorted(set(busy) - set(STAGES))) if k in busy}


_TEMP_RE = r"^\.{split}-\d{{6}}\.(tar|stats\.json)\.tmp-[0-9a-f]+$"


def _remove_stale_temporaries(split_url: str, split: str) -> list[str]:
    """Delete hidden ``.{split}-NNNNNN.tar.tmp-*`` / ``.stats.json.tmp-*`` files that a killed run left
    behind (local outputs; object stores never show an unfinished upload). Readers ignore them anyway;
    this only frees the space. Call it only when no other run writes to the split.

    Returns:
        the removed paths.
    """
    from polymae.datasets.storage import is_local

    if not is_local(split_url) or not storage.exists(split_url):
        return []
    fs, path = storage.get_fs(split_url)
    pat = re.compile(_TEMP_RE.format(split=re.escape(split)))
    removed = []
    for p in fs.ls(path, detail=False):
        if pat.match(p.rsplit("/", 1)[-1]):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(p)
                removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run (e.g. %s)", len(removed), removed[0])
    return removed


def _totals(stats: Iterable[dict]) -> dict:
    skipped: collections.Counter = collections.Counter()
    n_in = n_out = 0
    for s in stats:
        n_in += s["samples_in"]
        n_out += s["written"]
        skipped.update(s.get("skipped", {}))
    return {"samples_in": n_in, "written": n_out, "skipped": dict(sorted(skipped.items()))}


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"label {summary['split']} → {summary['output']}", show_header=True)
    t.add_column("")
    t.add_column("this run", justify="right")
    t.add_column("all shards", justify="right")
    run, tot = summary["run"], summary["total"]
    t.add_row("images in", str(run["samples_in"]), str(tot["samples_in"]))
    t.add_row("written", str(run["written"]), str(tot["written"]))
    reasons = sorted(set(run["skipped"]) | set(tot["skipped"]))
    if not reasons:
        t.add_row("skipped", "0", "0")
    for r in reasons:
        t.add_row(f"skipped: {r}", str(run["skipped"].get(r, 0)), str(tot["skipped"].get(r, 0)))
    t.add_row("shards", f"{summary['shards_labelled']} labelled", f"{summary['shards_done']}/{summary['shards_planned']}")
    if summary["shards_failed"]:
        t.add_row("failed shards", str(len(summary["shards_failed"])), "")
    if summary.get("retries"):
        t.add_row("retried shards", f"{len(summary['shards_retried'])} ({summary['retries']} retries, "
                  f"{summary['workers_replaced']} workers replaced)", "")
    t.add_row("seconds (labelling)", f"{summary['seconds']:.1f} ({summary['label_seconds']:.1f})", "")
    t.add_row("seconds: Ray start, teacher load", f"{summary.get('ray_start_seconds', 0):.1f}, "
              f"{summary.get('teacher_load_seconds', 0):.1f}", "")
    t.add_row(f"images/s (labelling, {summary['workers']} workers)", f"{summary['images_per_s']:.2f}", "")
    for stage, v in summary.get("stages", {}).items():
        t.add_row(f"stage {stage}: busy s, images/s", f"{v['busy_seconds']:.1f}, {v['images_per_s']:.1f}", "")
    t.add_row("teacher stage waiting for decoded images, s", f"{summary.get('teacher_wait_seconds', 0.0):.1f}", "")
    Console().print(t)


def run_label(cfg: LabelConfig) -> dict:
    """Run the label job (see the module docstring).

    Returns:
        summary dict: ``output`` (split folder), ``split``, ``mode``, ``plan``/``manifest``/``index`` URLs;
        over all finished shards ``samples_in``, ``written``, ``skipped`` (int), ``skipped_by_reason``,
        ``shards``; ``shards_planned``, ``shards_done``, ``shards_labelled`` (this run), ``shards_reused``,
        ``shards_failed`` (indices), ``run`` and ``total`` counts (``samples_in``, ``written``, ``skipped``
        by reason), ``seconds`` (wall time of the call), ``ray_start_seconds`` (connecting to/starting
        Ray), ``teacher_load_seconds`` (until every worker has its teachers), ``label_seconds`` (from then
        to the last shard), ``images_per_s`` (images in this run / ``label_seconds``), ``stages``
        (:func:`stage_totals` of this run's shards), ``teacher_wait_seconds`` (summed over this
        run's shards: seconds the teacher stages waited for decoded batches), ``workers``,
        ``retries``, ``shards_retried`` (``{index: attempts}``), ``workers_replaced``, ``teachers``
        (``{slot: {name, revision, random_init, kind | label_set}}``, ``slot`` as in
        :func:`teacher_slot`: every teacher of every task).
    Raises:
        SourceError: the input cannot be listed. FileNotFoundError: teacher weights missing.
        ValueError: the output was planned from another input, or its shards were labelled by other
        teachers (use ``mode=overwrite``). RuntimeError: some shards failed (after the manifest of the
        finished ones is written; a re-run resumes them).
    """
    t_start = time.time()
    split_url = S.split_dir(cfg.output, cfg.split)
    plan_url = f"{split_url}/{PLAN_NAME}"
    for task, pairs in cfg.teacher_weights().items():
        for name, w in pairs:
            if w is not None and not storage.exists(w):
                raise FileNotFoundError(f"{task}_weights: {w} (of teacher {name}) does not exist")
    source = open_source(cfg.input, cfg.input_kind)
    if cfg.mode == "overwrite":
        _clear_split(cfg.output, cfg.split)
    storage.makedirs(split_url)

    plan = Plan.load(plan_url) if storage.exists(plan_url) else None
    if plan is not None:
        if not _same_input(plan.meta.get("source", {}).get("url", ""), cfg.input):
            raise ValueError(f"{split_url} was planned from input {plan.meta.get('source', {}).get('url')!r}, not "
                             f"{cfg.input!r}; use mode=overwrite to relabel or another output/split")
        if plan.meta.get("samples_per_shard") != cfg.samples_per_shard:
            log.warning("keeping the plan's samples_per_shard=%s (config says %s)",
                        plan.meta.get("samples_per_shard"), cfg.samples_per_shard)
        known = plan.key_set
        new = [e for e in source.entries if e.key not in known]
        if new and cfg.mode == "extend":
            new = _keep_class_indices(plan, source.classes, new)
            first = max(plan.shard) + 1 if plan.shard else 0
            spp = int(plan.meta.get("samples_per_shard") or cfg.samples_per_shard)
            planned, shard_of = make_plan(new, spp, cfg.seed, first_shard=first)
            plan.keys += [e.key for e in planned]
            plan.uris += [e.uri for e in planned]
            plan.cls += [e.cls for e in planned]
            plan.shard += shard_of
            plan.meta["extended"] = plan.meta.get("extended", []) + [{"first_shard": first, "keys": len(planned)}]
            plan.meta["source"] = source.describe()
            plan.save(plan_url)
            log.info("extend: %d new keys in shards %d..%d", len(planned), first, max(shard_of))
        elif new:
            log.warning("%d source images are not in the plan (e.g. %s); rerun with --extend to label them",
                        len(new), new[0].key)
        gone = len(known - {e.key for e in source.entries})
        if gone:
            log.warning("%d planned keys are no longer in the source", gone)
    else:
        planned, shard_of = make_plan(source.entries, cfg.samples_per_shard, cfg.seed)
        plan = Plan([e.key for e in planned], [e.uri for e in planned], [e.cls for e in planned], shard_of,
                    {"schema_version": S.SCHEMA_VERSION, "source": source.describe(), "classes": source.classes,
                     "samples_per_shard": cfg.samples_per_shard, "seed": cfg.seed,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        plan.save(plan_url)
    save_config(cfg, f"{split_url}/{CONFIG_NAME}")

    by_shard = plan.shards()
    existing = _existing_stats(split_url, cfg.split)
    done_before = {i: existing[i] for i in by_shard if i in existing}
    pending = [i for i in by_shard if i not in done_before]
    stats: dict[int, dict] = {i: storage.read_json(u) for i, u in done_before.items()}
    log.info("%s: %d images in %d shards; %d shards to label, %d already done", split_url, len(plan.keys),
             len(by_shard), len(pending), len(done_before))

    failed: dict[int, str] = {}
    run = PendingRun(teachers={}, retried={})
    if pending:
        _remove_stale_temporaries(split_url, cfg.split)
        run = _label_pending(cfg, plan, by_shard, pending, stats, failed)
    teachers_meta = run.teachers
    if not teachers_meta:  # nothing labelled now: describe the teachers from the shards' stats
        for s in stats.values():
            teachers_meta = s.get("teachers", {})
            break
    index_url, manifest_url = _write_outputs(cfg, plan, stats, teachers_meta, source.describe())

    run_stats = [stats[i] for i in pending if i in stats]
    run_totals = _totals(run_stats)
    totals = _totals(stats.values())
    label_s = run.label_seconds
    summary = {
        "output": split_url, "split": cfg.split, "mode": cfg.mode,
        "plan": plan_url, "manifest": manifest_url, "index": index_url,
        "samples_in": totals["samples_in"], "written": totals["written"],
        "skipped": sum(totals["skipped"].values()), "skipped_by_reason": totals["skipped"], "shards": len(stats),
        "shards_planned": len(by_shard), "shards_done": len(stats), "shards_labelled": len(run_stats),
        "shards_reused": len(done_before), "shards_failed": sorted(failed),
        "run": run_totals, "total": totals,
        "seconds": round(time.time() - t_start, 3), "label_seconds": round(label_s, 3),
        "ray_start_seconds": round(run.ray_start_seconds, 3),
        "teacher_load_seconds": round(run.teacher_load_seconds, 3),
        "images_per_s": round(run_totals["samples_in"] / label_s, 3) if run_stats and label_s > 0 else 0.0,
        "stages": stage_totals(run_stats),
        "teacher_wait_seconds": round(sum(s.get("teacher_wait_seconds", 0.0) for s in run_stats), 3),
        "workers": run.workers, "retries": run.retries, "shards_retried": run.retried or {},
        "workers_replaced": run.workers_replaced,
        "teachers": {t: teacher_brief(m) for t, m in teachers_meta.items()},
    }
    _print_summary(summary)
    if failed:
        lines = "\n".join(f"  shard {i}: {msg}" for i, msg in sorted(failed.items()))
        raise RuntimeError(f"{len(failed)} shard(s) failed (re-run to resume them):\n{lines}")
    return summary


def _keep_class_indices(plan: Plan, source_classes: list[str] | None, new: list[SourceEntry]) -> list[SourceEntry]:
    """Map new entries' class indices onto the plan's class list so finished shards stay valid: known
    class names keep their index, new class names are appended (updates ``plan.meta["classes"]``)."""
    if source_classes is None:
        return new
    classes = list(plan.meta.get("classes") or [])
    added = [c for c in source_classes if c not in classes]
    classes += added
    if added:
        log.warning("extend: %d new classes appended after the existing %d (e.g. %r); class indices of the "
                    "finished shards are kept, so the class list is no longer in sorted order",
                    len(added), len(classes) - len(added), added[0])
    plan.meta["classes"] = classes
    index = {c: i for i, c in enumerate(classes)}
    return [e._replace(cls=index[source_classes[e.cls]]) if e.cls is not None else e for e in new]


@dataclass
class PendingRun:
    """What :func:`_label_pending` reports about one labelling run.

    ``teachers``: ``{task: metadata}``; ``workers``: actors used; ``ray_start_seconds``: connecting to
    (or starting) Ray; ``teacher_load_seconds``: from creating the actors until every one has loaded
    its teachers; ``label_seconds``: from then until the last shard is back; ``retries``: shard
    re-submissions; ``retried``: ``{shard index: attempts}`` of the shards labelled more than once;
    ``workers_replaced``: actors that died and were replaced.
    """

    teachers: dict
    workers: int = 0
    ray_start_seconds: float = 0.0
    teacher_load_seconds: float = 0.0
    label_seconds: float = 0.0
    retries: int = 0
    retried: dict | None = None
    workers_replaced: int = 0


TASKS_IN_FLIGHT_PER_WORKER = 2  # the next shard waits in the actor's queue, so it never idles on the driver


def _label_pending(cfg: LabelConfig, plan: Plan, by_shard: dict[int, list[SourceEntry]], pending: list[int],
                   stats: dict[int, dict], failed: dict[int, str]) -> PendingRun:
    """Label ``pending`` shards on Ray actors; fills ``stats`` (index → stats) and ``failed`` (index → error).

    Scheduling: every actor has up to :data:`TASKS_IN_FLIGHT_PER_WORKER` shards queued. A shard whose
    actor died (``RayActorError``: process killed, OOM, node lost) or that returned an error is
    submitted again, at most ``cfg.shard_retries`` times, and each retry is logged; a dead actor is
    replaced by a new one (at most ``shard_retries * workers`` replacements in a run). Re-labelling a
    shard is safe: the tar is published by an atomic rename and its stats file (the done marker) is
    written after it, so a half-written attempt leaves only a hidden temporary file.

    Raises:
        RuntimeError: ``device=cuda`` on a cluster without GPUs. ValueError: teachers differ from the
        finished shards' (see :func:`_check_teachers`).
    """
    from tqdm import tqdm

    t0 = time.time()
    started = _start_ray(cfg.ray_address, cfg.worker_nice)
    import ray

    run = PendingRun(teachers={}, ray_start_seconds=time.time() - t0, retried={})
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
        if use_cuda and gpus == 0:
            raise RuntimeError("device=cuda but the Ray cluster has no GPUs")
        auto = gpus if use_cuda else max(1, int(res.get("CPU", 1)) // cfg.cpus_per_worker)
        n_workers = max(1, min(cfg.num_workers or auto, len(pending)))
        specs = cfg.teacher_specs(device="cuda" if use_cuda else "cpu")
        # Ray neither restarts actors nor retries tasks: the loop below does both, bounded and logged.
        actor_cls = ray.remote(LabelWorker).options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_cuda else 0,
                                                    max_restarts=0, max_task_retries=0)
        t_load = time.time()
        slots: list[Any] = [actor_cls.remote(specs, cfg.cpus_per_worker, cfg.worker_nice) for _ in range(n_workers)]
        metas = ray.get([a.metadata.remote() for a in slots])  # every actor has loaded its teachers
        run.teachers, run.workers = metas[0], n_workers
        run.teacher_load_seconds = time.time() - t_load
        _check_teachers(run.teachers, stats)
        classes = plan.meta.get("classes")
        jobs = [ShardJob(cfg.split, i, S.shard_url(cfg.output, cfg.split, i), S.stats_url(cfg.output, cfg.split, i),
                         by_shard[i], classes, cfg.max_pixels, cfg.batch_size, cfg.read_threads, cfg.decode_threads)
                for i in pending]
        t_ready = time.time()
        queue = collections.deque(jobs)
        attempts: collections.Counter = collections.Counter()
        inflight: dict[Any, tuple[ShardJob, int, Any]] = {}  # ref -> (job, slot, actor)
        max_replacements = cfg.shard_retries * n_workers

        def fill() -> None:
            for slot, actor in enumerate(slots):
                if actor is None:
                    continue
                busy = sum(1 for _, s_, _ in inflight.values() if s_ == slot)
                while busy < TASKS_IN_FLIGHT_PER_WORKER and queue:
                    job = queue.popleft()
                    attempts[job.index] += 1
                    inflight[actor.label.remote(job)] = (job, slot, actor)
                    busy += 1

        def retry_or_fail(job: ShardJob, error: str) -> None:
            if attempts[job.index] <= cfg.shard_retries:
                log.warning("shard %d: attempt %d of %d failed (%s); labelling it again", job.index,
                            attempts[job.index], cfg.shard_retries + 1, error.splitlines()[0][:500])
                run.retries += 1
                queue.appendleft(job)
            else:
                failed[job.index] = error
                log.error("shard %d failed after %d attempts: %s", job.index, attempts[job.index], error)

        bar = tqdm(total=sum(len(j.entries) for j in jobs), unit="img", desc=f"label {cfg.split}",
                   disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5)
        done: set[int] = set()
        try:
            fill()
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                job, slot, actor = inflight.pop(ready[0])
                try:
                    out = ray.get(ready[0])
                except ray.exceptions.RayActorError as e:
                    if slots[slot] is actor:  # first news of this actor's death: replace it once
                        with contextlib.suppress(Exception):
                            ray.kill(actor, no_restart=True)
                        if run.workers_replaced < max_replacements:
                            log.warning("worker %d died (%s); starting a replacement", slot, type(e).__name__)
                            slots[slot] = actor_cls.remote(specs, cfg.cpus_per_worker, cfg.worker_nice)
                            run.workers_replaced += 1
                        else:
                            log.error("worker %d died and the replacement budget (%d) is spent", slot,
                                      max_replacements)
                            slots[slot] = None
                    retry_or_fail(job, f"the worker died: {type(e).__name__}: {e}")
                except ray.exceptions.RayError as e:  # e.g. the task's result was lost
                    retry_or_fail(job, f"{type(e).__name__}: {e}")
                else:
                    if "error" in out:
                        retry_or_fail(job, f"{out['error']}\n{out.get('traceback', '')}".rstrip())
                    else:
                        stats[job.index] = out
                        done.add(job.index)
                        bar.update(out["samples_in"])
                        skipped = sum(stats[i]["samples_in"] - stats[i]["written"] for i in done)
                        bar.set_postfix(shards=f"{len(done)}/{len(jobs)}", skipped=skipped, refresh=False)
                if queue and not any(a is not None for a in slots):
                    while queue:
                        j = queue.popleft()
                        failed[j.index] = "no live worker left (see the Ray logs)"
                fill()
        finally:
            bar.close()
        for i in pending:
            if i not in stats and i not in failed:
                failed[i] = "the shard was never labelled (see the Ray logs)"
        run.label_seconds = time.time() - t_ready
        run.retried = {i: n for i, n in sorted(attempts.items()) if n > 1}
        for a in slots:
            if a is not None:
                ray.kill(a)
        return run
    finally:
        if started:
            ray.shutdown()


def _check_teachers(current: dict[str, dict], stats: dict[int, dict]) -> None:
    """Refuse to mix teachers: finished shards must have been labelled by the same teachers/revisions.

    Raises:
        ValueError: naming the shard and both teachers.
    """
    want = {t: (m["name"], m["revision"]) for t, m in current.items()}
    for i, s in sorted(stats.items()):
        have = {t: (m.get("name"), m.get("revision")) for t, m in s.get("teachers", {}).items()}
        if have != want:
            raise ValueError(f"shard {i} was labelled by {have}, the configured teachers are {want}; "
                             "use mode=overwrite to relabel everything or another output/split")
