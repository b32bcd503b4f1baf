"""Publish a training run as a release: consolidated safetensors + configs + metrics + model card + manifest.

Files (docs/ARCHITECTURE.md, "Run folder and release"), written to any fsspec URL:

* ``model.safetensors`` — the full fp32 model (consolidated from the DeepSpeed ZeRO checkpoint): a MultiMAE/MAE, or
  a multitask run's encoder + task heads (``model_config.json`` then has ``heads``, ``models/multitask.py``);
* ``encoder.safetensors`` — the encoder (of a multitask run: its shared encoder) as a timm ``VisionTransformer``
  state dict
  (``timm.create_model(name, pretrained_cfg_overlay=dict(file=...), **timm_kwargs)``);
* ``model_config.json`` (how to rebuild it; timm name and kwargs; ``source``: the run folder's base name, the tag
  and the git commit), ``config.yaml`` (the run's config), ``metrics.json`` (training rows up to the tag's step +
  evaluation results when present);
* ``README.md`` — the model card (:func:`model_card`): architecture, training data (teachers with revision and
  random-init flag, label sets, counts), recipe, metrics, how to load it, licence note;
* ``manifest.json`` — written **last**: every file with size and sha256, the git commit, the source
  checkpoint, the publishing process's PID. Each file lands atomically; a release without a manifest is
  incomplete and is not to be trusted.

**No local paths.** A release is read on other machines: every local absolute path in the staged JSON/YAML files
(the run folder, shards, evaluation outputs) is rewritten (:func:`scrub_local_paths`: the run folder becomes its
base name, any other local path ``<local>/<base name>``), then every text file is scanned for the run folder, the
home folder and the working directory (:func:`local_path_problems`); one found fails the publish before any upload.

**Retries.** Each upload (and the manifest write) is retried on transient storage errors
(``datasets/storage.py`` ``retry_transient``: timeouts, dropped connections, HTTP 429/5xx, S3 throttling); an
upload is atomic, so a retry never leaves half a file. A permanent error (access denied, a missing bucket) fails at
once with :class:`PublishError` naming the file.

:func:`verify_release` re-hashes a release against its manifest (``polymae publish --verify URL``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from polymae.pipeline.config import ConfigError, field_, redact

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CARD = "README.md"
METRICS = "metrics.json"
RUN_CONFIG = "config.yaml"
#: ``{parent of dest}/latest`` names the newest complete release when ``update_latest`` (background publishing)
LATEST = "latest"
#: the replacement of a local absolute path outside the run folder (followed by ``/<base name>``)
LOCAL = "<local>"
#: the results table's file (``pipeline/evaluate/results.py`` ``TABLE_FILE``)
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".txt")


@dataclass
class PublishConfig:
    """Everything ``polymae publish`` takes (``polymae publish --verify URL`` checks a release instead)."""

    checkpoint: str = field_("work/runs/pretrain", help="training run folder (holds checkpoints/latest)")
    tag: str = field_("", help="checkpoint tag, e.g. step-00000040 (default: latest)")
    dest: str = field_("work/store/pretrain", help="release folder: local path, file:// or s3://bucket/prefix")
    results_table: str = field_("", help="folder of the results table (polymae evaluate's results_table): its rows "
                                "for this checkpoint go into the model card ('' = none)")
    upload_attempts: int = field_(5, help="calls per upload on transient storage errors (timeouts, dropped "
                                  "connections, HTTP 429/5xx, S3 throttling); permanent errors fail at once")
    retry_backoff_s: float = field_(1.0, help="seconds before the first retry of an upload, doubled per retry "
                                    "(50-100 % jitter, at most 30 s)")
    update_latest: bool = field_(False, help="after the manifest, write this release's folder name to `latest` in "
                                 "dest's parent folder (background publishing during training)")

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: ``dest`` empty, ``upload_attempts < 1``, ``retry_backoff_s < 0`` (seconds).
        """
        if not self.dest:
            raise ConfigError("dest", "must not be empty")
        if self.upload_attempts < 1:
            raise ConfigError("upload_attempts", f"must be >= 1, got {self.upload_attempts}")
        if self.retry_backoff_s < 0:
            raise ConfigError("retry_backoff_s", f"must be >= 0 seconds, got {self.retry_backoff_s}")

    def preflight(self) -> None:
        """The run folder holds a checkpoint; raises :class:`ConfigError` naming the key."""
        if not os.path.exists(os.path.join(self.checkpoint, "checkpoints", "latest")) and not self.tag:
            raise ConfigError("checkpoint", f"{self.checkpoint!r} has no checkpoints/latest (not a training run)")


