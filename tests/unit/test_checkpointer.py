"""Atomic checkpoints without DeepSpeed: completion markers, which tag a resume takes, pruning, the resumed-step
agreement across ranks, and the test-only fault-injection hook's parsing."""

import json
import os
import re

import pytest

from polymae.pipeline.config import ConfigError

from polymae.pipeline.train.checkpoint import (KILL_ENV, LATEST_FILE, MARKER_FILE, Checkpointer, agreed_step,
                                               fault_point, resume_plan, resume_tag, scan_tags, step_tag, tag_step, write_durable)

pytestmark = pytest.mark.unit


class _Engine:
    """Stands in for a DeepSpeed engine (files of two 'ranks' per tag; load records the tag it was given)."""

    def __init__(self):
        self.loaded = None
        self.saves = []

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        assert save_latest is False  # latest is the Checkpointer's, written after the marker
        os.makedirs(os.path.join(folder, tag))
        for rank in (0, 1):
            with open(os.path.join(folder, tag, f"rank{rank}.json"), "w") as fh:
                json.dump(client_state, fh)
        self.saves.append(tag)

    def zero_optimization_stage(self):
        return 2

    def load_checkpoint(self, folder, tag=None):
        assert tag is not None  # always explicit
        with open(os.path.join(folder, tag, "rank0.json")) as fh:
            self.loaded = tag
            return os.path.join(folder, tag), json.load(fh)


def _tag_dir(run, step, complete=True):
    d = os.path.join(run, "checkpoints", step_tag(step))
    os.makedirs(d)
    with open(os.path.join(d, "rank0.json"), "w") as fh:
        json.dump({"step": step}, fh)
    if complete:
        with open(os.path.join(d, MARKER_FILE), "w") as fh:
            json.dump({"step": step}, fh)
    return d


def _latest(run, step):
    with open(os.path.join(run, "checkpoints", LATEST_FILE), "w") as fh:
        fh.write(step_tag(step))


def test_tag_step():
    assert tag_step(step_tag(42)) == 42 and tag_step("latest") is None and tag_step("step-x") is None


def test_save_writes_marker_latest_and_prunes(tmp_path):
    run = str(tmp_path)
    ck = Checkpointer(_Engine(), run, keep_last=2)
    for step in (2, 4, 6):
        ck.save(step)
    assert scan_tags(ck.folder) == ([step_tag(4), step_tag(6)], [])
    marker = json.load(open(os.path.join(ck.folder, step_tag(6), MARKER_FILE)))
    assert marker["step"] == 6 and marker["world_size"] == 1 and marker["zero_stage"] == 2 and marker["time"]
    assert ck.latest_tag() == step_tag(6)
    assert not [f for f in os.listdir(ck.folder) if f.startswith(".")]  # no temporary files left


def test_resume_takes_newest_complete_tag_not_latest(tmp_path):
    run = str(tmp_path)
    _tag_dir(run, 2)
    _tag_dir(run, 4)  # killed after the marker, before latest was replaced
    _tag_dir(run, 6, complete=False)  # killed before the marker
    _latest(run, 2)
    assert resume_tag(run) == (step_tag(4), [step_tag(6)])
    _latest(run, 6)  # a latest naming an incomplete tag is ignored too
    assert resume_tag(run) == (step_tag(4), [step_tag(6)])
    eng = _Engine()
    assert Checkpointer(eng, run).load() == 4 and eng.loaded == step_tag(4)


def test_resume_without_checkpoints_and_from_a_run_without_markers(tmp_path):
    run = str(tmp_path)
    assert resume_tag(run) == (None, []) and Checkpointer(_Engine(), run).load() == 0
    _tag_dir(run, 3, complete=False)
    assert resume_tag(run) == (None, [step_tag(3)])
    _tag_dir(run, 5, complete=False)
    _latest(run, 5)  # a run from before markers: no marker anywhere, so latest is trusted
    assert resume_tag(run) == (step_tag(5), [])
    assert Checkpointer(_Engine(), run).prune() == []  # and nothing of it is pruned


