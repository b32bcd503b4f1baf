"""The results table (parquet + markdown), --compare, dataset fingerprints and checkpoint digests."""

import json
import os

import pytest

from polymae.pipeline.evaluate import results as R

pytestmark = pytest.mark.unit


def _res(ckpt: str, metrics: dict, sha: str = "a" * 64) -> dict:
    return {"checkpoint": ckpt, "checkpoint_sha256": sha, "created": "2026-12-05T00:00:00+00:00",
            "metrics": metrics, "dataset": {"path": "/d", "fingerprint": "f" * 64}}


def test_rows_append_replace_and_pivot(tmp_path):
    table = str(tmp_path / "table")
    R.append_table(table, R.table_rows("linear_probe", _res("A", {"top1": 0.5, "top5": 0.9})))
    R.append_table(table, R.table_rows("linear_probe", _res("B", {"top1": 0.7, "top5": 1.0})))
    R.append_table(table, R.table_rows("depth", _res("A", {"delta1": 0.25})))
    # a re-run of (A, linear_probe) replaces its two rows, keeps the others
    R.append_table(table, R.table_rows("linear_probe", _res("A", {"top1": 0.6, "top5": 0.95})))
    rows = R.read_table(table)
    assert len(rows) == 5
    cols, lines = R.pivot(rows, ["B", "A"])
    assert cols == ["B", "A"]
    assert lines == [("depth", "delta1", [None, 0.25]), ("linear_probe", "top1", [0.7, 0.6]),
                     ("linear_probe", "top5", [1.0, 0.95])]
    md = open(os.path.join(table, "results.md")).read()
    assert "| linear_probe | top1 | 0.6000 | 0.7000 |" in md and "| depth | delta1 | 0.2500 | – |" in md
    with pytest.raises(KeyError, match="no results for \\['C'\\]"):
        R.pivot(rows, ["A", "C"])


def test_compare_cli_prints_side_by_side_and_fails_on_unknown(tmp_path, capsys):
    from polymae.jobs.evaluate import main

    table = str(tmp_path / "t")
    R.append_table(table, R.table_rows("linear_probe", _res("runs/a", {"top1": 0.125})))
    R.append_table(table, R.table_rows("linear_probe", _res("runs/b", {"top1": 0.875})))
    assert main(["--compare", "runs/a", "runs/b", f"results_table={table}"]) == 0
    out = capsys.readouterr().out
    assert "0.1250" in out and "0.8750" in out and out.index("runs/a") < out.index("runs/b")
    assert main(["--compare", "runs/zzz", f"results_table={table}"]) == 1
    assert "runs/zzz" in capsys.readouterr().err
    assert main(["--compare", f"results_table={tmp_path / 'none'}"]) == 1


def test_fingerprint_changes_with_names_and_sizes(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for n in ("a.png", "b.png"):
        (d / n).write_bytes(b"x" * 10)
    paths = [str(d / "a.png"), str(d / "b.png")]
    f0 = R.fingerprint_files(str(d), paths)
    assert f0 == R.fingerprint_files(str(d), list(reversed(paths)))  # order-free
    (d / "b.png").write_bytes(b"x" * 11)
    f1 = R.fingerprint_files(str(d), paths)
    os.rename(d / "b.png", d / "c.png")
    f2 = R.fingerprint_files(str(d), [str(d / "a.png"), str(d / "c.png")])
    assert len({f0, f1, f2}) == 3
    with pytest.raises(FileNotFoundError):
        R.fingerprint_files(str(d), [str(d / "gone.png")])


def test_weights_digest_of_a_release_and_a_file(tmp_path):
    import hashlib

    from polymae.pipeline.train.checkpoint import weights_digest

    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "model.safetensors").write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert weights_digest(str(rel)) == digest  # no manifest: the file's own digest
    (rel / "manifest.json").write_text(json.dumps({"files": [{"path": "model.safetensors", "sha256": "m" * 64}]}))
    assert weights_digest(str(rel)) == "m" * 64  # the manifest's record
    f = tmp_path / "mae.pth"
    f.write_bytes(b"official")
    assert weights_digest(str(f)) == hashlib.sha256(b"official").hexdigest()
    with pytest.raises(FileNotFoundError):
        weights_digest(str(tmp_path / "empty-run"))


def test_save_picture_writes_png_and_tensorboard(tmp_path):
    import numpy as np
    from PIL import Image

    ctx = R.EvalContext(checkpoint="c", output=str(tmp_path / "out"))
    img = np.zeros((8, 12, 3), np.uint8)
    img[:, :6] = 255
    url = ctx.save_picture("depth/val-0", img)
    ctx.close()
    back = np.asarray(Image.open(url))
    assert back.shape == (8, 12, 3) and (back == img).all()
    assert ctx.pictures == ["pictures/depth/val-0.png"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "out" / "tb"))
    with pytest.raises(ValueError, match="uint8"):
        ctx.save_picture("bad", img.astype(np.float32))


def test_finish_writes_results_json_with_config_digest_and_a_table_row(tmp_path):
    import hashlib

    from polymae.pipeline.evaluate.job import EvaluateConfig

    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "model.safetensors").write_bytes(b"w")
    cfg = EvaluateConfig(checkpoint=str(rel), protocol="depth", results_table=str(tmp_path / "table"))
    ctx = R.EvalContext(checkpoint=str(rel), output=str(tmp_path / "out"))
    res = R.finish("depth", {"metrics": {"delta1@rgb": 0.5}, "dataset": {"path": "/d", "fingerprint": "f"}}, ctx, cfg,
                   cfg.results_table)
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved == res and saved["checkpoint_sha256"] == hashlib.sha256(b"w").hexdigest()
    assert saved["config"]["protocol"] == "depth" and saved["config"]["checkpoint"] == str(rel)
    assert (tmp_path / "out" / "config.yaml").exists()
    assert [(r["protocol"], r["metric"], r["value"]) for r in R.read_table(cfg.results_table)] == \
        [("depth", "delta1@rgb", 0.5)]


def _append_one(args):
    table, i = args
    R.append_table(table, R.table_rows("depth", _res(f"runs/{i}", {"delta1@rgb": i / 10})))


def test_concurrent_evaluate_jobs_lose_no_rows(tmp_path):
    """8 processes append to one table at once (a Slurm array of evaluate jobs): every row survives, because each
    (checkpoint, protocol) has its own row file; the next append's rebuild lists them all in results.md."""
    import multiprocessing as mp

    table = str(tmp_path / "table")
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_append_one, [(table, i) for i in range(8)])
    assert sorted(r["checkpoint"] for r in R.read_table(table)) == [f"runs/{i}" for i in range(8)]
    _append_one((table, 8))
    md = open(os.path.join(table, "results.md")).read()
    assert all(f"runs/{i}" in md for i in range(9))
    assert len(os.listdir(os.path.join(table, "rows"))) == 9
