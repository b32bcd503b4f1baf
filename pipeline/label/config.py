"""The label job's config: :class:`LabelConfig` (``polymae label key=value ...``) and the typed teacher list
(:class:`TeacherConfig`).

Teachers are given either as a typed list::

    teachers:
      - {name: dpt, weights: /models/dpt-hybrid, revision: "sha256:...", input_size: 384}
      - {name: depth_anything, precision: fp32}
      - {name: segformer}

or with the shorthand keys of earlier versions, still accepted on the command line and in config files:
``depth_teacher=dpt,depth_anything semseg_teacher=segformer depth_weights=/models/dpt-hybrid,null``.
:meth:`LabelConfig.teacher_configs` turns either into the one ``list[TeacherConfig]`` every user of the
config reads (the driver, the worker specs, the benchmark); giving both is an error.

The first teacher of a task is its *primary* one: it writes ``depth.png``/``semseg.png``; each further
one writes ``depth.<name>.png``/``semseg.<name>.png`` (docs/ARCHITECTURE.md, "Shard format"). Its key in
the job's teacher dicts, stats and manifest is its *slot* (:func:`teacher_slot`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.pipeline.config import ConfigError, field_

log = logging.getLogger("polymae.label")

TASKS = ("depth", "semseg")  # the order of the teachers in every teacher list and dict
Precision = Literal["auto", "fp32", "bf16", "bf16_full"]
Interpolation = Literal["auto", "bilinear", "bicubic"]
# Keys of an output (resolution) policy that change the stored labels; part of the label fingerprint where
# this config has them (see LabelConfig.label_policy).
OUTPUT_POLICY_KEYS = ("output_short_side", "output_max_side")
# Teacher input aspect ratios (width / height) of the default buckets: ImageNet's 4:3 and 3:4, square, 16:9,
# 7:3, 3:1, 4:1 and their portrait versions; neighbours are <= 1.155x apart (a log-midpoint), so an image is
# stretched by at most ~15.5 % to its bucket's aspect (its labels are resized back to its own aspect).
ASPECT_BUCKETS = (0.25, 1 / 3, 3 / 7, 9 / 16, 0.75, 1.0, 4 / 3, 16 / 9, 7 / 3, 3.0, 4.0)
MAX_BUCKET_DISTORTION = 1.16  # an image further than this factor from every bucket's aspect runs at its own size
RUN_ONLY_KEYS = ("mode", "progress",  # config keys a re-run may change without a new config.yaml
                 "shard_retries", "max_skip_fraction", "read_retries", "read_backoff_s", "shared_fs",
                 "placement_timeout_s", "lease_ttl_s", "storage_options")
SHORTHAND_KEYS = ("depth_teacher", "semseg_teacher", "depth_weights", "semseg_weights")
_NULL_WEIGHTS = ("", "null", "none")
_PROTOCOL_RE = re.compile(r"^[a-z][a-z0-9]*$")
_CREDENTIAL_RE = re.compile(r"^(key|secret|token|password|passwd)$|secret|password|token|access_key|credential|"
                            r"session_key", re.IGNORECASE)


def teacher_slot(task: str, name: str, primary: bool) -> str:
    """Key of a teacher in the job's teacher dicts, stats and manifest: ``task`` for the primary teacher,
    ``{task}.{name}`` (its member name without ``.png``) for a further one."""
    return task if primary else S.member(task, name)[: -len(".png")]


def slot_task(slot: str) -> str:
    """``depth``/``semseg`` of a teacher slot (see :func:`teacher_slot`)."""
    return slot.split(".", 1)[0]


def _registry_task(key: str, name: str, task: str | None = None) -> str:
    """The registry task of teacher ``name`` (checked against ``task`` when given).

    Raises:
        ConfigError: naming ``key``, for an unknown name or one of another task.
    """
    from polymae.pipeline.label.teachers import REGISTRY, names

    known = names(task) if task else names()
    if name not in known:
        what = f"{task} teacher" if task else "teacher"
        raise ConfigError(key, f"unknown {what} {name!r}; choose from {known}")
    return REGISTRY[name].task


def _first_duplicate(items: list[str]) -> int | None:
    """Position of the first item that occurs earlier in ``items`` too, or None."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item in seen:
            return i
        seen.add(item)
    return None


