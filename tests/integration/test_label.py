"""The label job end to end on embedded Ray: real photographs (scikit-image) plus broken and unusual inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from polymae.datasets import shards as S
from polymae.datasets.sources import make_key
from polymae.pipeline.config import ConfigError, load_config
from polymae.pipeline.label.driver import LabelConfig, run_label

pytestmark = pytest.mark.integration

SPS = 3  # samples per shard


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cfg(**kw) -> LabelConfig:
    # max_skip_fraction=1: these shards of 3 hold the deliberately broken inputs (1 skip = 33 %)
    base = dict(samples_per_shard=SPS, teacher_short_side=64, batch_size=4, num_workers=2, progress=False,
                read_threads=2, max_skip_fraction=1.0)
    base.update(kw)
    return LabelConfig(**base)


def _bad_inputs(folder: Path, photo_array) -> dict[str, str | None]:
    """Write the unusual inputs; returns file name -> expected skip reason (None = converted to RGB)."""
    astro = (folder / "astronaut.jpg").read_bytes()
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(astro[: len(astro) // 3])
    (folder / "text_named.jpg").write_text("this is not a JPEG, just text\n")
    Image.fromarray(photo_array("logo"), "RGBA").save(folder / "rgba.png")
    Image.fromarray(photo_array("chelsea")).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(
        folder / "palette.png")
    Image.fromarray(photo_array("camera").astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(photo_array("coffee")).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    img = Image.fromarray(photo_array("rocket"))
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(folder / "exif_rotated.jpg", quality=95, exif=exif.tobytes())
    return {"zero_bytes.jpg": "empty", "truncated.jpg": "undecodable", "text_named.jpg": "undecodable",
            "rgba.png": None, "palette.png": None, "gray16.png": None, "cmyk.jpg": None, "exif_rotated.jpg": None}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, photos_dir, ray_local, skimage_photo):
    root = tmp_path_factory.mktemp("label")
    src = root / "src"
    shutil.copytree(photos_dir, src)
    expected = {f.name: None for f in src.iterdir()}
    expected.update(_bad_inputs(src, skimage_photo))
    out = root / "out"
    summary = run_label(_cfg(input=str(src), output=str(out)))
    return {"src": src, "out": out, "split": out / "train", "summary": summary, "expected": expected}


def _tars(split: Path) -> list[Path]:
    return sorted(split.glob("train-*.tar"))


def test_shards_and_keys(labelled):
    split, expected, summary = labelled["split"], labelled["expected"], labelled["summary"]
    n = len(expected)
    assert n == 16
    n_shards = -(-n // SPS)
    assert summary["shards_planned"] == summary["shards_labelled"] == n_shards and summary["shards_failed"] == []
    tars = _tars(split)
    assert [p.name for p in tars] == [S.shard_name("train", i) for i in range(n_shards)]
    assert len(list(split.glob("train-*.stats.json"))) == n_shards
    skips = {make_key(f): r for f, r in expected.items() if r}
    good = {make_key(f) for f, r in expected.items() if r is None}
    assert summary["total"]["samples_in"] == n and summary["total"]["written"] == len(good)
    assert summary["total"]["skipped"] == summary["skipped_by_reason"] == {"empty": 1, "undecodable": 2}
    assert (summary["written"], summary["skipped"], summary["shards"]) == (len(good), 3, n_shards)
    assert summary["workers"] == 2 and summary["retries"] == 0 and summary["shards_retried"] == {}
    assert summary["teacher_load_seconds"] > 0 and summary["label_seconds"] > 0
    stages = summary["stages"]
    assert list(stages) == ["read", "decode", "resize", "depth", "semseg", "encode", "write"]
    assert summary["teacher_wait_seconds"] >= 0
    assert stages["semseg"]["busy_seconds"] > 0 and stages["semseg"]["images_per_s"] == pytest.approx(
        n / stages["semseg"]["busy_seconds"], rel=0.02)
    keys_in_tars = []
    for p in tars:
        with tarfile.open(p) as tf:  # plain tarfile reads every shard
            names = tf.getnames()
        keys_in_tars += sorted({n.split(".", 1)[0] for n in names})
        for n in names:
            assert n.split(".", 1)[1] in ("rgb.jpg", "depth.png", "semseg.png", "json")
    assert sorted(keys_in_tars) == sorted(good)
    index = pq.read_table(split / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(make_key(f) for f in expected)
    for r in index:
        assert r["skipped"] == skips.get(r["key"])
        assert (r["width"] is None) == (r["skipped"] is not None)
    assert (split / "plan.parquet").exists() and (split / "config.yaml").exists()


def test_webdataset_decodes_every_sample(labelled, skimage_photo):
    photo_array = skimage_photo
    split, src = labelled["split"], labelled["src"]
    raw = list(S.iter_raw_samples([str(p) for p in _tars(split)]))
    assert len(raw) == labelled["summary"]["total"]["written"]
    by_key = {}
    for r in raw:
        d = S.decode_sample(r)
        h, w = d["rgb"].shape[:2]
        assert d["depth"].shape == (h, w) and d["semseg"].shape == (h, w)
        m = d["meta"]
        assert (m["width"], m["height"]) == (w, h)
        assert m["teachers"]["depth"]["name"] == "dpt" and m["teachers"]["semseg"]["name"] == "segformer"
        assert m["teachers"]["depth"]["random_init"] is True
        assert m["label_set"] == "random-150" and m["semseg"]["ignore_index"] == 255
        assert m["depth"]["kind"] == "relative_inverse"
        assert 0.5 < m["depth"]["depth_range"] < 20  # calibrated tiny DPT: O(1) depths, not ~1e-7
        assert d["depth"].std() > 1e-3 * m["depth"]["depth_range"]  # and image-dependent
        assert set(m["label_resolution"]) == {"depth", "semseg"}
        assert d["semseg"].max() < 150 and d["cls"] is None
        by_key[d["key"]] = (d, r)
    # plain JPEG sources are stored byte for byte
    d, r = by_key["chelsea"]
    assert r[S.RGB] == (src / "chelsea.jpg").read_bytes() and d["meta"]["source"]["reencoded"] is False

    def close(key, want, tol=6.0):
        got = by_key[key][0]["rgb"].astype(np.float64)
        assert got.shape == want.shape, key
        assert np.abs(got - want).mean() < tol, key

    logo = photo_array("logo").astype(np.float64)
    alpha = logo[..., 3:] / 255.0
    close("rgba", logo[..., :3] * alpha + 255.0 * (1 - alpha))
    close("palette", np.array(Image.open(src / "palette.png").convert("RGB"), np.float64))
    close("gray16", np.repeat(photo_array("camera")[..., None], 3, axis=2).astype(np.float64))
    close("cmyk", photo_array("coffee").astype(np.float64), tol=8.0)
    close("exif_rotated", np.rot90(photo_array("rocket"), k=-1).astype(np.float64))
    for key in ("rgba", "palette", "gray16", "cmyk", "exif_rotated"):
        assert by_key[key][0]["meta"]["source"]["reencoded"] is True


def test_stats_and_manifest_checksums(labelled):
    split = labelled["split"]
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["schema_version"] == S.SCHEMA_VERSION and manifest["complete"] is True
    assert manifest["counts"]["samples_in"] == 16 and manifest["counts"]["shards"] == len(_tars(split))
    assert set(manifest["teachers"]) == {"depth", "semseg"}
    assert manifest["teachers"]["depth"]["output_calibration"]["target_std"] == 0.25
    assert manifest["label_sets"]["random-150"]["num_classes"] == 150
    for entry in manifest["shards"]:
        p = split / entry["name"]
        stats = json.loads((split / S.stats_name("train", entry["index"])).read_text())
        assert entry["sha256"] == stats["sha256"] == _sha(p)
        assert entry["size"] == stats["size"] == p.stat().st_size
        assert entry["samples"] == stats["written"]
        assert stats["samples_in"] == len(stats["samples"]) <= SPS
        assert stats["written"] + sum(stats["skipped"].values()) == stats["samples_in"]
        assert {"read", "decode", "depth", "semseg", "encode", "write"} <= set(stats["busy_seconds"])
        assert stats["seconds"] > 0 and stats["teachers"]["semseg"]["label_set"] == "random-150"
        assert stats["finished"] >= stats["started"] and 0 < stats["cpu_seconds"]
        assert stats["teachers"]["depth"]["output_calibration"]["target_mean"] == 1.0
    # a shard that holds a broken input still holds its good images
    bad_shards = [json.loads(p.read_text()) for p in split.glob("*.stats.json")]
    assert any(s["skipped"] and s["written"] > 0 for s in bad_shards)
    assert S.done_shards(str(labelled["out"]), "train").keys() == {e["index"] for e in manifest["shards"]}


def test_resume_redoes_nothing(labelled):
    split = labelled["split"]
    before = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in split.glob("train-*")}
    summary = run_label(_cfg(input=str(labelled["src"]), output=str(labelled["out"])))
    assert summary["shards_labelled"] == 0 and summary["shards_reused"] == summary["shards_planned"]
    assert summary["total"]["written"] == labelled["summary"]["total"]["written"]
    after = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in split.glob("train-*")}
    assert after == before


def test_extend_then_overwrite(tmp_path, ray_local, photo_writer):
    write_photos = photo_writer
    src = tmp_path / "classes"
    write_photos(src / "cats", ["chelsea", "coffee"])
    write_photos(src / "things", ["rocket", "coins"])
    out = tmp_path / "out"
    first = run_label(_cfg(input=str(src), output=str(out), num_workers=1))
    split = out / "train"
    assert first["shards_planned"] == 2
    old = {p.name: _sha(p) for p in _tars(split)}
    write_photos(src / "people", ["astronaut"])
    write_photos(src / "things", ["camera"])
    # resume does not pick up new images (it warns); extend does, in new shards only
    assert run_label(_cfg(input=str(src), output=str(out)))["shards_labelled"] == 0
    ext = run_label(_cfg(input=str(src), output=str(out), mode="extend", num_workers=1))
    assert ext["shards_labelled"] == 1 and ext["shards_planned"] == 3
    assert {p.name: _sha(p) for p in _tars(split) if p.name in old} == old  # byte-identical
    new = [p for p in _tars(split) if p.name not in old]
    with tarfile.open(new[0]) as tf:
        keys = {n.split(".", 1)[0] for n in tf.getnames()}
    assert keys == {"people__astronaut", "things__camera"}
    raw = {r["__key__"]: S.decode_sample(r) for r in S.iter_raw_samples([str(p) for p in _tars(split)])}
    # class indices of finished shards stay valid: a new class is appended, not inserted
    assert raw["cats__chelsea"]["cls"] == 0 and raw["things__rocket"]["cls"] == raw["things__camera"]["cls"] == 1
    assert raw["people__astronaut"]["cls"] == 2 and raw["things__camera"]["meta"]["class_name"] == "things"
    manifest = json.loads((split / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and manifest["source"]["classes"] == ["cats", "things", "people"]
    # overwrite plans afresh (6 images, 3 per shard) and relabels everything; stale shards are removed
    again = run_label(_cfg(input=str(src), output=str(out), mode="overwrite", num_workers=1))
    assert again["shards_labelled"] == again["shards_planned"] == 2 and again["shards_reused"] == 0
    assert [p.name for p in _tars(split)] == ["train-000000.tar", "train-000001.tar"]
    assert not (split / "train-000002.stats.json").exists()
    plan = pq.read_table(split / "plan.parquet").to_pydict()
    assert sorted(plan["key"]) == sorted(raw)
    relabelled = {r["__key__"]: r for r in S.iter_raw_samples([str(p) for p in _tars(split)])}
    assert sorted(relabelled) == sorted(raw)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(LabelConfig, None, [])
    assert e.value.key == "input"
    for override, key in (("samples_per_shard=0", "samples_per_shard"), ("depth_teacher=midas", "depth_teacher"),
                          ("mode=sometimes", "mode"), ("split=a/b", "split"), ("batch_size=x", "batch_size"),
                          ("worker_nice=40", "worker_nice"), ("shard_retries=-1", "shard_retries"),
                          ("bogus=1", "bogus")):
        with pytest.raises(ConfigError) as e:
            load_config(LabelConfig, None, ["input=x", override])
        assert e.value.key == key, override
    cfg = load_config(LabelConfig, None, ["input=x", "semseg_teacher=none"])
    assert cfg.output == "work/shards" and cfg.mode == "resume" and "semseg" not in cfg.teacher_specs()


def test_cli_flags_and_help(tmp_path, ray_local, photo_writer, capsys):
    write_photos = photo_writer
    from polymae.jobs.common import parse_config
    from polymae.jobs.label import _flags, main

    cfg, _ = parse_config(LabelConfig, ["input=x", "--address", "ray://h:10001", "--extend"], "label", "",
                          {"address": "ray_address", "mode_flag": "mode"}, _flags)
    assert cfg.ray_address == "ray://h:10001" and cfg.mode == "extend"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "samples_per_shard" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "input" in capsys.readouterr().err
    src = tmp_path / "few"
    write_photos(src, ["coins", "camera"])
    assert main([f"input={src}", f"output={tmp_path / 'o'}", "samples_per_shard=4", "teacher_short_side=64",
                 "depth_teacher=depth_anything", "semseg_teacher=none", "progress=false"]) == 0
    assert "images in" in capsys.readouterr().out
    stats = json.loads((tmp_path / "o" / "train" / "train-000000.stats.json").read_text())
    assert stats["written"] == 2 and set(stats["teachers"]) == {"depth"}
    raw = list(S.iter_raw_samples([str(tmp_path / "o" / "train" / "train-000000.tar")]))
    assert all(S.SEMSEG not in r and S.DEPTH in r for r in raw)


def test_label_from_and_to_s3_with_the_cli(moto_s3, tmp_path, photo_writer):
    """`python -m polymae.jobs.label` in a fresh process (its own embedded Ray) reading and writing s3://."""
    import os
    import subprocess
    import sys

    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("polymae-test")
    local = tmp_path / "photos"
    photo_writer(local, ["chelsea", "coins", "rocket"])
    for p in local.iterdir():
        fs.pipe(f"polymae-test/photos/{p.name}", p.read_bytes())
    env = {**os.environ, **moto_s3, "POLYMAE_LOG_LEVEL": "WARNING"}
    args = [sys.executable, "-m", "polymae.jobs.label", "input=s3://polymae-test/photos",
            "output=s3://polymae-test/shards", "samples_per_shard=2", "teacher_short_side=64", "num_workers=1",
            "progress=false"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images in" in done.stdout
    manifest = json.loads(fs.cat_file("polymae-test/shards/train/manifest.json"))
    assert manifest["counts"]["written"] == 3 and len(manifest["shards"]) == 2
    for entry in manifest["shards"]:
        assert entry["url"].startswith("s3://polymae-test/shards/train/")
        assert hashlib.sha256(fs.cat_file(entry["url"])).hexdigest() == entry["sha256"]
    assert fs.exists("polymae-test/shards/train/index.parquet")
    assert not [p for p in fs.find("polymae-test/shards") if ".tmp" in p]
    raw = list(S.iter_raw_samples([e["url"] for e in manifest["shards"]]))  # webdataset via fsspec
    assert sorted(r["__key__"] for r in raw) == ["chelsea", "coins", "rocket"]


def test_two_depth_teachers_in_one_job(tmp_path, ray_local, photo_writer):
    """depth_teacher=dpt,depth_anything: dpt stays the primary (depth.png byte-identical to a dpt-only run),
    depth_anything goes to depth.depth_anything.png with its own range, and the manifest lists both."""
    src = tmp_path / "src"
    photo_writer(src, ["chelsea", "camera", "coins"])
    both = run_label(_cfg(input=str(src), output=str(tmp_path / "both"), num_workers=1,
                          depth_teacher="dpt,depth_anything", semseg_teacher="segformer"))
    single = run_label(_cfg(input=str(src), output=str(tmp_path / "one"), num_workers=1))
    assert both["written"] == single["written"] == 3
    extra = S.member("depth", "depth_anything")
    assert extra == "depth.depth_anything.png"
    raw2 = {r["__key__"]: r for r in S.iter_raw_samples([str(p) for p in _tars(tmp_path / "both" / "train")])}
    raw1 = {r["__key__"]: r for r in S.iter_raw_samples([str(p) for p in _tars(tmp_path / "one" / "train")])}
    assert sorted(raw2) == sorted(raw1)
    for key, r in raw2.items():
        assert {S.RGB, S.DEPTH, S.SEMSEG, extra, S.META} <= set(r) and S.member("semseg", "segformer") not in r
        assert r[S.DEPTH] == raw1[key][S.DEPTH] and r[S.SEMSEG] == raw1[key][S.SEMSEG]  # primary unchanged
        meta = json.loads(r[S.META])
        info = meta["extra_teachers"][extra]
        assert info["name"] == "depth_anything" and info["random_init"] is True and info["kind"]
        depth = S.decode_depth(r[extra], info["depth_range"])
        assert depth.shape == (meta["height"], meta["width"]) and depth.dtype == np.float32
        assert info["depth_range"] > 0 and np.isclose(depth.max(), info["depth_range"])
        assert meta["depth"]["teacher"] == "dpt" and set(meta["teachers"]) == {"depth", "semseg"}
    manifest = json.loads((tmp_path / "both" / "train" / "manifest.json").read_text())
    assert {m["name"] for m in manifest["teachers"].values() if m["task"] == "depth"} == {"dpt", "depth_anything"}
    assert manifest["teachers"]["depth"]["name"] == "dpt"
    assert manifest["members"]["depth.depth_anything"] == extra and manifest["members"]["depth"] == S.DEPTH
    assert set(both["teachers"]) == {"depth", "depth.depth_anything", "semseg"}
    assert "depth.depth_anything" in both["stages"]


def test_multi_teacher_config_errors_name_the_key():
    ok = load_config(LabelConfig, None, ["input=x", "depth_teacher=dpt, depth_anything", "depth_weights=/a,null"],
                     preflight=False)  # /a does not exist: only the pure checks
    assert list(ok.teacher_specs()) == ["depth", "depth.depth_anything", "semseg"]
    specs = ok.teacher_specs()
    assert specs["depth"]["weights"] == "/a" and specs["depth.depth_anything"]["weights"] is None
    for override, key in ((["depth_teacher=dpt,midas"], "depth_teacher"),
                          (["depth_teacher=dpt,dpt"], "depth_teacher"),
                          (["semseg_teacher=segformer,none"], "semseg_teacher"),
                          (["depth_teacher=dpt,depth_anything", "depth_weights=/a"], "depth_weights"),
                          (["semseg_weights=/a,/b"], "semseg_weights"),
                          (["decode_threads=-1"], "decode_threads"), (["cpus_per_worker=-1"], "cpus_per_worker")):
        with pytest.raises(ConfigError) as e:
            load_config(LabelConfig, None, ["input=x", *override])
        assert e.value.key == key, override


def test_decode_threads_keep_shards_identical_and_report_teacher_wait(tmp_path, ray_local, photo_writer):
    """The CPU stages (decode + resize) run ahead in threads: shards are byte-identical for any
    decode_threads, bad inputs are still skipped, and the teacher stage's wait is measured."""
    src = tmp_path / "src"
    photo_writer(src, ["chelsea", "camera", "coins"])
    (src / "zero_bytes.jpg").write_bytes(b"")
    shas = {}
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        summary = run_label(_cfg(input=str(src), output=str(out), num_workers=1, batch_size=2,
                                 decode_threads=threads))
        assert summary["written"] == 3 and summary["skipped_by_reason"] == {"empty": 1}
        assert summary["teacher_wait_seconds"] >= 0
        for stats_file in sorted((out / "train").glob("train-*.stats.json")):
            stats = json.loads(stats_file.read_text())
            assert stats["teacher_wait_seconds"] >= 0 and stats["decode_threads"] == threads
            assert {"read", "decode", "resize", "depth", "semseg"} <= set(stats["busy_seconds"])
        shas[threads] = {p.name: _sha(p) for p in _tars(out / "train")}
    assert shas[1] == shas[2] and len(shas[1]) == 2
