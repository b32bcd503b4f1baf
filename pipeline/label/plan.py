"""The label job's plan: which key goes to which shard, written once as ``{split}/plan.parquet`` and reused,
so a key keeps its shard across re-runs (``resume``) and new keys go to new shards (``extend``).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.datasets.sources import Source, SourceEntry
from polymae.pipeline.label.config import LabelConfig

log = logging.getLogger("polymae.label")

PLAN_NAME = "plan.parquet"


@dataclass
class Plan:
    """Which key goes to which shard; rows in shard order. Written once as ``{split}/plan.parquet`` and
    reused, so a key keeps its shard across re-runs. ``cls``: class index per key (or None); ``meta``:
    schema version, source description, class names, ``samples_per_shard``, ``seed``, extensions."""

    keys: list[str]
    uris: list[str]
    cls: list[int | None]
    shard: list[int]
    meta: dict

    @property
    def key_set(self) -> set[str]:
        """The planned keys."""
        return set(self.keys)

    def shards(self) -> dict[int, list[SourceEntry]]:
        """``{shard index: [entries in shard order]}``."""
        out: dict[int, list[SourceEntry]] = collections.defaultdict(list)
        for k, u, c, s in zip(self.keys, self.uris, self.cls, self.shard):
            out[s].append(SourceEntry(k, u, c))
        return dict(sorted(out.items()))

    def append(self, entries: list[SourceEntry], shard_of: list[int]) -> None:
        """Add ``entries`` (in plan order) with their shard indices after the existing rows."""
        self.keys += [e.key for e in entries]
        self.uris += [e.uri for e in entries]
        self.cls += [e.cls for e in entries]
        self.shard += shard_of

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


def plan_url(output: str, split: str) -> str:
    """``{output}/{split}/plan.parquet``: the plan of a split."""
    return f"{S.split_dir(output, split)}/{PLAN_NAME}"


def make_plan(entries: list[SourceEntry], samples_per_shard: int, seed: int, first_shard: int = 0) -> tuple[list, list]:
    """Shuffle ``entries`` with ``seed`` (so class folders mix across shards) and cut them into shards.

    Returns:
        ``(entries in plan order, shard index of each)``; shards are numbered from ``first_shard``.
    """
    ordered = sorted(entries, key=lambda e: e.key)
    perm = np.random.default_rng([seed, first_shard]).permutation(len(ordered))
    planned = [ordered[i] for i in perm]
    return planned, [first_shard + i // samples_per_shard for i in range(len(planned))]


def load_or_create_plan(cfg: LabelConfig, source: Source) -> Plan:
    """The split's plan: the saved one (extended with the source's new keys when ``mode=extend``), or a
    new one from ``source`` when there is none (saved before it is returned).

    Raises:
        ValueError: the saved plan was made from another input (use ``mode=overwrite``).
    """
    url = plan_url(cfg.output, cfg.split)
    if not storage.exists(url):
        planned, shard_of = make_plan(source.entries, cfg.samples_per_shard, cfg.seed)
        plan = Plan([], [], [], [], {"schema_version": S.SCHEMA_VERSION, "source": source.describe(),
                                     "classes": source.classes, "samples_per_shard": cfg.samples_per_shard,
                                     "seed": cfg.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        plan.append(planned, shard_of)
        plan.save(url)
        return plan
    plan = Plan.load(url)
    planned_from = plan.meta.get("source", {}).get("url", "")
    if not same_input(planned_from, cfg.input):
        raise ValueError(f"{S.split_dir(cfg.output, cfg.split)} was planned from input {planned_from!r}, not "
                         f"{cfg.input!r}; use mode=overwrite to relabel or another output/split")
    if plan.meta.get("samples_per_shard") != cfg.samples_per_shard:
        log.warning("keeping the plan's samples_per_shard=%s (config says %s)",
                    plan.meta.get("samples_per_shard"), cfg.samples_per_shard)
    known = plan.key_set
    new = [e for e in source.entries if e.key not in known]
    if new and cfg.mode == "extend":
        extend_plan(plan, source, new, cfg.samples_per_shard, cfg.seed)
        plan.save(url)
    elif new:
        log.warning("%d source images are not in the plan (e.g. %s); rerun with --extend to label them",
                    len(new), new[0].key)
    gone = len(known - {e.key for e in source.entries})
    if gone:
        log.warning("%d planned keys are no longer in the source", gone)
    return plan


def extend_plan(plan: Plan, source: Source, new: list[SourceEntry], samples_per_shard: int, seed: int) -> None:
    """Put ``new`` entries of ``source`` into new shards after the plan's last one (the plan's own
    ``samples_per_shard`` wins over the argument); finished shards and their class indices stay valid.
    Changes ``plan`` in place (rows, ``meta["extended"]``, ``meta["source"]``, ``meta["classes"]``)."""
    new = _keep_class_indices(plan, source.classes, new)
    first = max(plan.shard) + 1 if plan.shard else 0
    spp = int(plan.meta.get("samples_per_shard") or samples_per_shard)
    planned, shard_of = make_plan(new, spp, seed, first_shard=first)
    plan.append(planned, shard_of)
    plan.meta["extended"] = plan.meta.get("extended", []) + [{"first_shard": first, "keys": len(planned)}]
    plan.meta["source"] = source.describe()
    log.info("extend: %d new keys in shards %d..%d", len(planned), first, max(shard_of))


def same_input(a: str, b: str) -> bool:
    """True when two input URLs/paths name the same input (trailing ``/``, ``file://`` and relative local
    paths normalised)."""
    def norm(u: str) -> str:
        u = u.rstrip("/")
        if u.startswith("file://"):
            u = u[len("file://"):]
        return os.path.abspath(u) if "://" not in u else u

    return norm(a) == norm(b)


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