@dataclass
class TeacherConfig:
    """One pseudo-label teacher of the label job (an item of ``LabelConfig.teachers``)."""

    name: str = field_(help="registry name: dpt, depth_anything (depth); segformer, mask2former, oneformer (semseg)")
    task: Literal["depth", "semseg"] | None = field_(None, help="depth or semseg; null = the registry's task of `name`")
    weights: str | None = field_(None, help="save_pretrained folder or fsspec URL of one; null = tiny random weights")
    revision: str | None = field_(
        None, help="expected revision 'sha256:<hex>' of the weight files (null = any); other weights are an error")
    input_size: int | None = field_(
        None, help="short side (pixels) of the teacher's input, rounded to the model's multiple; null = the "
                   "native size its image processor declares (e.g. 384 dpt, 518 depth_anything, 512 segformer)")
    precision: Precision = field_(
        "auto", help="forward-pass precision: fp32; bf16 (bf16 autocast, the output head in fp32: fp32 maps); "
                     "bf16_full (head too: depth with an 8-bit mantissa, not recommended); auto = bf16 on "
                     "CUDA, fp32 elsewhere")
    interpolation: Interpolation = field_(
        "auto", help="resize of the image to the teacher's input: auto = its image processor's resample "
                     "(bicubic for dpt/depth_anything), bilinear or bicubic")

    def validate(self) -> None:
        """Check this teacher alone (pure); raises :class:`ConfigError` naming the field."""
        self._checked_task()

    def resolved(self) -> "TeacherConfig":
        """A validated copy with ``task`` filled in from the registry (this object is not changed).

        Raises:
            ConfigError: naming the field (see :meth:`validate`).
        """
        return dataclasses.replace(self, task=self._checked_task())

    def _checked_task(self) -> str:
        """:meth:`validate`; returns the registry task of ``name``."""
        task = _registry_task("name", self.name)
        if self.task is not None and self.task != task:
            raise ConfigError("task", f"{self.name!r} is a {task} teacher, not {self.task!r}")
        if self.revision is not None and not (self.revision.startswith("sha256:") and len(self.revision) > 7):
            raise ConfigError("revision", f"must look like 'sha256:<hex>', got {self.revision!r}")
        if self.input_size is not None and self.input_size < 32:
            raise ConfigError("input_size", f"must be >= 32 or null, got {self.input_size}")
        if self.precision not in get_args(Precision):
            raise ConfigError("precision", f"must be one of {list(get_args(Precision))}, got {self.precision!r}")
        if self.interpolation not in get_args(Interpolation):
            raise ConfigError("interpolation",
                              f"must be one of {list(get_args(Interpolation))}, got {self.interpolation!r}")
        return task


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
    teachers: list[TeacherConfig] = field_(
        [], help="the teachers, e.g. [{name: dpt, weights: /m/dpt}, {name: segformer}] (fields: name, task, "
                 "weights, revision, input_size, precision); each task's first teacher writes depth.png/semseg.png, "
                 "a further one depth.<name>.png/semseg.<name>.png; empty = the shorthand keys below")
    depth_teacher: str = field_("dpt", help="shorthand for `teachers`: depth teacher (dpt, depth_anything), a comma "
                                            "list of them (the first writes depth.png, each further one "
                                            "depth.<name>.png) or none")
    semseg_teacher: str = field_("segformer", help="shorthand for `teachers`: semseg teacher (segformer, "
                                                   "mask2former, oneformer), a comma list (first: semseg.png, "
                                                   "further: semseg.<name>.png) or none")
    depth_weights: str | None = field_(
        None, help="shorthand for `teachers`: save_pretrained folder/URL of the depth teacher, or a comma list "
                   "matching depth_teacher (an entry 'null' = tiny random); null = all tiny random")
    semseg_weights: str | None = field_(
        None, help="shorthand for `teachers`: save_pretrained folder/URL of the semseg teacher, or a comma list "
                   "matching semseg_teacher (an entry 'null' = tiny random); null = all tiny random")
    teacher_short_side: int | None = field_(
        None, help="deprecated (use teachers[i].input_size): short side (pixels) for every teacher without an "
                   "input_size of its own, instead of its native size; null = each teacher's native size")
    batch_size: int = field_(16, help="images per teacher forward pass")
    output_short_side: int | None = field_(
        None, help="short side (pixels) of the stored rgb and its labels: larger images are shrunk once "
                   "(antialiased; labels computed at each teacher's input size and resized to it: depth bilinear "
                   "+ antialias, semseg from upsampled class scores), smaller ones kept; null = the source size")
    output_max_side: int | None = field_(
        None, help="cap (pixels) on the long side of the stored rgb and its labels (both sides shrink alike); "
                   "null = no cap")
    aspect_buckets: list[float] = field_(
        list(ASPECT_BUCKETS), help="aspect ratios (width / height) of the fixed teacher input sizes images are "
                                   "bucketed into across a shard, so teacher batches are full; an image further "
                                   "than a factor max_bucket_distortion from every bucket runs at its own size; "
                                   "[] = every image at its own aspect (fewer, smaller batches)")
    num_workers: int = field_(0, help="Ray actors, each holding both teachers; 0 = one per GPU, else per cpus_per_worker CPUs")
    cpus_per_worker: int = field_(0, help="CPUs (and torch threads) per actor; 0 = the node's CPUs per GPU on "
                                          "GPUs, 1 on CPUs")
    device: Literal["auto", "cpu", "cuda"] = field_("auto", help="teacher device; auto = cuda when the cluster has GPUs")
    ray_address: str | None = field_(None, help="Ray cluster to join (e.g. ray://host:10001, auto); null = embedded local Ray")
    mode: Literal["resume", "overwrite", "extend"] = field_(
        "resume", help="resume: skip finished shards; overwrite: redo all; extend: keep shards, add new keys")
    max_pixels: int = field_(40_000_000, help="images with more pixels are skipped (reason too_large)")
    min_side: int = field_(32, help="images with a shorter side (pixels) are skipped (reason too_small)")
    max_aspect: float = field_(4.0, help="images whose long side exceeds max_aspect x their short side are "
                                         "skipped (reason too_elongated)")
    seed: int = field_(0, help="seed of the plan's shuffle and of tiny random teachers")
    read_threads: int = field_(8, help="threads reading source bytes ahead of decoding, per actor")
    decode_threads: int = field_(0, help="threads decoding images and resizing them to the teachers' input "
                                         "ahead of the teacher stage (next batches overlap the current "
                                         "forward), per actor; 0 = the actor's CPUs but one (at least 1)")
    worker_nice: int | None = field_(0, help="niceness of the labelling workers (Ray starts workers at 15, so "
                                             "any other process on the machine starves them); null keeps Ray's")
    shard_retries: int = field_(2, help="times a shard is labelled again after its worker died or it failed (a "
                                        "missing/unreadable source, a teacher or write error; retried on a fresh "
                                        "worker, each retry logged); then the run fails naming the shard")
    max_skip_fraction: float = field_(
        0.01, help="a shard whose skipped images (corrupt, not an image, too large/small, unsupported) exceed "
                   "this fraction of its images fails instead of being marked done")
    read_retries: int = field_(4, help="times a source read is retried after a transient error (timeout, "
                                       "connection reset, HTTP 429/5xx, S3 SlowDown), with exponential backoff")
    read_backoff_s: float = field_(1.0, help="seconds before the first read retry; doubled each retry (max 30 s)")
    shared_fs: bool = field_(False, help="a local (non-URL) input/output path is on a file system every Ray "
                                         "node mounts; required for local paths when the cluster has >1 node")
    placement_timeout_s: float = field_(
        300.0, help="seconds to wait for the cluster to place the label workers' resources (CPUs, GPUs) "
                    "before failing with the missing resource named")
    lease_ttl_s: float = field_(
        120.0, help="a run holds a lease on {output}/{split} (owner, host, pid, heartbeat); another run refuses "
                    "the output while the heartbeat is younger than this")
    storage_options: dict[str, dict[str, Any]] = field_(
        {}, help="fsspec options per protocol for the driver and every worker, e.g. {s3: {endpoint_url: "
                 "'http://minio:9000'}}; no credentials here (they come from the environment: AWS_*, HF_*)")
    progress: bool = field_(True, help="show a progress bar (images/s) on stderr")

    def validate(self) -> None:
        """Check values (pure: no I/O, nothing changed); raises :class:`ConfigError` naming the key."""
        if not str(self.input).strip():
            raise ConfigError("input", "is required: a folder, .txt/.parquet list or .tar shards")
        if not str(self.output).strip():
            raise ConfigError("output", "must not be empty")
        if not S.is_valid_split(self.split):
            raise ConfigError("split", f"must match [A-Za-z0-9_]+, got {self.split!r}")
        self.teacher_configs()
        if self.worker_nice is not None and not -20 <= self.worker_nice <= 19:
            raise ConfigError("worker_nice", f"must be in [-20, 19] or null, got {self.worker_nice}")
        if self.teacher_short_side is not None and self.teacher_short_side < 32:
            raise ConfigError("teacher_short_side", f"must be >= 32 or null, got {self.teacher_short_side}")
        for key in OUTPUT_POLICY_KEYS:
            if getattr(self, key) is not None and getattr(self, key) < 32:
                raise ConfigError(key, f"must be >= 32 pixels or null, got {getattr(self, key)}")
        if (self.output_short_side is not None and self.output_max_side is not None
                and self.output_max_side < self.output_short_side):
            raise ConfigError("output_max_side", f"must be >= output_short_side ({self.output_short_side}), got "
                                                 f"{self.output_max_side}")
        if any(not (isinstance(a, (int, float)) and 0.1 <= a <= 10) for a in self.aspect_buckets):
            raise ConfigError("aspect_buckets", f"must be aspect ratios (width / height) in [0.1, 10], got "
                                                f"{self.aspect_buckets}")
        if not self.max_aspect >= 1.0:
            raise ConfigError("max_aspect", f"must be >= 1 (long side / short side), got {self.max_aspect}")
        for key, low in (("samples_per_shard", 1), ("min_side", 1), ("batch_size", 1), ("num_workers", 0),
                         ("cpus_per_worker", 0), ("max_pixels", 1), ("read_threads", 1), ("decode_threads", 0),
                         ("shard_retries", 0), ("read_retries", 0), ("read_backoff_s", 0.0)):
            if getattr(self, key) < low:
                raise ConfigError(key, f"must be >= {low}, got {getattr(self, key)}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError("max_skip_fraction", f"must be in [0, 1], got {self.max_skip_fraction}")
        for key in ("placement_timeout_s", "lease_ttl_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be > 0 seconds, got {getattr(self, key)}")
        _check_storage_options(self.storage_options)

    def preflight(self) -> None:
        """Checks that read storage: every teacher's ``weights`` exists (local path or URL).

        Raises:
            ConfigError: naming the key that gives the missing weights (``teachers[i].weights`` or the
            shorthand ``depth_weights``/``semseg_weights``).
        """
        for key, t in self._teacher_entries():
            if t.weights is not None and not storage.exists(t.weights):
                raise ConfigError(key, f"{t.weights} (weights of teacher {t.name}) does not exist")

    def teacher_configs(self) -> list[TeacherConfig]:
        """The teachers as one typed list, from ``teachers`` or else from the shorthand keys: validated,
        ``task`` filled in, depth teachers before semseg ones (each task's in the given order, its first
        the primary). Pure: ``self`` is not changed.

        Raises:
            ConfigError: naming the key: an unknown or repeated teacher, a weights list of the wrong
            length, no teacher at all, or ``teachers`` given together with a shorthand key.
        """
        return [t for _, t in self._teacher_entries()]

    def _teacher_entries(self) -> list[tuple[str, TeacherConfig]]:
        """``(key naming the teacher's weights, resolved TeacherConfig)`` per teacher, in
        :meth:`teacher_configs` order: the one place that reads ``teachers`` and the shorthand keys."""
        if not self.teachers:
            return self._shorthand_entries()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in SHORTHAND_KEYS:
            if getattr(self, key) != defaults[key]:
                raise ConfigError(key, "cannot be combined with `teachers`; list every teacher there")
        entries = []
        for i, t in enumerate(self.teachers):
            try:
                entries.append((f"teachers[{i}].weights", t.resolved()))
            except ConfigError as e:
                raise ConfigError(f"teachers[{i}].{e.key}", str(e).split(": ", 1)[1]) from None
        dup = _first_duplicate([t.name for _, t in entries])
        if dup is not None:
            raise ConfigError(f"teachers[{dup}].name", f"names {entries[dup][1].name!r} twice: each teacher runs once")
        return sorted(entries, key=lambda e: TASKS.index(e[1].task))

    def _shorthand_entries(self) -> list[tuple[str, TeacherConfig]]:
        """:meth:`_teacher_entries` from ``depth_teacher``/``semseg_teacher`` and their comma lists of weights."""
        names_ = {task: _shorthand_names(f"{task}_teacher", getattr(self, f"{task}_teacher"), task) for task in TASKS}
        if not any(names_.values()):
            raise ConfigError("depth_teacher", "both teachers are 'none': nothing to label")
        entries = []
        for task in TASKS:
            wkey = f"{task}_weights"
            weights = _shorthand_weights(wkey, getattr(self, wkey), names_[task], getattr(self, f"{task}_teacher"))
            entries += [(wkey, TeacherConfig(name=n, task=task, weights=w)) for n, w in zip(names_[task], weights)]
        return entries

    def teacher_specs(self, device: str = "cpu") -> dict[str, dict]:
        """``{slot: load_teacher kwargs}`` for :meth:`teacher_configs`, in its order.

        ``slot`` (:func:`teacher_slot`) is the task (``depth``/``semseg``) for the primary teacher, which
        writes ``depth.png``/``semseg.png``, and ``{task}.{name}`` for each further one. ``short_side`` is
        the teacher's ``input_size``, else the deprecated ``teacher_short_side`` (logged once), else ``None``
        = the teacher's native size (pixels); ``device``: ``cpu``/``cuda``.
        """
        if self.teacher_short_side is not None:
            _warn_teacher_short_side(self.teacher_short_side)
        out: dict[str, dict] = {}
        for t in self.teacher_configs():
            slot = teacher_slot(t.task, t.name, primary=t.task not in out)
            out[slot] = dict(name=t.name, weights=t.weights, seed=self.seed,
                             short_side=t.input_size or self.teacher_short_side, device=device,
                             batch_size=self.batch_size, precision=t.precision, revision=t.revision,
                             interpolation=t.interpolation)
        return out

    def label_policy(self) -> dict[str, Any]:
        """The label-affecting settings of this config, the ``config`` part of the split's label fingerprint
        (``teachers.label_fingerprint``): per teacher slot its ``name``, the ``revision`` it expects,
        ``input_size`` (its own, else ``teacher_short_side``, else ``None`` = native), ``interpolation`` and
        ``precision`` as configured; the output-policy keys (:data:`OUTPUT_POLICY_KEYS`) this config has; and
        the teacher input buckets (``aspect_buckets``, :data:`MAX_BUCKET_DISTORTION`).
        Pure (no I/O)."""
        teachers = {slot: {k: spec[k] for k in ("name", "revision", "interpolation", "precision")}
                    | {"input_size": spec["short_side"]} for slot, spec in self.teacher_specs().items()}
        buckets = {"aspect_buckets": [round(float(a), 6) for a in self.aspect_buckets],
                   "max_bucket_distortion": MAX_BUCKET_DISTORTION}
        return {"teachers": teachers, **{k: getattr(self, k) for k in OUTPUT_POLICY_KEYS if hasattr(self, k)},
                **buckets}


def _check_storage_options(options: dict[str, dict[str, Any]]) -> None:
    """Check ``storage_options``: protocol names as keys, JSON-able values, and no credentials (those
    come from the environment and never land in a saved config).

    Raises:
        ConfigError: naming ``storage_options.<protocol>[.<option>]``.
    """
    import json

    for proto, opts in options.items():
        if not _PROTOCOL_RE.match(proto):
            raise ConfigError(f"storage_options.{proto}", "must be an fsspec protocol name such as s3, gcs, http")
        if not isinstance(opts, dict):
            raise ConfigError(f"storage_options.{proto}", f"must map option names to values, got {opts!r}")
        for name in opts:
            if _CREDENTIAL_RE.search(str(name)):
                raise ConfigError(f"storage_options.{proto}.{name}", "looks like a credential; give credentials "
                                  "in the environment (AWS_ACCESS_KEY_ID, ...), never in a config")
        try:
            json.dumps(opts)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"storage_options.{proto}", f"must be JSON-able: {e}") from None


