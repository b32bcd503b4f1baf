"""The ``coco`` protocol of ``polymae evaluate`` (``pipeline/evaluate/coco.py`` ``run_coco``) on COCO results JSON files
scored against the hand-written COCO-format annotations of ``coco_helpers.py`` (three scikit-image photographs):

* boxes, masks, keypoints and captions: perfect predictions score 1; partial cases score hand-computed values
  (box AP (1 + 1 + 51/101) / 3 over the three categories, keypoint AP 6/10 from a 20-pixel shift, caption BLEU-4
  of one hand-counted sentence = 1/sqrt(2)); several files in one run; ``max_samples`` scores the first images;
* the dataset fingerprint is the sha256 of the annotation file's bytes;
* bad input is a ConfigError naming the key and the first offender; an empty results list scores 0 with a warning.

(The multitask-checkpoint path, results predicted by the run's sequence tasks, is in ``test_mad_multitask.py``.)"""

import copy
import hashlib
import json
import logging
import math

import numpy as np
import pytest

from polymae.pipeline.config import ConfigError
from polymae.pipeline.evaluate import coco as C
from polymae.pipeline.evaluate.results import EvalContext

from coco_helpers import CAPTIONS, INSTANCES, KPTS, write_coco_photos

pytestmark = pytest.mark.integration