def test_prune_keeps_newest_complete_and_drops_older_incomplete(tmp_path):
    run = str(tmp_path)
    for step, complete in ((1, True), (2, False), (3, True), (4, True), (5, False)):
        _tag_dir(run, step, complete)
    ck = Checkpointer(_Engine(), run, keep_last=1)
    assert ck.prune() == [step_tag(1), step_tag(2), step_tag(3)]
    assert scan_tags(ck.folder) == ([step_tag(4)], [step_tag(5)])  # a newer incomplete tag waits for its re-save


def test_resave_replaces_a_leftover_incomplete_folder(tmp_path):
    run = str(tmp_path)
    _tag_dir(run, 2)
    d = _tag_dir(run, 4, complete=False)
    with open(os.path.join(d, "stale.bin"), "w") as fh:
        fh.write("x")
    ck = Checkpointer(_Engine(), run)
    ck.save(4)
    assert sorted(os.listdir(d)) == [MARKER_FILE, "rank0.json", "rank1.json"]


def test_agreed_step():
    assert agreed_step([7, 7, 7]) == 7 and agreed_step([0]) == 0
    with pytest.raises(RuntimeError, match=r"step 4 on rank\(s\) 0, 2; step 6 on rank\(s\) 1"):
        agreed_step([4, 6, 4])


def test_write_durable_replaces(tmp_path):
    p = str(tmp_path / "latest")
    write_durable(p, "a")
    write_durable(p, "b")
    assert open(p).read() == "b" and os.listdir(tmp_path) == ["latest"]


def test_fault_point_ignores_other_points_and_steps(monkeypatch):
    monkeypatch.setenv(KILL_ENV, "before_marker:4")
    fault_point("before_marker", 3)  # returns: another step
    fault_point("before_latest", 4)  # returns: another point
    monkeypatch.delenv(KILL_ENV)
    fault_point("before_marker", 4)


def _saved(run, world, stage, data):
    """A complete step-3 tag saved by ``world`` ranks at ZeRO ``stage`` with data layout ``data``."""
    ck = Checkpointer(_Engine(), run, data=data)
    ck.engine.zero_optimization_stage = lambda: stage
    ck.save(3)
    marker = json.load(open(os.path.join(run, "checkpoints", step_tag(3), MARKER_FILE)))
    marker["world_size"] = world  # as if saved by `world` ranks (this process has none)
    with open(os.path.join(run, "checkpoints", step_tag(3), MARKER_FILE), "w") as fh:
        json.dump(marker, fh)


@pytest.mark.parametrize("saved,now,universal", [((2, 2), (1, 2), True), ((2, 2), (2, 2), False),
                                                 ((4, 0), (2, 0), False), ((2, 1), (2, 3), True),
                                                 ((8, 3), (6, 3), True)])
def test_resume_plan_reads_the_marker_and_picks_native_or_universal(tmp_path, saved, now, universal):
    run = str(tmp_path)
    _saved(run, *saved, {"readers": 16, "micro_batch": 2, "global_batch": 48})
    plan = resume_plan(run, *now, {"micro_batch": 2, "global_batch": 48})
    assert (plan.tag, plan.world_size, plan.zero_stage, plan.universal) == (step_tag(3), *saved, universal)
    assert plan.data["readers"] == 16


@pytest.mark.parametrize("saved_stage,stage,data,key,fix", [
    (0, 2, {"micro_batch": 2, "global_batch": 48}, "train.zero_stage", "train.zero_stage=0"),
    (2, 0, {"micro_batch": 2, "global_batch": 48}, "train.zero_stage", "train.zero_stage=2"),
    (2, 2, {"micro_batch": 4, "global_batch": 48}, "train.micro_batch", "train.micro_batch=2"),
    (2, 2, {"micro_batch": 2, "global_batch": 96}, "train.global_batch", "train.global_batch=48")])
def test_resume_plan_names_an_impossible_combination_and_its_fix(tmp_path, saved_stage, stage, data, key, fix):
    run = str(tmp_path)
    _saved(run, 4, saved_stage, {"readers": 16, "micro_batch": 2, "global_batch": 48})
    with pytest.raises(ConfigError, match=re.escape(fix)) as e:
        resume_plan(run, 2, stage, data)
    assert e.value.key == key and "4 ranks" in str(e.value) and "2 ranks" in str(e.value)
