"""Background publishing during training (train.publish_every / publish_to, pipeline/train/publisher.py).

1. A 6-step tiny pretrain with a checkpoint every 2 steps and publish_every=2 to a bucket on a local S3 server
   (moto): releases of steps 2
   and 6 (and of 4 unless it was superseded while 2 was still publishing, which the log then says), each intact,
   with the weights of the consolidated tag, published by another process than the trainer; ``latest`` names step 6;
   no ``publishing`` marker is left. The step times are printed (nothing timing-based is asserted).
2. The scheduling on its own, with a stand-in interpreter that records its arguments: one publish at a time, only the
   newest waiting tag kept, markers while publishing, a failed publish raised at the end.
3. Pruning skips a tag being published; the config checks name their keys.
"""

import os
import re
import stat
import subprocess
import sys

import pytest

from train_helpers import train_env

pytestmark = pytest.mark.integration

TRAINER_STEPS = 6


def test_training_publishes_in_the_background_to_s3(synthetic_shards, moto_s3, tmp_path):
    """The 6-step run publishing every 2 steps to a bucket on the local S3 server."""
    import boto3
    import torch
    from safetensors.torch import load

    from polymae.datasets import storage
    from polymae.pipeline.publish import verify_release
    from polymae.pipeline.train.checkpoint import PUBLISHING_FILE, consolidate, step_tag
    from polymae.pipeline.train.metrics_log import read_metrics

    boto3.client("s3").create_bucket(Bucket="models")
    run, releases = str(tmp_path / "run"), "s3://models/run7"
    env = dict(train_env(), POLYMAE_LOG_LEVEL="INFO")  # train_env copies os.environ: the AWS_* of moto_s3
    proc = subprocess.Popen(
        [sys.executable, "-m", "polymae.jobs.pretrain", f"data.shards={synthetic_shards}", f"output={run}",
         "data.img_size=32", "model.num_visible=4", "data.num_workers=0", f"train.steps={TRAINER_STEPS}",
         "train.global_batch=2", "train.micro_batch=2", "train.save_interval=2", "train.keep_last=3",
         "train.publish_every=2", f"train.publish_to={releases}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-6000:]
    trainer_pid = proc.pid
    print("step times (s):", [round(r["step_s"], 3) for r in read_metrics(run)])  # for the record only
    storage.invalidate_cache(releases)
    found = sorted({u[len(releases) + 1:].split("/")[0] for u in storage.list_files(releases)} - {"latest"})
    superseded = f"{step_tag(4)} is not published (superseded by {step_tag(6)}" in err
    assert found == [step_tag(s) for s in ((2, 6) if superseded else (2, 4, 6))], err[-3000:]
    assert storage.read_bytes(f"{releases}/latest").decode().strip() == step_tag(6)
    started = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"background publish of (step-\d+) to \S+ started \(pid (\d+)", err)}
    for tag in found:
        dest = f"{releases}/{tag}"
        assert verify_release(dest) == [], tag
        man = storage.read_json(f"{dest}/manifest.json")
        assert man["source"] == {"tag": tag, "run": "run"}
        assert man["publisher_pid"] != trainer_pid and man["publisher_pid"] == started[tag]  # another process
        sd, _ = consolidate(run, tag)
        released = load(storage.read_bytes(f"{dest}/model.safetensors"))
        assert released.keys() == sd.keys() and all(torch.equal(released[k], sd[k]) for k in sd)
        assert "done in" in err and not os.path.exists(os.path.join(run, "checkpoints", tag, PUBLISHING_FILE))
    assert "FAILED" not in err and os.path.exists(os.path.join(run, "publish.log"))


FAKE_PYTHON = """#!/bin/sh
# stands in for the interpreter: records its arguments and whether the tag's publishing marker exists, then exits
for a in "$@"; do case "$a" in tag=*) tag="${a#tag=}";; checkpoint=*) run="${a#checkpoint=}";; esac; done
marker=no; [ -f "$run/checkpoints/$tag/publishing" ] && marker=yes
echo "$tag marker=$marker $*" >> "$run/calls.txt"
sleep 0.8
exit ${FAKE_STATUS:-0}
"""