# COCO's per-keypoint OKS sigmas (pycocotools COCOeval Params.kpt_oks_sigmas), for the hand computation
SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The coco_helpers files (images, instances, keypoints, captions) and their COCO indexes."""
    files = write_coco_photos(str(tmp_path_factory.mktemp("coco")))
    return files, {k: C.load_coco(files[k]) for k in ("instances", "keypoints", "captions")}


def _write(tmp_path, name: str, results) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def _run(tmp_path, annotations: str, results: list, max_samples: int = 0, **kw) -> dict:
    cfg = C.CocoConfig(annotations=annotations, results=results, **kw)
    cfg.validate()
    return C.run_coco(cfg, EvalContext(checkpoint="unused", output=str(tmp_path / "out"), max_samples=max_samples))


def _boxes(score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
            for a in INSTANCES]


def test_perfect_boxes_masks_in_one_file_and_the_fingerprint(coco, tmp_path):
    files, gts = coco
    gt = gts["instances"]
    both = [dict(r, segmentation=C.mask_to_rle(gt.annToMask(gt.anns[a["id"]]))) for r, a in zip(_boxes(), INSTANCES)]
    res = _run(tmp_path, files["instances"], [_write(tmp_path, "both.json", both)])
    m = res["metrics"]
    assert m["bbox_AP"] == pytest.approx(1.0) and m["bbox_AP50"] == pytest.approx(1.0)
    assert m["segm_AP"] == pytest.approx(1.0) and m["segm_AP75"] == pytest.approx(1.0)
    assert not any(k.startswith(("keypoints", "BLEU")) for k in m)
    ds = res["dataset"]
    assert ds["fingerprint"] == hashlib.sha256(open(files["instances"], "rb").read()).hexdigest()
    assert ds["samples"] == {"val": 3} and ds["path"] == files["instances"]
    assert res["predictions"] == {"bbox": 4, "segm": 4} and res["kind"] == "instances"


def test_partial_boxes_score_the_hand_computed_ap_and_max_samples_scores_the_first_images(coco, tmp_path):
    """Person and cup found exactly (AP 1 each); cats: the big one exactly (0.9), a box where there is no cat (0.8),
    the small cat missed: ranked TP, FP, recall 1/2 at precision 1, so the 101-point interpolated precision is 1 at
    recalls 0.00..0.50 (51 points) and 0 above: 51/101, at every IoU threshold. COCO averages over categories:
    (1 + 1 + 51/101) / 3 = 253/303. With max_samples=1 only image 1 (the person) is scored: AP 1."""
    files, _ = coco
    preds = [dict(r, score=0.9) for r in _boxes() if r["image_id"] != 3 or r["bbox"][0] == 110]
    preds.append({"image_id": 3, "category_id": 3, "bbox": [200, 5, 40, 10], "score": 0.8})
    path = _write(tmp_path, "det.results.json", preds)
    m = _run(tmp_path, files["instances"], [path], iou_types=["bbox"])["metrics"]
    assert m["bbox_AP"] == pytest.approx(253 / 303, abs=1e-6) and m["bbox_AP50"] == pytest.approx(253 / 303, abs=1e-6)
    assert not any(k.startswith("segm") for k in m)
    first = _run(tmp_path, files["instances"], [path], max_samples=1)
    assert first["metrics"]["bbox_AP"] == pytest.approx(1.0) and first["dataset"]["samples"] == {"val": 1}
    assert first["predictions"]["bbox"] == 1


def test_keypoints_perfect_and_shifted_by_20_pixels(coco, tmp_path):
    """Every labelled keypoint (13, v > 0) moved 20 px right: OKS = mean_i exp(-20^2 / (2 area (2 sigma_i)^2)) with
    the ground-truth area 98000, = 0.7687, so the one detection matches at thresholds 0.50..0.75 (6 of 10) and
    AP = 6/10 (AP50 = AP75 = 1); no medium-sized person: APm = -1 (COCO's 'no ground truth')."""
    files, _ = coco
    perfect = [{"image_id": 1, "category_id": 1, "keypoints": KPTS, "score": 1.0}]
    m = _run(tmp_path, files["keypoints"], [_write(tmp_path, "kpt.json", perfect)], iou_types=["keypoints"])["metrics"]
    assert m["keypoints_AP"] == pytest.approx(1.0)
    shifted = [v + 20 if i % 3 == 0 and KPTS[i + 2] > 0 else v for i, v in enumerate(KPTS)]
    labelled = np.array(KPTS[2::3]) > 0
    oks = float(np.exp(-20.0 ** 2 / (2 * 98000 * (2 * SIGMAS[labelled]) ** 2)).mean())
    assert 0.75 < oks < 0.8
    m = _run(tmp_path, files["keypoints"], [_write(tmp_path, "kpt2.json", [dict(perfect[0], keypoints=shifted)])],
             iou_types=["keypoints"])["metrics"]
    assert m["keypoints_AP"] == pytest.approx(0.6) and m["keypoints_AP50"] == m["keypoints_AP75"] == pytest.approx(1.0)
    assert m["keypoints_APm"] == -1.0 and set(m) == {f"keypoints_{k}" for k in C.STAT_NAMES["keypoints"]}


def test_captions_perfect_and_one_hand_counted_sentence(coco, tmp_path, caplog):
    """'A cup of coffee on a table.' against 'A cup of coffee on a saucer.' / 'A white cup of coffee with a spoon.'
    (8 tokens, the closest reference 8: no brevity penalty): clipped n-gram precisions 7/8, 5/7, 4/6, 3/5, whose
    product is 1/4: BLEU-4 = (1/4)^(1/4) = 1/sqrt(2). Images 1 and 3 have no caption: not scored, logged."""
    files, _ = coco
    perfect = [{"image_id": i, "caption": caps[0]} for i, caps in CAPTIONS.items()]
    res = _run(tmp_path, files["captions"], [_write(tmp_path, "cap.json", perfect)])
    assert res["metrics"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and res["metrics"]["CIDEr"] > 3.0
    assert set(res["metrics"]) == {"BLEU-4", "CIDEr"} and res["kind"] == "captions"
    with caplog.at_level(logging.WARNING):
        res = _run(tmp_path, files["captions"],
                   [_write(tmp_path, "cap1.json", [{"image_id": 2, "caption": "A cup of coffee on a table."}])])
    assert res["metrics"]["BLEU-4"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert res["dataset"]["samples"] == {"val": 1}
    assert "no caption for 2 of the 3 captioned images" in caplog.text


def test_two_files_in_one_run(coco, tmp_path):
    files, gts = coco
    gt = gts["instances"]
    masks = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
              "segmentation": C.mask_to_rle(gt.annToMask(gt.anns[a["id"]]))} for a in INSTANCES[:2]]
    res = _run(tmp_path, files["instances"], [_write(tmp_path, "det.json", _boxes()),
                                              _write(tmp_path, "seg.json", masks)])
    # masks of the person and the cup only: AP 1 for those two categories, 0 for the cat
    assert res["metrics"]["bbox_AP"] == pytest.approx(1.0) and res["metrics"]["segm_AP"] == pytest.approx(2 / 3)
    assert res["sources"] == {"bbox": str(tmp_path / "det.json"), "segm": str(tmp_path / "seg.json")}


def test_empty_results_score_zero_with_a_warning(coco, tmp_path, caplog):
    files, _ = coco
    with caplog.at_level(logging.WARNING):
        m = _run(tmp_path, files["instances"], [_write(tmp_path, "empty.json", [])])["metrics"]
    assert m["bbox_AP"] == 0.0 and m["segm_AP"] == 0.0
    assert "has no bbox predictions on the 3 scored images" in caplog.text
    with caplog.at_level(logging.WARNING):
        m = _run(tmp_path, files["captions"], [_write(tmp_path, "empty_cap.json", [])])["metrics"]
    assert m == {"BLEU-4": 0.0, "CIDEr": 0.0}


def _error(tmp_path, annotations, results, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, annotations, results, **kw)
    return e.value


def test_predictions_outside_the_annotations_are_named(coco, tmp_path):
    files, gts = coco
    bad_img = _boxes()
    bad_img[2] = dict(bad_img[2], image_id=99)
    e = _error(tmp_path, files["instances"], [_write(tmp_path, "img.json", bad_img)])
    assert e.key == "coco.results" and "entry 2" in str(e) and "image_id 99" in str(e) and "img.json" in str(e)
    bad_cat = _boxes()
    bad_cat[1] = dict(bad_cat[1], category_id=7)
    e = _error(tmp_path, files["instances"], [_write(tmp_path, "cat.json", bad_cat)])
    assert e.key == "coco.results" and "entry 1" in str(e) and "category_id 7" in str(e)
    rle = C.mask_to_rle(np.ones((10, 10), bool))  # not the image's size
    e = _error(tmp_path, files["instances"], [_write(tmp_path, "rle.json", [dict(_boxes()[0], segmentation=rle)])],
               iou_types=["segm"])
    assert e.key == "coco.results" and "[512, 512]" in str(e)
    e = _error(tmp_path, files["keypoints"], [_write(tmp_path, "k.json", [{"image_id": 1, "category_id": 1,
                                                                          "keypoints": KPTS[:-3], "score": 1}])])
    assert e.key == "coco.results" and "51 numbers" in str(e)
    twice = [{"image_id": 2, "caption": "a cup"}, {"image_id": 2, "caption": "a mug"}]
    e = _error(tmp_path, files["captions"], [_write(tmp_path, "twice.json", twice)])
    assert e.key == "coco.results" and "entry 1" in str(e) and "second caption for image 2" in str(e)


def test_settings_that_do_not_fit_are_config_errors(coco, tmp_path):
    files, _ = coco
    det = _write(tmp_path, "det.json", _boxes())
    caps = _write(tmp_path, "cap.json", [{"image_id": 1, "caption": "an astronaut"}])
    assert _error(tmp_path, "", [det]).key == "coco.annotations"
    assert _error(tmp_path, str(tmp_path / "missing.json"), [det]).key == "coco.annotations"
    assert _error(tmp_path, files["instances"], [str(tmp_path / "missing.json")]).key == "coco.results"
    assert _error(tmp_path, files["instances"], [caps]).key == "coco.results"  # captions vs instances
    e = _error(tmp_path, files["instances"], [det], iou_types=["keypoints"])
    assert e.key == "coco.iou_types" and "no keypoints ground truth" in str(e)
    e = _error(tmp_path, files["instances"], [det], iou_types=["segm"])
    assert e.key == "coco.iou_types" and "segm predictions" in str(e)
    e = _error(tmp_path, files["instances"], [det, _write(tmp_path, "det2.json", copy.deepcopy(_boxes()))])
    assert e.key == "coco.results" and "both" in str(e)
    assert _error(tmp_path, files["instances"], [det], kind="captions").key == "coco.kind"
    for cfg, key in [(C.CocoConfig(iou_types=["box"]), "coco.iou_types"),
                     (C.CocoConfig(iou_types=["bbox", "bbox"]), "coco.iou_types"),
                     (C.CocoConfig(kind="captions", iou_types=["bbox"]), "coco.iou_types"),
                     (C.CocoConfig(annotations=files["instances"]), "coco.images"),
                     (C.CocoConfig(results=[""]), "coco.results")]:
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        assert e.value.key == key, cfg
    with pytest.raises(ConfigError) as e:
        C.CocoConfig(annotations=files["instances"], results=[str(tmp_path / "nope.json")]).preflight()
    assert e.value.key == "coco.results"


def test_evaluate_scores_prediction_files_of_any_model_without_a_checkpoint(coco, tmp_path, capsys):
    """`polymae evaluate protocol=coco checkpoint= coco.results=...`: predictions from any model are scored and the
    table row is keyed by the file, its digest the sha256 of the files' digests; no checkpoint without results is
    an error naming the key."""
    from polymae.jobs.evaluate import main
    from polymae.pipeline.evaluate.results import read_table

    files, _ = coco
    preds = _write(tmp_path, "boxes.json", _boxes())
    table = str(tmp_path / "table")
    assert main(["protocol=coco", "checkpoint=", f"coco.annotations={files['instances']}", f"coco.results={preds}",
                 f"results_table={table}", f"output={tmp_path / 'out'}"]) == 0
    res = json.load(open(tmp_path / "out" / "results.json"))
    digest = hashlib.sha256(hashlib.sha256(open(preds, "rb").read()).hexdigest().encode()).hexdigest()
    assert res["checkpoint"] == preds and res["checkpoint_sha256"] == digest and res["metrics"]["bbox_AP"] == 1.0
    rows = read_table(table)
    assert {(r["checkpoint"], r["metric"]) for r in rows} >= {(preds, "bbox_AP")}
    with pytest.raises(SystemExit) as e:
        main(["protocol=depth", "checkpoint="])
    assert e.value.code == 2 and "'checkpoint'" in capsys.readouterr().err


def test_a_release_without_its_local_annotations_skips_the_task_with_the_way_to_score_it():
    from polymae.pipeline.evaluate.sequence import evaluate_sequence_task

    info = {"mad_task": "det", "val_annotations": "<local>/instances_val.json"}  # as publish writes a local path
    res = evaluate_sequence_task(None, "det", info, img_size=32)
    assert "protocol=coco coco.annotations=" in res["skipped"]
