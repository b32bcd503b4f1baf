"""``polymae quickstart``: the whole pipeline on one machine, on real photographs, in a few minutes.

label (embedded Ray, tiny random-weight DPT + SegFormer teachers) → pretrain (MultiMAE ViT-Tiny,
DeepSpeed ZeRO-2, 2 CPU ranks via torchrun) → multitask (depth + semseg + classification heads on the pre-trained
encoder, unmixed sampling with MT-AdamW; the classes of the photographs from :data:`PHOTO_CLASSES`) → evaluate
(held-out split) → downstream (both checkpoints through the linear-probe, depth and semseg protocols on small
scikit-image datasets, compared in the results table) → publish (local folder store).
By default the images are the photographs that scikit-image ships, copied into ``{work}/images`` at run
time; ``--images DIR`` uses your own folder (every 5th image, sorted, is held out for evaluation).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import yaml

from polymae.jobs.common import run_job
from polymae.pipeline.config import ConfigError, field_, save_config

log = logging.getLogger("polymae.quickstart")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Real photographs shipped inside scikit-image (no download): (file in skimage/data, split).
SKIMAGE_PHOTOS = [
    ("astronaut.png", "train"), ("chelsea.png", "train"), ("rocket.jpg", "train"),
    ("motorcycle_left.png", "train"), ("hubble_deep_field.jpg", "train"), ("retina.jpg", "train"),
    ("ihc.png", "train"), ("coins.png", "train"), ("moon.png", "train"), ("brick.png", "train"),
    ("grass.png", "train"), ("gravel.png", "train"),
    ("coffee.png", "val"), ("motorcycle_right.png", "val"), ("camera.png", "val"),
]

#: a small hand-written label file: the class of each scikit-image photograph, for the multitask classification task
PHOTO_CLASSES = {
    "astronaut": "person", "camera": "person", "chelsea": "animal", "coffee": "object", "rocket": "object",
    "coins": "object", "motorcycle_left": "object", "motorcycle_right": "object", "hubble_deep_field": "sky",
    "moon": "sky", "retina": "microscopy", "ihc": "microscopy", "brick": "texture", "grass": "texture",
    "gravel": "texture"}


@dataclass
class QuickstartConfig:
    """Everything ``polymae quickstart`` takes."""

    work: str = field_("work/quickstart", help="folder for every output (images, shards, run, store)")
    images: str = field_("", help="your own image folder (default: the scikit-image photographs)")
    steps: int = field_(40, help="pre-training steps")
    img_size: int = field_(128, help="pre-training resolution (pixels, multiple of 16)")
    preset: str = field_("tiny", help="ViT preset")
    ranks: int = field_(2, help="DeepSpeed ranks (processes) on this machine")
    micro_batch: int = field_(4, help="samples per rank per step")
    zero_stage: int = field_(2, help="ZeRO stage")
    num_visible: int = field_(48, help="visible tokens per sample (of 3 x (img_size/16)^2)")
    base_lr: float = field_(1.5e-3, help="base learning rate (x global batch / 256)")
    multitask_steps: int = field_(24, help="multitask steps (depth + semseg + classification heads on the "
                                  "pre-trained encoder; 0 = skip the stage)")
    downstream: bool = field_(True, help="run the pre-trained and multitask checkpoints through the linear probe "
                              "(lfw faces), depth (Middlebury motorcycle) and semseg (horse) protocols and compare "
                              "them in the results table")
    samples_per_shard: int = field_(4, help="samples per shard (small, to exercise multi-shard reading)")
    dest: str = field_("", help="publish destination (default {work}/store/multimae-quickstart)")

    def validate(self) -> None:
        if self.images and not os.path.isdir(self.images):
            raise ConfigError("images", f"{self.images!r} is not a folder")
        if self.steps < 1 or self.ranks < 1 or self.micro_batch < 1:
            raise ConfigError("steps" if self.steps < 1 else "ranks" if self.ranks < 1 else "micro_batch", "must be >= 1")
        if self.img_size % 16:
            raise ConfigError("img_size", "must be a multiple of 16")


def prepare_images(cfg: QuickstartConfig) -> dict[str, list[str]]:
    """Fill ``{work}/images/{train,val}``; returns the source file names per split."""
    root = os.path.join(cfg.work, "images")
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, list[str]] = {"train": [], "val": []}
    if cfg.images:
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(cfg.images) for f in fs
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if len(files) < 2:
            raise ConfigError("images", f"{cfg.images!r} holds {len(files)} images; need at least 2")
        pairs = [(f, "val" if i % 5 == 4 else "train") for i, f in enumerate(files)]
    else:
        import skimage.data

        base = os.path.dirname(skimage.data.__file__)
        pairs = [(os.path.join(base, name), split) for name, split in SKIMAGE_PHOTOS]
    for src, split in pairs:
        d = os.path.join(root, split)
        os.makedirs(d, exist_ok=True)
        rel = os.path.relpath(src, cfg.images) if cfg.images else os.path.basename(src)
        name = rel.replace(os.sep, "__")
        shutil.copyfile(src, os.path.join(d, name))
        out[split].append(name)
    return out


def _pretrain_config(cfg: QuickstartConfig, shards: str, run: str) -> dict:
    return {
        "output": run,
        "data": {"shards": shards, "split": "train", "img_size": cfg.img_size, "num_workers": 1,
                 "shuffle_buffer": 32},
        "model": {"arch": "multimae", "preset": cfg.preset, "num_visible": cfg.num_visible},
        "optim": {"base_lr": cfg.base_lr, "warmup_steps": max(1, cfg.steps // 10)},
        "train": {"steps": cfg.steps, "global_batch": cfg.micro_batch * cfg.ranks, "micro_batch": cfg.micro_batch,
                  "zero_stage": cfg.zero_stage, "save_interval": max(1, cfg.steps // 2), "keep_last": 2},
    }


def prepare_class_folders(work: str, sources: dict[str, list[str]]) -> dict[str, str]:
    """``{work}/classes/{split}/{class}/{image}`` (ImageNet-style folders) for the photographs named in
    :data:`PHOTO_CLASSES`; returns ``{split: folder}`` for the splits that got at least one image."""
    out = {}
    for split, names in sources.items():
        root = os.path.join(work, "classes", split)
        shutil.rmtree(root, ignore_errors=True)
        for name in names:
            cls = PHOTO_CLASSES.get(os.path.splitext(name)[0])
            if cls:
                os.makedirs(os.path.join(root, cls), exist_ok=True)
                shutil.copyfile(os.path.join(work, "images", split, name), os.path.join(root, cls, name))
                out[split] = root
    return out


def _multitask_config(cfg: QuickstartConfig, shards: str, encoder: str, run: str, classes: str | None) -> dict:
    """The multitask stage's config: depth + semseg on the train shards, classification on ``classes`` (if any)."""
    batch = {"micro_batch": 2, "global_batch": 2 * cfg.ranks}
    tasks: dict = {"depth": {"kind": "depth", "shards": shards, "head_width": 64, "sampling_weight": 0.4, **batch},
                   "semseg": {"kind": "semseg", "shards": shards, "head_width": 64, "head_depth": 1,
                              "sampling_weight": 0.35, **batch}}
    if classes:
        tasks["cls"] = {"kind": "cls", "folder": classes, "sampling_weight": 0.25, **batch}
    return {"output": run, "encoder": encoder, "img_size": cfg.img_size, "tasks": tasks,
            "optim": {"lr": 1e-3, "warmup_steps": 2, "encoder_lr_mult": 0.1, "min_lr": 1e-5},
            "train": {"steps": cfg.multitask_steps, "zero_stage": cfg.zero_stage, "num_workers": 0,
                      "shuffle_buffer": 32, "save_interval": cfg.multitask_steps}}