def _shorthand_names(key: str, value: str, task: str) -> list[str]:
    """Teacher names of a ``depth_teacher``/``semseg_teacher`` value: ``"dpt, depth_anything"`` →
    ``["dpt", "depth_anything"]``; ``"none"`` → ``[]``.

    Raises:
        ConfigError: naming ``key``: an empty, unknown or repeated name, or ``none`` among names.
    """
    items = [v.strip() for v in str(value).split(",")]
    if items == ["none"]:
        return []
    if "" in items:
        raise ConfigError(key, f"has an empty name in {value!r}")
    if "none" in items:
        raise ConfigError(key, "'none' cannot be combined with teacher names")
    for name in items:
        _registry_task(key, name, task)
    dup = _first_duplicate(items)
    if dup is not None:
        raise ConfigError(key, f"names {items[dup]!r} twice: each teacher of a modality runs once")
    return items


def _shorthand_weights(key: str, value: str | None, names: list[str], teacher_value: str) -> list[str | None]:
    """One weights URL (or None = tiny random) per teacher in ``names`` from a ``depth_weights``/
    ``semseg_weights`` value: a comma list matching the teachers (an entry ``null`` = tiny random), or
    None for all tiny random.

    Raises:
        ConfigError: naming ``key``: set while the teacher is ``none``, or the wrong number of entries.
    """
    if value is None:
        return [None] * len(names)
    if not names:
        raise ConfigError(key, "is set but its teacher is 'none'")
    items = [w.strip() for w in str(value).split(",")]
    if len(items) != len(names):
        raise ConfigError(key, f"has {len(items)} comma-separated entries for {len(names)} teacher(s) "
                               f"{teacher_value!r}; give one per teacher ('null' = tiny random) or null for all")
    return [None if w.lower() in _NULL_WEIGHTS else w for w in items]