def _fake_run(tmp_path, steps=(2, 4, 6)):
    from polymae.pipeline.train.checkpoint import MARKER_FILE, step_tag

    run = tmp_path / "run"
    for s in steps:
        d = run / "checkpoints" / step_tag(s)
        d.mkdir(parents=True)
        (d / MARKER_FILE).write_text("{}")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(run), str(fake)


def test_one_publish_at_a_time_and_only_the_newest_waits(tmp_path, caplog):
    from polymae.pipeline.train.checkpoint import PUBLISHING_FILE, step_tag
    from polymae.pipeline.train.publisher import BackgroundPublisher

    run, fake = _fake_run(tmp_path)
    marker = lambda s: os.path.join(run, "checkpoints", step_tag(s), PUBLISHING_FILE)  # noqa: E731
    with BackgroundPublisher(run, 2, "s3://bucket/releases/", python=fake) as pub:
        pub.step_done(1)  # not a multiple of 2
        pub.step_done(2)
        assert os.path.exists(marker(2))
        pub.step_done(3)
        pub.step_done(4)  # 2 still publishing: 4 waits
        pub.step_done(6)  # 6 replaces 4
        assert os.path.exists(marker(6)) and not os.path.exists(marker(4))
        pub.step_done(8)  # no complete checkpoint of step 8: nothing
    assert [r["tag"] for r in pub.results] == [step_tag(2), step_tag(6)]
    assert all(r["status"] == 0 for r in pub.results) and not os.path.exists(marker(2)) and not os.path.exists(marker(6))
    calls = open(os.path.join(run, "calls.txt")).read().splitlines()
    assert [c.split()[:2] for c in calls] == [[step_tag(2), "marker=yes"], [step_tag(6), "marker=yes"]]
    assert calls[0].split()[2:] == ["-m", "polymae.jobs.publish", f"checkpoint={run}", f"tag={step_tag(2)}",
                                    f"dest=s3://bucket/releases/{step_tag(2)}", "update_latest=true"]
    assert f"{step_tag(4)} is not published (superseded by {step_tag(6)}" in caplog.text


def test_a_failed_publish_fails_the_end_of_training(tmp_path, monkeypatch):
    from polymae.pipeline.train.publisher import BackgroundPublishError, BackgroundPublisher

    run, fake = _fake_run(tmp_path, steps=(2,))
    monkeypatch.setenv("FAKE_STATUS", "3")
    with pytest.raises(BackgroundPublishError, match=r"step-00000002 \(exit status 3\)"):
        with BackgroundPublisher(run, 2, str(tmp_path / "rel"), python=fake) as pub:
            pub.step_done(2)
    with pytest.raises(ZeroDivisionError):  # an error of the training itself is not masked by the publish's
        with BackgroundPublisher(run, 2, str(tmp_path / "rel"), python=fake) as pub:
            pub.step_done(2)
            1 / 0
    assert [r["status"] for r in pub.results] == [3]


def test_preemption_stops_the_publish_without_failing_the_job(tmp_path, caplog):
    """Preempted (the trainer saved and exits 75 to be requeued): the running publish is stopped, the waiting one
    dropped, and a publish the preemption signal already killed is not a failure either; each is logged with the
    command that publishes it after the requeue."""
    import signal

    from polymae.pipeline.train.checkpoint import PUBLISHING_FILE, step_tag
    from polymae.pipeline.train.publisher import BackgroundPublisher

    run, fake = _fake_run(tmp_path, steps=(2, 4))
    with caplog.at_level("WARNING"), BackgroundPublisher(run, 2, str(tmp_path / "rel"), python=fake) as pub:
        pub.step_done(2)
        pub.step_done(4)  # waits behind step 2
        child = pub._proc
        assert pub.interrupt() == [step_tag(2), step_tag(4)]
        assert child.poll() is not None and pub._proc is None
        pub.step_done(6)  # nothing after an interrupt
    assert pub.results == [] and "polymae publish checkpoint=" in caplog.text
    assert not any(os.path.exists(os.path.join(run, "checkpoints", step_tag(s), PUBLISHING_FILE)) for s in (2, 4))

    with BackgroundPublisher(run, 2, str(tmp_path / "rel"), python=fake) as pub:  # killed by the signal itself
        pub.step_done(2)
        pub._proc.send_signal(signal.SIGTERM)
        pub._proc.wait()
        pub.poll()
        assert [r["status"] for r in pub.results] == [-signal.SIGTERM]
        assert pub.interrupt() == [step_tag(2)] and pub.failures() == []


