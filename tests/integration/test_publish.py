"""publish to a real S3 endpoint (moto server on 127.0.0.1): atomic files, manifest last, loadable from s3://."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory):
    """A 2-step single-process DeepSpeed run on the synthetic shards."""
    run = str(tmp_path_factory.mktemp("run"))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", POLYMAE_LOG_LEVEL="WARNING")
    r = subprocess.run([sys.executable, "-m", "polymae.jobs.pretrain", f"data.shards={synthetic_shards}",
                        f"output={run}", "data.img_size=32", "model.num_visible=4", "data.num_workers=0",
                        "train.steps=2", "train.global_batch=2", "train.micro_batch=2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return run


def test_publish_to_s3_then_evaluate_from_s3(trained_run, moto_s3, synthetic_shards):
    import boto3
    import torch

    from polymae.pipeline.train.checkpoint import consolidate, load_model
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate
    from polymae.pipeline.publish import PublishConfig, publish, verify_release

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    dest = "s3://models/multimae-tiny/v1"
    man = publish(load_config(PublishConfig, overrides=[f"checkpoint={trained_run}", f"dest={dest}"]))
    objs = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="models")["Contents"]}
    for f in man["files"]:
        assert objs[f"multimae-tiny/v1/{f['path']}"] == f["size"]
    assert "multimae-tiny/v1/manifest.json" in objs
    assert not [k for k in objs if ".tmp" in k]  # no temporary objects left behind
    assert verify_release(dest) == []
    body = s3.get_object(Bucket="models", Key="multimae-tiny/v1/manifest.json")["Body"].read().decode()
    assert moto_s3["AWS_SECRET_ACCESS_KEY"] not in body and "testing" not in json.dumps(json.loads(body)["source"])

    model, _ = load_model(dest)  # safetensors read back from s3://
    sd, _ = consolidate(trained_run)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    res = evaluate(load_config(EvaluateConfig, overrides=[f"checkpoint={dest}", f"shards={synthetic_shards}",
                                                          "split=val", f"output={trained_run}/eval-s3"]))
    assert res["samples"] == 3 and set(res["reconstruction_loss"]) == {"rgb", "depth", "semseg"}

    # one flipped byte in the stored release: `polymae publish --verify` fails and names the file
    from polymae.jobs.cli import main as cli

    assert cli(["publish", "--verify", dest]) == 0
    key = "multimae-tiny/v1/encoder.safetensors"
    data = bytearray(s3.get_object(Bucket="models", Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3.put_object(Bucket="models", Key=key, Body=bytes(data))
    assert cli(["publish", "--verify", dest]) == 1
    problems = verify_release(dest)
    assert len(problems) == 1 and problems[0].startswith("encoder.safetensors")


def test_publish_config_errors_name_the_key(tmp_path):
    from polymae.pipeline.config import ConfigError, load_config
    from polymae.pipeline.publish import PublishConfig

    with pytest.raises(ConfigError) as e:
        load_config(PublishConfig, overrides=[f"checkpoint={tmp_path}"])
    assert e.value.key == "checkpoint"


# ----------------------------------------------------------------------------------------------------------------
# model card, no local paths, --verify, retries (the same 2-step run, published locally or to a test filesystem)
RICH_MANIFEST = {
    "schema_version": 1, "split": "train", "counts": {"samples_in": 8, "written": 7, "shards": 3},
    "teachers": {"depth": {"name": "depth-anything-small", "task": "depth", "revision": "d3f4a5b", "random_init": False,
                           "source": "/opt/teachers/depth-anything-small"},
                 "semseg": {"name": "tiny-segformer", "task": "semseg", "revision": "0c1d2e3", "random_init": True,
                            "label_set": "ade20k", "num_classes": 150, "ignore_index": 255}},
    "label_sets": {"ade20k": {"num_classes": 150, "ignore_index": 255, "teacher": "tiny-segformer"}},
    "shards": [{"index": i, "samples": n} for i, n in enumerate((3, 3, 1))],
}


def _run_copy(trained_run: str, folder, shards: str = "") -> str:
    """A run folder at ``folder`` sharing ``trained_run``'s checkpoints (symlink), with its own config.yaml (data.shards
    = ``shards`` when given), model_config.json and metrics.jsonl."""
    import shutil

    import yaml

    run = str(folder)
    os.makedirs(run)
    os.symlink(os.path.join(trained_run, "checkpoints"), os.path.join(run, "checkpoints"))
    for name in ("model_config.json", "metrics.jsonl"):
        shutil.copy(os.path.join(trained_run, name), os.path.join(run, name))
    cfg = yaml.safe_load(open(os.path.join(trained_run, "config.yaml")))
    cfg["output"] = run
    if shards:
        cfg["data"]["shards"] = shards
    with open(os.path.join(run, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return run


@pytest.fixture(scope="module")
def carded(trained_run, tmp_path_factory):
    """A run (copy) with teachers in its shards' manifest, an evaluation and a results table, published locally."""
    from polymae.datasets import storage
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.results import append_table
    from polymae.pipeline.publish import PublishConfig, publish
    from polymae.pipeline.train.checkpoint import weights_digest

    base = tmp_path_factory.mktemp("carded")
    shards = str(base / "rich_shards")
    storage.makedirs(f"{shards}/train")
    storage.write_json_atomic(f"{shards}/train/manifest.json", dict(RICH_MANIFEST, root=shards))
    run = _run_copy(trained_run, base / "run-card", shards)
    os.makedirs(os.path.join(run, "eval-val"))
    with open(os.path.join(run, "eval-val", "results.json"), "w") as fh:  # what evaluate records: absolute paths
        json.dump({"checkpoint": run, "shards": shards, "output": os.path.join(run, "eval-val"), "samples": 3,
                   "rgb_to_depth": {"delta1": 0.5, "abs_rel": 0.25}}, fh)
    row = {"protocol": "linear_probe", "dataset": shards, "dataset_fingerprint": "f", "created": "now"}
    table = str(base / "table")
    append_table(table, [dict(row, checkpoint=run, checkpoint_sha256=weights_digest(run), metric="top1", value=0.625),
                         dict(row, checkpoint="other", checkpoint_sha256="0" * 64, metric="top1", value=0.875)])
    dest = str(base / "release")
    man = publish(load_config(PublishConfig, overrides=[f"checkpoint={run}", f"dest={dest}",
                                                        f"results_table={table}"]))
    return run, dest, man, str(tmp_path_factory.getbasetemp())


