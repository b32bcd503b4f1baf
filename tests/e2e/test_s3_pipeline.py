"""Object storage across stages, end to end against a local S3 server (moto on 127.0.0.1):

1. ``polymae label`` (its own embedded Ray, tiny random-weight DPT + SegFormer teachers, scikit-image
   photographs) writes the train and val shards to ``s3://``;
2. ``polymae pretrain`` (torchrun, 1 DeepSpeed CPU rank, a tiny MultiMAE, 2 steps) streams the train shards from
   ``s3://`` into a local run folder;
3. publish uploads the release to ``s3://``;
4. evaluate reads the release and the val shards back from ``s3://``: its metrics are finite and equal those of
   the local run folder on the same shards, and the release's weights equal the run's consolidated weights.

The S3 credentials are distinctive strings here, so the test can check that none of them reaches a log, a config
written to disk (run folder, shard split, release, evaluation) or a manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

BUCKET = "polymae-e2e"
SHARDS = f"s3://{BUCKET}/shards"
RELEASE = f"s3://{BUCKET}/releases/multimae-tiny/v1"
TRAIN_PHOTOS = ["chelsea", "coffee", "rocket", "astronaut"]
VAL_PHOTOS = ["camera", "coins", "colorwheel"]
# moto accepts any credentials; these are long and unusual so that a leak cannot hide in ordinary text
ACCESS_KEY = "AKIAPOLYMAEE2E7Q4XZW"
SECRET_KEY = "pOlYmAe/e2e+Sec9ret7Kw3RqZ8vT1nLm0BxYd4"
PRETRAIN = ["data.img_size=32", "model.num_visible=4", "data.num_workers=1", "data.shuffle_buffer=4",
            "train.steps=2", "train.global_batch=2", "train.micro_batch=2"]


@pytest.fixture()
def s3_env(moto_s3, monkeypatch) -> dict:
    """The moto server's AWS_* environment with distinctive credentials, and the bucket created."""
    import s3fs

    env = dict(moto_s3, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    return env


def _run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """A job in a fresh process (INFO logs) with the S3 environment; asserts it succeeded."""
    done = subprocess.run(args, env={**os.environ, **env, "POLYMAE_LOG_LEVEL": "INFO"}, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _label(src: str, split: str, env: dict) -> subprocess.CompletedProcess:
    """``polymae label`` of the photographs in ``src`` into ``SHARDS``/``split`` (2 samples a shard)."""
    return _run([sys.executable, "-m", "polymae.jobs.label", f"input={src}", f"output={SHARDS}", f"split={split}",
                 "samples_per_shard=2", "teacher_short_side=64", "num_workers=1", "progress=false"], env)


def _pretrain(run: str, env: dict) -> subprocess.CompletedProcess:
    """``polymae pretrain`` under torchrun (1 rank) on the train shards of ``SHARDS``, into the folder ``run``."""
    from polymae.pipeline.train.distributed import free_port

    return _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
                 f"--master_port={free_port()}", "-m", "polymae.jobs.pretrain", f"data.shards={SHARDS}",
                 f"output={run}", *PRETRAIN], {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


def _leaks(blobs: dict[str, bytes]) -> list[str]:
    """Names of the blobs that hold a credential."""
    return sorted(name for name, data in blobs.items()
                  if any(s.encode() in data for s in (SECRET_KEY, ACCESS_KEY)))


def _finite(tree) -> bool:
    """True when every float in a nested dict is finite."""
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    return not isinstance(tree, float) or math.isfinite(tree)


def _metrics(res: dict) -> dict:
    """The measured part of evaluate's results (not the paths)."""
    return {k: res[k] for k in ("samples", "reconstruction_loss", "rgb_to_depth", "rgb_to_semseg")}


def test_label_pretrain_publish_evaluate_through_s3(s3_env, tmp_path, photo_writer, caplog, capsys, monkeypatch):
    import s3fs
    import torch

    from polymae.datasets import shards as S
    from polymae.datasets import storage
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate
    from polymae.pipeline.publish import PublishConfig, publish, verify_release
    from polymae.pipeline.train.checkpoint import consolidate, load_model
    from polymae.pipeline.train.metrics_log import read_metrics

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)  # the jobs run here: a URL mistaken for a local path would create ./s3:
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    logs: dict[str, bytes] = {}
    # 1. label: local photographs -> shards on s3://
    for split, names in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS)):
        photo_writer(tmp_path / "photos" / split, names)
        done = _label(str(tmp_path / "photos" / split), split, s3_env)
        logs[f"label {split}"] = (done.stdout + done.stderr).encode()
        manifest = json.loads(fs.cat_file(f"{BUCKET}/shards/{split}/manifest.json"))
        assert manifest["counts"]["written"] == len(names) and len(manifest["shards"]) == -(-len(names) // 2)
        urls = S.trusted_shard_urls(SHARDS, split)
        assert len(urls) == len(manifest["shards"]) and all(u.startswith(f"{SHARDS}/{split}/") for u in urls)

    # 2. pretrain streams the train shards from s3:// (the run folder is local)
    run = str(tmp_path / "run")
    done = _pretrain(run, s3_env)
    logs["pretrain"] = (done.stdout + done.stderr).encode()
    assert b"corrupt sample" not in logs["pretrain"] and b"cannot read" not in logs["pretrain"]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(run, "config.yaml")) as fh:
        assert f"shards: {SHARDS}" in fh.read()

    # 3. publish to s3://
    man = publish(load_config(PublishConfig, overrides=[f"checkpoint={run}", f"dest={RELEASE}"]))
    assert verify_release(RELEASE) == []
    assert {f["path"] for f in man["files"]} >= {"model.safetensors", "encoder.safetensors", "config.yaml"}

    # 4. evaluate the release from s3:// on the val shards from s3://, and the local run folder likewise
    model, _ = load_model(RELEASE)
    sd, _ = consolidate(run)
    assert model.state_dict().keys() == sd.keys() and all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    common = [f"shards={SHARDS}", "split=val", "batch_size=2"]
    remote = evaluate(load_config(EvaluateConfig, overrides=[f"checkpoint={RELEASE}", *common,
                                                             f"output=s3://{BUCKET}/evals/v1-val"]))
    local = evaluate(load_config(EvaluateConfig, overrides=[f"checkpoint={run}", *common]))
    assert remote["samples"] == len(VAL_PHOTOS) and _finite(_metrics(remote))
    assert _metrics(remote) == _metrics(local)
    # the val shards read from s3:// give what a local copy of them gives
    fs.get(f"{BUCKET}/shards/val/", str(tmp_path / "shards" / "val"), recursive=True)
    copy = evaluate(load_config(EvaluateConfig, overrides=[f"checkpoint={run}", f"shards={tmp_path / 'shards'}",
                                                           "split=val", "batch_size=2",
                                                           f"output={tmp_path / 'eval-local-shards'}"]))
    assert _metrics(copy) == _metrics(local)
    assert remote["output"] == f"s3://{BUCKET}/evals/v1-val" and local["output"] == f"{run}/eval-val"
    assert storage.read_json(f"s3://{BUCKET}/evals/v1-val/results.json")["reconstruction_loss"] == \
        remote["reconstruction_loss"]
    assert verify_release(RELEASE) == []  # evaluating a release leaves it as published

    assert not (tmp_path / "s3:").exists()  # no URL was taken for a local path

    # credentials: in no log, config, manifest or other file written here (run folder, evaluations) or to the bucket
    out = capsys.readouterr()
    logs["this process"] = (out.out + out.err + caplog.text).encode()
    files = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "moto.log"}
    objects = {key: fs.cat_file(key) for key in fs.find(BUCKET)}
    release = RELEASE.removeprefix("s3://")
    assert {f"{BUCKET}/shards/{s}/{f}" for s in ("train", "val") for f in ("config.yaml", "manifest.json")} | {
        f"{release}/{f}" for f in ("config.yaml", "manifest.json")} | {f"{BUCKET}/evals/v1-val/config.yaml"} <= set(objects)
    assert {f"{run}/config.yaml", f"{run}/model_config.json", f"{run}/eval-val/config.yaml"} <= set(files)
    assert all(BUCKET.encode() in text for job, text in logs.items() if job != "pretrain")  # the logs are scanned
    assert _leaks(logs) == [] and _leaks(files) == [] and _leaks(objects) == []