def test_a_new_start_publishes_the_newest_due_tag_left_without_a_release(tmp_path):
    from polymae.pipeline.train.checkpoint import PUBLISHING_FILE, step_tag
    from polymae.pipeline.train.publisher import background_publisher, unpublished_tag

    run, fake = _fake_run(tmp_path, steps=(2, 3, 4, 5))
    rel = tmp_path / "rel"
    assert unpublished_tag(run, 2, str(rel)) == step_tag(4)  # 5 is not due; 4 has no release
    (rel / step_tag(4)).mkdir(parents=True)
    (rel / step_tag(4) / "manifest.json").write_text("{}")
    assert unpublished_tag(run, 2, str(rel)) is None  # the newest due one is published: nothing to catch up
    assert unpublished_tag(run, 0, str(rel)) is None
    (rel / step_tag(4) / "manifest.json").unlink()  # a publish interrupted before its manifest

    class _Train:
        publish_every, publish_to = 2, str(rel)

    pub = background_publisher(run, _Train(), rank=0, python=fake)  # starts publishing step 4 at once
    assert pub._running["tag"] == step_tag(4)
    assert os.path.exists(os.path.join(run, "checkpoints", step_tag(4), PUBLISHING_FILE))
    pub.close()
    assert [(r["tag"], r["status"]) for r in pub.results] == [(step_tag(4), 0)]
    assert "tag=step-00000004" in open(os.path.join(run, "calls.txt")).read()


def test_prune_skips_a_tag_being_published_and_stale_markers_are_cleared(tmp_path):
    from polymae.pipeline.train.checkpoint import PUBLISHING_FILE, Checkpointer, scan_tags, step_tag
    from polymae.pipeline.train.publisher import background_publisher

    run, _ = _fake_run(tmp_path, steps=(2, 4, 6, 8))
    open(os.path.join(run, "checkpoints", step_tag(4), PUBLISHING_FILE), "w").close()
    ck = Checkpointer(None, run, keep_last=1)
    assert ck.prune() == [step_tag(2), step_tag(6)]
    assert scan_tags(ck.folder)[0] == [step_tag(4), step_tag(8)]

    class _Train:
        publish_every, publish_to = 0, ""

    pub = background_publisher(run, _Train(), rank=0)  # a new run start on rank 0 clears the stale marker
    assert pub.every == 0 and not os.path.exists(os.path.join(run, "checkpoints", step_tag(4), PUBLISHING_FILE))
    assert ck.prune() == [step_tag(4)]


@pytest.mark.parametrize("overrides, key", [
    (["train.publish_every=3", "train.publish_to=rel"], "train.publish_every"),  # not a multiple of save_interval
    (["train.publish_every=2"], "train.publish_to"),
    (["train.publish_to=rel"], "train.publish_every"),
    (["train.publish_every=-2", "train.publish_to=rel"], "train.publish_every"),
])
def test_publish_settings_are_checked_naming_the_key(overrides, key):
    from polymae.pipeline.config import ConfigError, load_config
    from polymae.pipeline.train.config import PretrainConfig

    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, overrides=["train.save_interval=2", *overrides], preflight=False)
    assert e.value.key == key
    cfg = load_config(PretrainConfig, overrides=["train.save_interval=2", "train.publish_every=4",
                                                 "train.publish_to=s3://b/r"], preflight=False)
    assert (cfg.train.publish_every, cfg.train.publish_to) == (4, "s3://b/r")