def test_model_card_lists_model_data_recipe_metrics_loading_and_licence(carded):
    import hashlib

    from polymae.pipeline.publish import verify_release
    from polymae.pipeline.train.metrics_log import read_metrics

    run, dest, man, _ = carded
    card = open(os.path.join(dest, "README.md")).read()
    entry = {f["path"]: f for f in man["files"]}["README.md"]
    assert hashlib.sha256(card.encode()).hexdigest() == entry["sha256"] and verify_release(dest) == []
    assert [f["path"] for f in man["files"]][-1] == "README.md"  # uploaded last of the files, before the manifest
    assert card.startswith("# multimae_tiny (run-card, step 2)")
    assert "ViT, dim 192, depth 12, heads 3, patch 16 px, image 32 px" in card
    assert "| input modalities | rgb, depth, semseg |" in card
    assert "7 samples in 3 shards." in card and "ade20k (150 classes)" in card
    assert "| depth | depth-anything-small | d3f4a5b | no |" in card
    assert "| semseg | tiny-segformer | 0c1d2e3 | **yes** |" in card
    assert "teacher(s) semseg (tiny-segformer) had random weights" in card
    for line in ("| steps | 2 |", "| global batch | 2 |", "| visible tokens | 4 |", "| ZeRO stage | 2 |"):
        assert line in card, line
    last = read_metrics(run)[-1]
    assert f"Training, step {last['step']}:" in card and f"| loss | {last['loss']:.4f} |" in card
    assert "| rgb_to_depth.delta1 | 0.5000 |" in card and "| rgb_to_depth.abs_rel | 0.2500 |" in card
    assert "| linear_probe | top1 | 0.6250 |" in card and "0.8750" not in card  # only this checkpoint's rows
    assert "load_model('path/to/release')" in card and "pretrained_cfg_overlay=dict(file='encoder.safetensors')" in card
    assert "Apache-2.0" in card and "inherit the terms of the training images" in card


def test_no_local_paths_in_a_release(carded):
    run, dest, man, basetemp = carded
    names = sorted(os.listdir(dest))
    assert names == sorted([f["path"] for f in man["files"]] + ["manifest.json"])
    for name in names:  # text and binary files alike
        data = open(os.path.join(dest, name), "rb").read()
        for path in (run, os.path.realpath(run), basetemp, os.path.expanduser("~"), os.getcwd()):
            assert path.encode() not in data, (name, path)
    mc = json.load(open(os.path.join(dest, "model_config.json")))
    assert mc["source"]["run"] == "run-card" and mc["source"]["tag"] == "step-00000002"
    assert set(mc["source"]) == {"run", "tag", "git_commit"}
    metrics = json.load(open(os.path.join(dest, "metrics.json")))
    assert metrics["eval-val"]["checkpoint"] == "run-card" and metrics["eval-val"]["output"] == "run-card/eval-val"
    assert metrics["eval-val"]["shards"] == "<local>/rich_shards"
    assert "output: run-card\n" in open(os.path.join(dest, "config.yaml")).read()
    assert man["publisher_pid"] == os.getpid()