def _torchrun(cfg: QuickstartConfig, job: str, config_path: str) -> None:
    """Run ``polymae.jobs.<job> --config config_path`` on ``cfg.ranks`` local ranks.

    Raises:
        RuntimeError: the job failed (its exit status).
    """
    from polymae.pipeline.train.distributed import free_port

    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cfg.ranks))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={cfg.ranks}",
           f"--master_port={free_port()}", "-m", f"polymae.jobs.{job}", "--config", config_path]
    log.info("%s: %s", job, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed with exit status {proc.returncode}")


def run_multitask_stage(cfg: QuickstartConfig, work: str, shards: str, encoder: str, sources: dict) -> dict:
    """The multitask stage: heads for depth, semseg and classification (classes from :data:`PHOTO_CLASSES`) on the
    pre-trained encoder, then their held-out evaluation. Returns ``{"run", "losses": {task: [losses in order]},
    "evaluate": results}``."""
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate
    from polymae.pipeline.train.metrics_log import read_metrics

    run = os.path.join(work, "runs", "multitask-quickstart")
    shutil.rmtree(run, ignore_errors=True)
    classes = prepare_class_folders(work, sources)
    path = os.path.join(work, "multitask.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(_multitask_config(cfg, shards, encoder, run, classes.get("train")), fh, sort_keys=False)
    _torchrun(cfg, "multitask", path)
    losses: dict[str, list[float]] = {}
    for row in read_metrics(run):
        for task, v in row["losses"].items():
            losses.setdefault(task, []).append(v)
    ecfg = load_config(EvaluateConfig, overrides=[f"checkpoint={run}", f"shards={shards}", "split=val",
                                                  f"class_folder={classes.get('val', '')}",
                                                  f"results_table={os.path.join(work, 'results')}"])
    return {"run": run, "losses": losses, "evaluate": evaluate(ecfg)}


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run all four stages; returns a summary dict (paths, counts, losses, metrics, seconds per stage)."""
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate
    from polymae.pipeline.label.driver import LabelConfig, run_label
    from polymae.pipeline.config import load_config
    from polymae.pipeline.train.metrics_log import read_metrics
    from polymae.pipeline.publish import PublishConfig, publish

    t_all = time.perf_counter()
    work = os.path.abspath(cfg.work)
    cfg.work = work
    os.makedirs(work, exist_ok=True)
    save_config(cfg, os.path.join(work, "quickstart.yaml"))
    shards_root = os.path.join(work, "shards")
    run_dir = os.path.join(work, "runs", "multimae-quickstart")
    dest = cfg.dest or os.path.join(work, "store", "multimae-quickstart")
    seconds: dict[str, float] = {}
    summary: dict = {"work": work, "shards": shards_root, "run": run_dir, "release": dest}

    t = time.perf_counter()
    sources = prepare_images(cfg)
    summary["images"] = sources
    label_summaries = {}
    for split in ("train", "val"):
        lcfg = load_config(LabelConfig, base={"teachers": [{"name": "dpt"}, {"name": "segformer"}]}, overrides=[
            f"input={os.path.join(work, 'images', split)}", f"output={shards_root}", f"split={split}",
            f"samples_per_shard={cfg.samples_per_shard}", "mode=overwrite"])
        label_summaries[split] = run_label(lcfg)
    seconds["label"] = time.perf_counter() - t
    summary["label"] = label_summaries

    t = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    pcfg_path = os.path.join(work, "pretrain.yaml")
    with open(pcfg_path, "w") as fh:
        yaml.safe_dump(_pretrain_config(cfg, shards_root, run_dir), fh, sort_keys=False)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cfg.ranks))))
    from polymae.pipeline.train.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={cfg.ranks}",
           f"--master_port={free_port()}", "-m", "polymae.jobs.pretrain", "--config", pcfg_path]
    log.info("pretrain: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain failed with exit status {proc.returncode}")
    seconds["pretrain"] = time.perf_counter() - t
    rows = read_metrics(run_dir)
    summary["loss_first"] = rows[0]["loss"] if rows else None
    summary["loss_last"] = rows[-1]["loss"] if rows else None
    summary["steps"] = rows[-1]["step"] if rows else 0

    if cfg.multitask_steps:
        t = time.perf_counter()
        summary["multitask"] = run_multitask_stage(cfg, work, shards_root, run_dir, sources)
        seconds["multitask"] = time.perf_counter() - t

    t = time.perf_counter()
    ecfg = load_config(EvaluateConfig, overrides=[f"checkpoint={run_dir}", f"shards={shards_root}", "split=val",
                                                  f"results_table={os.path.join(work, 'results')}"])
    summary["evaluate"] = evaluate(ecfg)
    seconds["evaluate"] = time.perf_counter() - t

    if cfg.downstream:
        from polymae.jobs.quickstart_downstream import run_downstream_stage

        t = time.perf_counter()
        ckpts = {"pretrain": run_dir, **({"multitask": summary["multitask"]["run"]} if "multitask" in summary else {})}
        summary["downstream"] = run_downstream_stage(work, ckpts)
        seconds["downstream"] = time.perf_counter() - t

    t = time.perf_counter()
    pub = load_config(PublishConfig, overrides=[f"checkpoint={run_dir}", f"dest={dest}",
                                                f"results_table={os.path.join(work, 'results')}"])
    summary["manifest"] = publish(pub)
    seconds["publish"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    summary["seconds"] = seconds
    print_summary(summary)
    return summary


def print_summary(s: dict) -> None:
    """Print the quickstart summary table (stage, result, output, seconds)."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="polymae quickstart")
    t.add_column("stage")
    t.add_column("result")
    t.add_column("output", overflow="fold")
    t.add_column("seconds", justify="right")
    lab = s["label"]
    written = sum(v.get("written", 0) for v in lab.values())
    skipped = sum(v.get("skipped", 0) for v in lab.values())
    nshards = sum(v.get("shards", 0) for v in lab.values())
    t.add_row("label", f"{written} samples in {nshards} shards ({skipped} skipped)", s["shards"],
              f"{s['seconds']['label']:.1f}")
    t.add_row("pretrain", f"{s['steps']} steps, loss {s['loss_first']:.4f} → {s['loss_last']:.4f}", s["run"],
              f"{s['seconds']['pretrain']:.1f}")
    if "multitask" in s:
        mt = s["multitask"]
        parts = [f"{task} {v[0]:.3f} → {v[-1]:.3f}" for task, v in mt["losses"].items()]
        t.add_row("multitask", "losses " + ", ".join(parts), mt["run"], f"{s['seconds']['multitask']:.1f}")
    ev = s["evaluate"]
    parts = [f"rec {m} {v:.3f}" for m, v in ev["reconstruction_loss"].items()]
    if "rgb_to_depth" in ev:
        parts.append(f"δ1 {ev['rgb_to_depth']['delta1']:.3f}")
    if "rgb_to_semseg" in ev:
        parts.append(f"mIoU {ev['rgb_to_semseg']['miou']:.3f}")
    t.add_row("evaluate", ", ".join(parts), ev["output"], f"{s['seconds']['evaluate']:.1f}")
    if "downstream" in s:
        parts = []
        for label, per in s["downstream"]["metrics"].items():
            parts.append(f"{label}: probe top-1 {per['linear_probe']['top1']:.2f}, δ1 {per['depth']['delta1@rgb']:.2f}, "
                         f"mIoU {per['semseg']['miou@rgb']:.2f}")
        t.add_row("downstream", "; ".join(parts), s["downstream"]["table"], f"{s['seconds']['downstream']:.1f}")
    files = s["manifest"]["files"]
    t.add_row("publish", f"{len(files)} files + manifest.json ({sum(f['size'] for f in files) / 2**20:.1f} MiB)",
              s["release"], f"{s['seconds']['publish']:.1f}")
    t.add_row("total", "", s["work"], f"{s['seconds']['total']:.1f}")
    con.print(t)
    # full paths on their own lines, so a narrow terminal never truncates them
    print("outputs:")
    for what, path in (("images", os.path.join(s["work"], "images")), ("shards", s["shards"]), ("run", s["run"]),
                       ("checkpoints", os.path.join(s["run"], "checkpoints")), ("tensorboard", os.path.join(s["run"], "tb")),
                       ("evaluation", ev["output"]), ("results", os.path.join(s["work"], "results")),
                       ("release", s["release"])):
        print(f"  {what:<12} {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae quickstart``; returns the exit status (2 on a config error)."""
    return run_job(QuickstartConfig, run_quickstart, argv, prog="polymae quickstart", doc=__doc__,
                   flag_map={"images_flag": "images", "work_flag": "work"},
                   extra=lambda p: (p.add_argument("--images", dest="images_flag", default=None,
                                                   help="your own image folder (same as images=DIR)"),
                                    p.add_argument("--work", dest="work_flag", default=None,
                                                   help="output folder (same as work=DIR)")))


if __name__ == "__main__":
    raise SystemExit(main())