class PublishError(RuntimeError):
    """A release could not be published: a file failed to upload (the message starts with its name), or a staged
    file holds a local path."""


def git_commit() -> str | None:
    """The polymae source commit (``git rev-parse HEAD``), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _tag_step(tag: str) -> int | None:
    """``step-00000042`` -> 42 (None for another name)."""
    rest = tag.rpartition("-")[2]
    return int(rest) if rest.isdigit() else None


def run_name(checkpoint: str) -> str:
    """The base name of a run folder (``/data/runs/multimae-b/`` -> ``multimae-b``): all a release records of it."""
    return os.path.basename(os.path.abspath(checkpoint.rstrip("/"))) or "run"


def publish(cfg: PublishConfig) -> dict:
    """Consolidate, stage every file (no local paths), upload each atomically (retried on transient errors) to
    ``cfg.dest``, then the manifest (and ``latest`` with ``update_latest``). Returns the manifest.

    Raises:
        FileNotFoundError: no complete checkpoint (or no tag ``cfg.tag``) in the run folder.
        PublishError: a staged file holds a local path, or an upload failed (names the file).
    """
    from polymae import __version__
    from polymae.datasets import storage

    sd, enc_sd, mc, tag = _release_model(cfg)
    commit = git_commit()
    name = run_name(cfg.checkpoint)
    mc = dict(mc, source={"run": name, "tag": tag, "git_commit": commit})
    dest = cfg.dest.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="polymae-publish-") as stage:
        names = _stage(stage, cfg, sd, enc_sd, mc, tag)
        problems = local_path_problems(stage, names, forbidden_paths(cfg.checkpoint))
        if problems:
            raise PublishError("the release would contain local paths (nothing was uploaded): " + "; ".join(problems))
        storage.makedirs(dest)
        files = _upload(stage, names, dest, cfg)
    manifest = {
        "schema_version": 1, "kind": "polymae-release", "model": mc["name"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "polymae_version": __version__, "git_commit": commit, "publisher_pid": os.getpid(),
        "source": {"tag": tag, "run": name}, "files": files,
    }
    _retrying(lambda: storage.write_json_atomic(f"{dest}/{MANIFEST}", manifest), MANIFEST, dest, cfg)
    if cfg.update_latest:
        parent, _, base = dest.rpartition("/")
        parent = parent or "."
        _retrying(lambda: storage.write_bytes_atomic(f"{parent}/{LATEST}", f"{base}\n".encode()), LATEST, parent, cfg)
    log.info("published %s (%s) to %s", mc["name"], tag, redact(dest))
    return manifest


def _release_model(cfg: PublishConfig) -> tuple[dict, dict, dict, str]:
    """``(state dict, timm encoder state dict, model_config with "timm", tag)`` of the run's checkpoint: the
    consolidated weights loaded strictly into the rebuilt model."""
    from polymae.models.interop import encoder_to_timm
    from polymae.models.multitask import build_from_model_config, is_multitask
    from polymae.pipeline.train.checkpoint import consolidate, read_model_config

    sd, tag = consolidate(cfg.checkpoint, cfg.tag or None)
    mc = read_model_config(cfg.checkpoint)
    model = build_from_model_config(mc)  # MultiMAE/MAE, or a multitask encoder + heads
    model.load_state_dict(sd, strict=True)
    enc_sd, timm_kwargs = encoder_to_timm(model.encoder if is_multitask(mc) else model)
    return sd, enc_sd, dict(mc, timm=timm_kwargs), tag


def _stage(stage: str, cfg: PublishConfig, sd: dict, enc_sd: dict, mc: dict, tag: str) -> list[str]:
    """Write the release's files into the local folder ``stage``; returns their names in upload order (the model
    card last). JSON/YAML contents pass through :func:`scrub_local_paths`."""
    import torch
    from safetensors.torch import save_file

    from polymae.datasets import storage
    from polymae.pipeline.train.checkpoint import ENCODER_FILE, MODEL_CONFIG, MODEL_FILE

    run = cfg.checkpoint
    meta = {"format": "pt", "polymae_model": mc["name"], "tag": tag}
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(stage, MODEL_FILE), metadata=meta)
    save_file({k: v.contiguous().to(torch.float32) for k, v in enc_sd.items()},
              os.path.join(stage, ENCODER_FILE), metadata=meta)
    mc = scrub_local_paths(redact(mc), run)
    metrics = scrub_local_paths(release_metrics(run, tag), run)
    _write_json(os.path.join(stage, MODEL_CONFIG), mc)
    _write_json(os.path.join(stage, METRICS), metrics)
    names = [MODEL_FILE, ENCODER_FILE, MODEL_CONFIG, METRICS]
    run_cfg = _read_run_config(run)
    if run_cfg is not None:
        names.append(RUN_CONFIG)
        with open(os.path.join(stage, RUN_CONFIG), "w") as fh:
            fh.write(_dump_run_config(run_cfg, run))
    digests = {storage.sha256_of(os.path.join(stage, MODEL_FILE))[0], _run_digest(run, tag)}
    facts = card_facts(mc, tag, _cfg_tree(run_cfg), metrics, table_rows_for(cfg.results_table, digests), run,
                       n_params=sum(v.numel() for v in sd.values()))
    with open(os.path.join(stage, CARD), "w") as fh:
        fh.write(model_card(facts, cfg.dest))
    return names + [CARD]


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def _read_run_config(run: str) -> str | None:
    """The run folder's ``config.yaml`` text, or None when it has none."""
    path = os.path.join(run, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return fh.read()


def _cfg_tree(text: str | None) -> dict:
    """The run's config as a dict ({} when absent or unreadable)."""
    import yaml

    try:
        tree = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        log.warning("the run's config.yaml is not valid YAML (%s): the model card shows no recipe", e)
        return {}
    return tree if isinstance(tree, dict) else {}


def _dump_run_config(text: str, run: str) -> str:
    """The run's ``config.yaml`` with local paths scrubbed (re-dumped in the same key order); unparseable YAML is
    kept as text (the path scan then decides)."""
    import yaml

    tree = _cfg_tree(text)
    if not tree:
        return text
    return yaml.safe_dump(scrub_local_paths(tree, run), sort_keys=False)


def release_metrics(run: str, tag: str) -> dict:
    """``metrics.json`` of a release: ``train`` (the first and last ``metrics.jsonl`` rows up to the tag's step)
    and each ``eval-*/results.json`` of the run folder (by folder name)."""
    from polymae.pipeline.train.metrics_log import read_metrics

    step = _tag_step(tag)
    rows = [r for r in read_metrics(run) if step is None or r.get("step", 0) <= step]
    metrics: dict = {}
    if rows:
        metrics["train"] = {"first": rows[0], "last": rows[-1]}
    for name in sorted(os.listdir(run)):
        res = os.path.join(run, name, "results.json")
        if name.startswith("eval-") and os.path.exists(res):
            try:
                with open(res) as fh:
                    metrics[name] = json.load(fh)
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable %s (%s)", res, e)
    return metrics


# ----------------------------------------------------------------------------------------------- local paths
def _local_path(s: str) -> str | None:
    """The local absolute path a string names (``/a/b`` or ``file:///a/b``), else None."""
    p = s[len("file://"):] if s.startswith("file://") else s
    if not p.startswith("/") or "\n" in p or "://" in p:
        return None
    return os.path.normpath(p)


def scrub_local_paths(obj: Any, run: str) -> Any:
    """``obj`` (a JSON/YAML tree) with every string that is a local absolute path rewritten: the run folder (or a
    path inside it) as the run's base name (``/data/runs/r1/eval-val`` -> ``r1/eval-val``), any other local path as
    ``<local>/<base name>``. URLs (``s3://...``) and relative paths are kept. Returns a new tree."""
    if isinstance(obj, dict):
        return {k: scrub_local_paths(v, run) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_local_paths(v, run) for v in obj]
    if not isinstance(obj, str):
        return obj
    p = _local_path(obj)
    if p is None:
        return obj
    for root in {os.path.abspath(run), os.path.realpath(run)}:
        if p == root or p.startswith(root + "/"):
            return run_name(run) + p[len(root):]
    return f"{LOCAL}/{os.path.basename(p)}" if p != "/" else LOCAL


def forbidden_paths(run: str) -> list[str]:
    """The local paths no release file may contain: the run folder (as given, absolute and resolved), the home
    folder and the working directory (``/`` and empty ones left out), longest first."""
    found = {os.path.abspath(run.rstrip("/")), os.path.realpath(run), os.path.expanduser("~"), os.getcwd()}
    return sorted((p for p in found if len(p.rstrip("/")) > 1), key=len, reverse=True)


def local_path_problems(folder: str, names: list[str], forbidden: list[str]) -> list[str]:
    """``"<file>: contains <path>"`` for each text file (``.json``, ``.yaml``, ``.md``, ...) among ``names`` in
    ``folder`` that holds one of the ``forbidden`` paths as a path (at the start of a value, after a space, quote,
    bracket, ``=``, ``:`` or ``,``, and ending there or at ``/``), so ``/home/u`` does not match ``/home/u2``."""
    pats = [(p, re.compile(r"(?<![^\s\"'`(\[=:,])" + re.escape(p.rstrip("/")) + r"(?![^\s\"'`)\]/,:])"))
            for p in forbidden]
    problems = []
    for name in names:
        if not name.endswith(TEXT_SUFFIXES):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        problems += [f"{name}: contains the local path {p}" for p, pat in pats if pat.search(text)]
    return problems


# ----------------------------------------------------------------------------------------------- uploads
def _retrying(fn: Callable[[], Any], name: str, dest: str, cfg: PublishConfig) -> Any:
    """``fn()`` retried on transient storage errors (``storage.retry_transient``).

    Raises:
        PublishError: a permanent error, or the last transient one; the message starts with ``name``.
    """
    from polymae.datasets.storage import retry_transient

    try:
        return retry_transient(fn, attempts=cfg.upload_attempts, backoff_s=cfg.retry_backoff_s,
                               what=f"upload {name}")
    except Exception as e:  # noqa: BLE001 - re-raised, naming the file
        raise PublishError(f"{name}: upload to {redact(dest)} failed ({type(e).__name__}: {e}); transient errors "
                           f"are retried up to {cfg.upload_attempts} calls, permanent ones are not") from e


def _upload(stage: str, names: list[str], dest: str, cfg: PublishConfig) -> list[dict]:
    """Copy each staged file to ``{dest}/{name}`` atomically, retried on transient errors; returns the manifest's
    ``files`` entries (path, size, sha256)."""
    from tqdm import tqdm

    from polymae.datasets import storage

    files = []
    for name in tqdm(names, desc="publish", unit="file", disable=None):
        src, url = os.path.join(stage, name), f"{dest}/{name}"
        digest, size = _retrying(lambda: storage.copy_atomic(src, url), name, dest, cfg)
        files.append({"path": name, "size": size, "sha256": digest})
        log.info("uploaded %s (%d bytes)", name, size)
    return files


# ----------------------------------------------------------------------------------------------- model card
def _run_digest(run: str, tag: str) -> str:
    """The results table's checkpoint sha256 of a run folder at ``tag`` (``weights_digest``); "" without a marker."""
    from polymae.pipeline.train.checkpoint import weights_digest

    try:
        return weights_digest(run, tag)
    except FileNotFoundError:
        return ""


def table_rows_for(table_dir: str, digests: set[str]) -> list[dict]:
    """The results table's rows (``{table_dir}/results.parquet``) whose ``checkpoint_sha256`` is one of ``digests``
    (this tag's run-folder digest, or the release's ``model.safetensors`` sha256); [] without a table, or when it
    cannot be read (logged)."""
    from polymae.pipeline.evaluate.results import read_table

    if not table_dir:
        return []

    try:
        rows = read_table(table_dir)
    except Exception as e:  # noqa: BLE001 - a card without the table rather than no release
        log.warning("results table in %s not read (%s: %s): the model card lists no table rows", redact(table_dir),
                    type(e).__name__, e)
        return []
    return [r for r in rows if r.get("checkpoint_sha256") in digests - {""}]


def _dig(tree: dict, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _data_sources(run_cfg: dict) -> list[tuple[str, str, str]]:
    """``(label, shards root, split)`` of the labelled shards a run trained on: pretrain's ``data.shards``, a
    multitask run's ``tasks.<name>.shards``."""
    out = []
    if _dig(run_cfg, "data.shards"):
        out.append(("pre-training", str(_dig(run_cfg, "data.shards")), str(_dig(run_cfg, "data.split", "train"))))
    for name, t in (_dig(run_cfg, "tasks", {}) or {}).items():
        if isinstance(t, dict) and t.get("shards"):
            out.append((f"task {name}", str(t["shards"]), str(t.get("split") or "train")))
    return out


def _other_sources(run_cfg: dict, run: str) -> list[dict]:
    """Multitask inputs that are not labelled shards (class folders, COCO annotations): ``{"label", "what"}``."""
    out = []
    for name, t in (_dig(run_cfg, "tasks", {}) or {}).items():
        if not isinstance(t, dict) or t.get("shards"):
            continue
        parts = [f"{k} `{scrub_local_paths(redact(str(t[k])), run)}`" for k in ("folder", "annotations", "images")
                 if t.get(k)]
        out.append({"label": f"task {name}", "what": ", ".join(parts) or "unknown"})
    return out


def data_facts(run_cfg: dict, run: str) -> list[dict]:
    """Per data source: its shards manifest's teachers (name, revision, random-init flag), label sets and counts,
    local paths scrubbed; ``{"error": ...}`` (the card then says "unknown") when the manifest cannot be read."""
    from polymae.datasets import shards, storage

    out = []
    for label, root, split in _data_sources(run_cfg):
        entry: dict = {"label": label, "shards": scrub_local_paths(redact(root), run), "split": split}
        try:
            man = storage.read_json(shards.manifest_url(root, split))
        except Exception as e:  # noqa: BLE001 - the card says "unknown" rather than failing the release
            entry["error"] = f"{type(e).__name__}"
            out.append(entry)
            continue
        teachers = man.get("teachers") or {}
        entry["teachers"] = [{"slot": slot, "name": m.get("name", "unknown"), "revision": m.get("revision"),
                              "random_init": m.get("random_init")} for slot, m in teachers.items()
                             if isinstance(m, dict)]
        sets = dict(man.get("label_sets") or {})
        for m in teachers.values():  # older manifests: the label set inside the teacher entry
            if isinstance(m, dict) and m.get("label_set") and m["label_set"] not in sets:
                sets[m["label_set"]] = {"num_classes": m.get("num_classes")}
        entry["label_sets"] = {k: (v or {}).get("num_classes") for k, v in sets.items()}
        listed = man.get("shards") or []
        counts = man.get("counts") or {}
        entry["samples"] = counts.get("written", sum(int(s.get("samples", 0)) for s in listed))
        entry["num_shards"] = counts.get("shards", len(listed))
        out.append(scrub_local_paths(entry, run))
    return out


def recipe_facts(run_cfg: dict) -> list[tuple[str, Any]]:
    """``(setting, value)`` rows of the training recipe read from the run's config (those present)."""
    keys = [("steps", "train.steps"), ("global batch", "train.global_batch"), ("micro-batch", "train.micro_batch"),
            ("base lr (lr = base_lr x global batch / 256)", "optim.base_lr"), ("lr", "optim.lr"),
            ("warm-up steps", "optim.warmup_steps"), ("weight decay", "optim.weight_decay"),
            ("image size", "data.img_size"), ("image size", "img_size"), ("visible tokens", "model.num_visible"),
            ("Dirichlet alpha", "model.alpha"), ("mask ratio (MAE)", "model.mask_ratio"),
            ("ZeRO stage", "train.zero_stage"), ("precision", "train.precision"), ("seed", "train.seed")]
    rows = [(label, _dig(run_cfg, key)) for label, key in keys if _dig(run_cfg, key) is not None]
    rows = [(k, "auto (bf16 on a GPU, fp32 on CPU)" if (k, v) == ("precision", "auto") else v) for k, v in rows]
    if _dig(run_cfg, "model.arch") == "mae":
        rows = [r for r in rows if r[0] not in ("visible tokens", "Dirichlet alpha")]
    elif _dig(run_cfg, "model.arch") == "multimae":
        rows = [r for r in rows if r[0] != "mask ratio (MAE)"]
    for name, t in (_dig(run_cfg, "tasks", {}) or {}).items():
        if isinstance(t, dict):
            rows.append((f"task {name}", f"{t.get('kind')}, global batch {t.get('global_batch')}, "
                                         f"loss weight {t.get('loss_weight')}"))
    return rows


def _flat_numbers(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a results tree as ``(dotted name, value)`` (bools left out)."""
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out += _flat_numbers(v, f"{prefix}{k}.")
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return [(prefix.rstrip("."), float(tree))]
    return []


def card_facts(mc: dict, tag: str, run_cfg: dict, metrics: dict, table_rows: list[dict], run: str,
               n_params: int = 0) -> dict:
    """Everything :func:`model_card` shows, gathered from the (scrubbed) model config, the run's config, the
    release's metrics and the results table rows of this checkpoint."""
    ik = mc.get("init_kwargs", {})
    evals = {}
    for name, res in metrics.items():
        if name.startswith("eval-") and isinstance(res, dict):
            source = res.get("metrics") if isinstance(res.get("metrics"), dict) else res
            evals[name] = [(k, v) for k, v in _flat_numbers(source)
                           if k not in ("samples", "img_size") and not k.endswith(".samples")][:40]
    return {"name": mc.get("name", "model"), "run": run_name(run), "tag": tag, "step": _tag_step(tag),
            "arch": ik.get("arch", "multimae"), "init_kwargs": ik, "heads": mc.get("heads") or {},
            "timm": mc.get("timm") or {}, "n_params": n_params,
            "git_commit": (mc.get("source") or {}).get("git_commit"),
            "data": data_facts(run_cfg, run), "other_data": _other_sources(run_cfg, run),
            "recipe": recipe_facts(run_cfg),
            "train_last": (metrics.get("train") or {}).get("last"), "evals": evals,
            "table": [(r.get("protocol"), r.get("metric"), r.get("value")) for r in table_rows]}


def _code_licence() -> str:
    try:
        from importlib.metadata import metadata

        md = metadata("polymae")
        return md.get("License-Expression") or md.get("License") or "see the polymae repository"
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "see the polymae repository"


def _model_section(f: dict) -> list[str]:
    ik = f["init_kwargs"]
    img = ik.get("img_size")
    lines = ["## Model", "", "| | |", "|---|---|", f"| architecture | {f['arch']} |",
             f"| encoder | ViT, dim {ik.get('dim')}, depth {ik.get('depth')}, heads {ik.get('num_heads')}, "
             f"patch {ik.get('patch_size')} px, image {img} px, global tokens {ik.get('num_global_tokens', 1)} |",
             f"| input modalities | {', '.join(ik.get('in_modalities') or ['rgb'])} |"]
    if not f["heads"]:
        lines += [f"| output modalities | {', '.join(ik.get('out_modalities') or ik.get('in_modalities') or [])} |",
                  f"| decoder | {ik.get('decoder', 'multimae')}, dim {ik.get('decoder_dim')}, "
                  f"depth {ik.get('decoder_depth')} |"]
    else:
        heads = ", ".join(f"{t} ({h.get('kind')})" for t, h in f["heads"].items())
        lines.append(f"| multitask heads | {heads} |")
    if ik.get("semseg_num_classes"):
        lines.append(f"| semseg classes | {ik.get('semseg_num_classes')} |")
    lines += [f"| parameters | {f['n_params'] / 1e6:.2f} M |", f"| checkpoint | {f['run']} / {f['tag']} |",
              f"| polymae commit | {f['git_commit'] or 'unknown'} |", ""]
    return lines


def _data_section(f: dict) -> list[str]:
    lines = ["## Training data", ""]
    if not f["data"] and not f["other_data"]:
        return lines + ["unknown (the run's config names no labelled shards)", ""]
    for d in f["other_data"]:
        lines += [f"### {d['label']}: {d['what']} (its own labels, no teachers)", ""]
    for d in f["data"]:
        lines.append(f"### {d['label']}: `{d['shards']}` (split `{d['split']}`)")
        lines.append("")
        if "error" in d:
            lines += [f"unknown (the shards' manifest.json could not be read: {d['error']})", ""]
            continue
        lines += [f"{d['samples']} samples in {d['num_shards']} shards.", ""]
        if d["teachers"]:
            lines += ["| pseudo-label | teacher | revision | random init |", "|---|---|---|---|"]
            lines += [f"| {t['slot']} | {t['name']} | {t['revision'] or 'unknown'} | "
                      f"{'**yes**' if t['random_init'] else ('no' if t['random_init'] is False else 'unknown')} |"
                      for t in d["teachers"]]
            lines.append("")
        if d["label_sets"]:
            lines += ["Label sets: " + ", ".join(f"{k} ({v} classes)" for k, v in d["label_sets"].items()), ""]
    return lines


def _metrics_section(f: dict) -> list[str]:
    lines = ["## Metrics", ""]
    last = f["train_last"]
    if last:
        lines += [f"Training, step {last.get('step')}:", "", "| metric | value |", "|---|---:|"]
        vals = [("loss", last.get("loss"))] + [(f"loss ({k})", v) for k, v in (last.get("losses") or {}).items()]
        lines += [f"| {k} | {v:.4f} |" for k, v in vals if isinstance(v, (int, float))]
        lines.append("")
    for name, rows in f["evals"].items():
        lines += [f"Evaluation `{name}`:", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in rows] + [""]
    if f["table"]:
        lines += ["Results table (rows of this checkpoint):", "", "| protocol | metric | value |", "|---|---|---:|"]
        lines += [f"| {p} | {m} | {v:.4f} |" for p, m, v in f["table"]] + [""]
    if not (last or f["evals"] or f["table"]):
        lines += ["none recorded", ""]
    return lines


def _load_section(f: dict, where: str) -> list[str]:
    kw = dict(f["timm"])
    name = kw.pop("model_name", "vit_base_patch16_224")
    items = [f"{k}={v!r}" for k, v in kw.items()]
    args = ",\n                            ".join(", ".join(items[i:i + 4]) for i in range(0, len(items), 4))
    return ["## How to load", "", "```python", "from polymae.pipeline.train.checkpoint import load_model",
            "", f"model, model_config = load_model({where!r})  # eval mode, CPU; safetensors only", "```", "",
            "The encoder alone as a timm `VisionTransformer` (`forward_features` gives polymae's encoder tokens; "
            "`file` must be a local copy of `encoder.safetensors`):", "", "```python", "import timm", "",
            f"encoder = timm.create_model({name!r}, pretrained=True,",
            "                            pretrained_cfg_overlay=dict(file='encoder.safetensors'),",
            f"                            {args})", "```", ""]


def _licence_section(f: dict) -> list[str]:
    random = [f"{t['slot']} ({t['name']})" for d in f["data"] for t in d.get("teachers", []) if t["random_init"]]
    lines = ["## Licence", "",
             f"The polymae code is licensed under {_code_licence()}. The weights are not covered by that licence "
             "alone: they inherit the terms of the training images and of every teacher model whose pseudo-labels "
             "they were trained on (see Training data); check those licences before using or redistributing them.",
             ""]
    if random:
        lines += [f"**Warning:** teacher(s) {', '.join(random)} had random weights (`random_init`): their "
                  "pseudo-labels are noise. This release is for testing the pipeline, not for use.", ""]
    return lines


def model_card(f: dict, dest: str) -> str:
    """The release's ``README.md`` from :func:`card_facts`: model, training data (teachers with revision and
    random-init flag, label sets, counts), recipe, metrics (training, evaluations, results table), how to load it
    (polymae ``load_model``, timm ``create_model`` with ``pretrained_cfg_overlay``) and a licence note."""
    from polymae.datasets import storage

    where = redact(dest.rstrip("/")) if not storage.is_local(dest) else "path/to/release"
    step = f", step {f['step']}" if f["step"] is not None else ""
    lines = [f"# {f['name']} ({f['run']}{step})", "",
             f"A polymae release of a {f['arch']} model{' with task heads' if f['heads'] else ''}: "
             "`model.safetensors` (full fp32 model), `encoder.safetensors` (timm ViT encoder), `model_config.json`, "
             "`config.yaml`, `metrics.json`; `manifest.json` lists every file with its sha256 "
             "(`polymae publish --verify URL` checks them).", ""]
    lines += _model_section(f) + _data_section(f)
    lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in f["recipe"]] or ["| (unknown) | |"]
    lines.append("")
    lines += _metrics_section(f) + _load_section(f, where) + _licence_section(f)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- verification
def release_files(dest: str) -> list[str]:
    """Paths (relative to ``dest``) of every file under a release folder, hidden names (an interrupted local
    upload's ``.name.tmp-*``) left out; read past fsspec's listing cache."""
    from polymae.datasets import storage

    storage.invalidate_cache(dest)
    fs, root = storage.get_fs(dest)
    root = root.rstrip("/")
    out = []
    for p in fs.find(root):
        rel = p[len(root):].lstrip("/") if p.startswith(root) else p
        if rel and not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return sorted(out)


def verify_release(dest: str) -> list[str]:
    """Problems with a release, each naming its file; empty when intact: ``manifest.json`` missing (the release
    is incomplete), a listed file missing or with another size or sha256, a file present but not in the
    manifest."""
    from polymae.datasets import storage

    dest = dest.rstrip("/")
    murl = f"{dest}/{MANIFEST}"
    if not storage.exists_fresh(murl):
        return [f"{MANIFEST}: missing: {redact(dest)} is not a complete release (publish writes {MANIFEST} last, "
                f"after every other file; publish again)"]
    listed = storage.read_json(murl)["files"]
    problems = []
    for f in listed:
        url = f"{dest}/{f['path']}"
        if not storage.exists(url):
            problems.append(f"{f['path']}: missing")
            continue
        digest, size = storage.sha256_of(url)
        if (digest, size) != (f["sha256"], f["size"]):
            problems.append(f"{f['path']}: sha256/size mismatch")
    known = {f["path"] for f in listed} | {MANIFEST}
    problems += [f"{rel}: not in the manifest" for rel in release_files(dest) if rel not in known]
    return problems
