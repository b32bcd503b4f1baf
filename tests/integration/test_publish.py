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


def test_publish_config_errors_name_the_key(tmp_path):
    from polymae.pipeline.config import ConfigError, load_config
    from polymae.pipeline.publish import PublishConfig

    with pytest.raises(ConfigError) as e:
        load_config(PublishConfig, overrides=[f"checkpoint={tmp_path}"])
    assert e.value.key == "checkpoint"
