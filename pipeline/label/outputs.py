"""What the label job writes and reports after labelling: ``index.parquet`` (a row per sample),
``manifest.json`` (teachers, label sets, counts, shards + sha256; docs/ARCHITECTURE.md, "Shard format"),
the summary dict :func:`~polymae.pipeline.label.driver.run_label` returns, and its table on stdout.
"""

from __future__ import annotations

import collections
import io
import time
from dataclasses import dataclass
from typing import Iterable

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.pipeline.label.config import LabelConfig, slot_task
from polymae.pipeline.label.plan import Plan
from polymae.pipeline.label.worker import teacher_brief

STAGES = ("read", "decode", "resize", "depth", "semseg", "encode", "write")


@dataclass
class PendingRun:
    """What labelling the pending shards reports.

    ``teachers``: ``{slot: metadata}``; ``workers``: actors used; ``ray_start_seconds``: connecting to
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


def totals(stats: Iterable[dict]) -> dict:
    """``{"samples_in", "written", "skipped": {reason: count}}`` summed over shards' stats."""
    skipped: collections.Counter = collections.Counter()
    n_in = n_out = 0
    for s in stats:
        n_in += s["samples_in"]
        n_out += s["written"]
        skipped.update(s.get("skipped", {}))
    return {"samples_in": n_in, "written": n_out, "skipped": dict(sorted(skipped.items()))}


def write_index(cfg: LabelConfig, plan: Plan, stats: dict[int, dict]) -> str:
    """Write ``index.parquet`` (a row per planned sample of the finished shards: key, shard, cls, width,
    height in pixels, skip reason, source uri) atomically; returns its URL."""
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
    url = S.index_url(cfg.output, cfg.split)
    storage.write_bytes_atomic(url, buf.getvalue())
    return url


def write_manifest(cfg: LabelConfig, plan: Plan, stats: dict[int, dict], teachers: dict[str, dict],
                   source_desc: dict) -> str:
    """Write ``manifest.json`` from the finished shards' ``stats`` and the ``teachers`` metadata
    (``{slot: metadata}``) atomically; returns its URL. ``complete`` is true only when every shard of the
    plan is finished (has its done marker); ``missing_shards`` lists the planned ones that are not."""
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
        "counts": {**totals(stats.values()), "shards": len(stats)},
        "complete": set(planned) <= set(stats),  # every planned shard has its done marker
        "missing_shards": sorted(set(planned) - set(stats)),
        "shards": [{"index": i, "name": stats[i]["name"], "url": S.shard_url(cfg.output, cfg.split, i),
                    "size": stats[i]["size"], "sha256": stats[i]["sha256"], "samples": stats[i]["written"],
                    "samples_in": stats[i]["samples_in"],
                    "teachers": {t: m.get("revision") for t, m in stats[i].get("teachers", {}).items()}}
                   for i in sorted(stats)],
        "urls": S.brace_pattern(cfg.output, cfg.split, sorted(stats)) if stats else None,
    }
    url = S.manifest_url(cfg.output, cfg.split)
    storage.write_json_atomic(url, manifest)
    return url


def make_summary(cfg: LabelConfig, urls: dict[str, str], planned: int, stats: dict[int, dict],
                 pending: list[int], reused: int, failed: dict[int, str], run: PendingRun, teachers: dict,
                 seconds: float) -> dict:
    """The summary dict of :func:`~polymae.pipeline.label.driver.run_label` (keys documented there).

    ``urls``: ``output``/``plan``/``manifest``/``index``; ``planned``: shards in the plan; ``stats``: every
    finished shard's stats; ``pending``: the shards this run set out to label; ``reused``: shards finished
    before; ``teachers``: ``{slot: metadata}``; ``seconds``: wall time of the run.
    """
    run_stats = [stats[i] for i in pending if i in stats]
    run_totals = totals(run_stats)
    total = totals(stats.values())
    label_s = run.label_seconds
    return {
        "output": urls["output"], "split": cfg.split, "mode": cfg.mode,
        "plan": urls["plan"], "manifest": urls["manifest"], "index": urls["index"],
        "samples_in": total["samples_in"], "written": total["written"],
        "skipped": sum(total["skipped"].values()), "skipped_by_reason": total["skipped"], "shards": len(stats),
        "shards_planned": planned, "shards_done": len(stats), "shards_labelled": len(run_stats),
        "shards_reused": reused, "shards_failed": sorted(failed),
        "run": run_totals, "total": total,
        "seconds": round(seconds, 3), "label_seconds": round(label_s, 3),
        "ray_start_seconds": round(run.ray_start_seconds, 3),
        "teacher_load_seconds": round(run.teacher_load_seconds, 3),
        "images_per_s": round(run_totals["samples_in"] / label_s, 3) if run_stats and label_s > 0 else 0.0,
        "stages": stage_totals(run_stats),
        "teacher_wait_seconds": round(sum(s.get("teacher_wait_seconds", 0.0) for s in run_stats), 3),
        "workers": run.workers, "retries": run.retries, "shards_retried": run.retried or {},
        "workers_replaced": run.workers_replaced,
        "teachers": {t: teacher_brief(m) for t, m in teachers.items()},
    }


def print_summary(summary: dict) -> None:
    """Print the summary of :func:`make_summary` as a table (this run and all shards) on stdout."""
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