def test_a_local_path_left_in_free_text_fails_the_publish_before_any_upload(trained_run, tmp_path):
    from polymae.pipeline.config import load_config
    from polymae.pipeline.publish import PublishConfig, PublishError, local_path_problems, publish

    (tmp_path / "a.json").write_text('{"note": "trained in /home/u/run0 yesterday", "other": "/home/u/run01"}')
    (tmp_path / "b.yaml").write_text("x: /home/u/run01/ok\n")
    assert local_path_problems(str(tmp_path), ["a.json", "b.yaml", "c.bin"], ["/home/u/run0"]) == [
        "a.json: contains the local path /home/u/run0"]
    run = _run_copy(trained_run, tmp_path / "run-note")
    with open(os.path.join(run, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": 1, "loss": 1.0, "note": f"written by {run} on purpose"}) + "\n")
    dest = tmp_path / "release"
    with pytest.raises(PublishError, match=r"metrics\.json: contains the local path") as e:
        publish(load_config(PublishConfig, overrides=[f"checkpoint={run}", f"dest={dest}"]))
    assert "nothing was uploaded" in str(e.value) and not dest.exists()


def test_verify_names_every_changed_missing_and_extra_file(carded, tmp_path, capsys):
    import shutil

    from polymae.jobs.cli import main as cli

    _, dest, _, _ = carded
    rel = str(tmp_path / "release")
    shutil.copytree(dest, rel)
    assert cli(["publish", "--verify", rel]) == 0
    assert "intact" in capsys.readouterr().out
    with open(os.path.join(rel, "metrics.json"), "a") as fh:
        fh.write(" ")
    os.remove(os.path.join(rel, "encoder.safetensors"))
    os.makedirs(os.path.join(rel, "extra"))
    open(os.path.join(rel, "extra", "notes.txt"), "w").write("x")
    assert cli(["publish", "--verify", rel]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{rel}: encoder.safetensors: missing", f"{rel}: metrics.json: sha256/size mismatch",
                   f"{rel}: extra/notes.txt: not in the manifest"]
    os.remove(os.path.join(rel, "manifest.json"))
    assert cli(["publish", "--verify", rel]) == 1
    out = capsys.readouterr().out
    assert "manifest.json: missing" in out and "not a complete release" in out


class _Upload:
    """A write handle of :class:`FlakyFS`: buffers, and stores the object only when closed (like an S3 upload);
    the close of a file named in ``FlakyFS.failures`` raises the next planned error instead."""

    def __init__(self, fs, path):
        import io

        self.fs, self.path, self.buf = fs, path, io.BytesIO()

    def write(self, data):
        return self.buf.write(data)

    def close(self):
        from fsspec.implementations.memory import MemoryFile

        name = self.path.rsplit("/", 1)[-1]
        FlakyFS.puts[name] = FlakyFS.puts.get(name, 0) + 1
        plan = FlakyFS.failures.get(name)
        if plan:
            raise plan.pop(0)
        self.fs.store[self.path] = MemoryFile(self.fs, self.path, self.buf.getvalue())

    def discard(self):
        self.buf = None


def _flaky_fs():
    from fsspec.implementations.memory import MemoryFileSystem

    class _FlakyFS(MemoryFileSystem):
        """An object store in memory whose uploads fail as planned (``failures``: file name -> errors to raise)."""

        protocol = "flakytest"
        store: dict = {}
        pseudo_dirs = [""]
        failures: dict = {}
        puts: dict = {}

        def _open(self, path, mode="rb", **kwargs):
            if mode == "wb":
                return _Upload(self, self._strip_protocol(path))
            return super()._open(path, mode, **kwargs)

    return _FlakyFS


FlakyFS = _flaky_fs()


def test_uploads_are_retried_on_transient_errors_and_not_on_permanent_ones(trained_run):
    import botocore.exceptions
    import fsspec

    from polymae.pipeline.config import load_config
    from polymae.pipeline.publish import PublishConfig, PublishError, publish, verify_release

    fsspec.register_implementation("flakytest", FlakyFS, clobber=True)
    FlakyFS.store.clear()
    FlakyFS.puts.clear()
    FlakyFS.failures.update({"encoder.safetensors": [ConnectionResetError(104, "Connection reset by peer")],
                             "manifest.json": [botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3")]})
    common = [f"checkpoint={trained_run}", "retry_backoff_s=0.01"]
    man = publish(load_config(PublishConfig, overrides=common + ["dest=flakytest://models/v1"]))
    assert FlakyFS.puts["encoder.safetensors"] == 2 and FlakyFS.puts["manifest.json"] == 2
    assert FlakyFS.puts["model.safetensors"] == 1 and verify_release("flakytest://models/v1") == []
    assert {f["path"] for f in man["files"]} == {"model.safetensors", "encoder.safetensors", "model_config.json",
                                                "metrics.json", "config.yaml", "README.md"}

    FlakyFS.puts.clear()
    FlakyFS.failures.update({"model_config.json": [PermissionError(13, "AccessDenied")]})
    with pytest.raises(PublishError, match=r"^model_config\.json: upload to flakytest://models/v2 failed "
                                           r"\(PermissionError"):
        publish(load_config(PublishConfig, overrides=common + ["dest=flakytest://models/v2"]))
    assert FlakyFS.puts["model_config.json"] == 1 and "manifest.json" not in FlakyFS.puts  # not retried, no manifest
    assert verify_release("flakytest://models/v2")[0].startswith("manifest.json: missing")