_WARNED_SHORT_SIDE: set[int] = set()


def _warn_teacher_short_side(value: int) -> None:
    """Log once per process that the deprecated ``teacher_short_side`` overrides the teachers' native sizes."""
    if value not in _WARNED_SHORT_SIDE:
        _WARNED_SHORT_SIDE.add(value)
        log.warning("teacher_short_side=%d is deprecated: it runs every teacher without an input_size of its own at "
                    "a %d px short side instead of its native size; set teachers[i].input_size, or leave both "
                    "null for the native sizes", value, value)


def save_label_config(cfg: LabelConfig, url: str, replace: bool = False) -> str:
    """Save the resolved, redacted config as a split's ``config.yaml`` at ``url``, never overwriting it
    silently: written when absent or ``replace`` (``mode=overwrite``); left as is when this config equals it
    (keys of :data:`RUN_ONLY_KEYS` aside); otherwise kept, and this run's config is written beside it as
    ``config.<UTC time>.yaml`` with a warning naming the keys that differ. (Label-affecting differences are
    refused before this by the label fingerprint, ``teachers.check_fingerprint``.)

    Returns:
        the URL holding this run's config.
    Raises:
        OSError: storage errors.
    """
    import time

    import yaml

    from polymae.pipeline.config import save_config, to_dict

    if replace or not storage.exists(url):
        save_config(cfg, url)
        return url
    old = yaml.safe_load(storage.read_bytes(url)) or {}
    new = _yaml_roundtrip(to_dict(cfg))
    changed = sorted(k for k in set(old) | set(new) if k not in RUN_ONLY_KEYS and old.get(k) != new.get(k))
    if not changed:
        return url
    stem = url[: -len(".yaml")] if url.endswith(".yaml") else url
    alt = f"{stem}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml"
    save_config(cfg, alt)
    log.warning("%s is kept (the config this split was first labelled with); this run's config differs in %s and "
                "is saved as %s", url, changed, alt)
    return alt


def _yaml_roundtrip(obj: Any) -> Any:
    """``obj`` as YAML reads it back (tuples become lists), for comparing a config with a saved one."""
    import yaml

    return yaml.safe_load(yaml.safe_dump(obj, sort_keys=False))
