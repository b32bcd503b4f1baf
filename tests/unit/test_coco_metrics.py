"""COCO metrics through pycocotools / pycocoevalcap on a COCO-format file written by hand over the scikit-image
photographs: perfect predictions score AP 1.0, a partial case scores the hand-computed value, captions score."""

import json

import pytest

from polymae.pipeline.evaluate import coco as C

pytestmark = pytest.mark.unit

# the astronaut (512 x 512): a person box, a polygon around her, 17 keypoints (COCO order) placed by hand;
# coffee (400 x 600): the cup; chelsea (300 x 451): the cat
KPTS = [258, 118, 2, 275, 103, 2, 240, 103, 2, 296, 113, 2, 220, 113, 1, 340, 210, 2, 175, 215, 2, 380, 330, 2,
        150, 330, 2, 340, 430, 2, 190, 420, 2, 300, 470, 2, 220, 470, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
GT = {
    "images": [{"id": 1, "file_name": "astronaut.png", "width": 512, "height": 512},
               {"id": 2, "file_name": "coffee.png", "width": 600, "height": 400},
               {"id": 3, "file_name": "chelsea.png", "width": 451, "height": 300}],
    "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)],
                    "skeleton": [[16, 14], [14, 12]]},
                   {"id": 2, "name": "cup"}, {"id": 3, "name": "cat"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [120, 40, 300, 472], "area": 98000.0, "iscrowd": 0,
         "segmentation": [[150, 40, 380, 40, 420, 300, 400, 512, 120, 512, 130, 200]],
         "keypoints": KPTS, "num_keypoints": 13},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [180, 70, 260, 230], "area": 45000.0, "iscrowd": 0,
         "segmentation": [[180, 70, 440, 70, 440, 300, 180, 300]]},
        {"id": 3, "image_id": 3, "category_id": 3, "bbox": [110, 20, 300, 270], "area": 70000.0, "iscrowd": 0,
         "segmentation": [[110, 20, 410, 20, 410, 290, 110, 290]]},
        {"id": 4, "image_id": 3, "category_id": 3, "bbox": [5, 200, 60, 60], "area": 3000.0, "iscrowd": 0,
         "segmentation": [[5, 200, 65, 200, 65, 260, 5, 260]]}],
}


def _perfect(iou_type, gt=None):
    """Every ground-truth annotation as a prediction of score 1 (masks as RLE through the index ``gt``)."""
    out = []
    for a in GT["annotations"]:
        r = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
        if iou_type == "bbox":
            r["bbox"] = a["bbox"]
        elif iou_type == "segm":
            r["segmentation"] = C.mask_to_rle(gt.annToMask(gt.anns[a["id"]]))
        elif "keypoints" in a:
            r["keypoints"] = a["keypoints"]
        else:
            continue
        out.append(r)
    return out


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_perfect_predictions_score_ap_one(iou_type, tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(GT))
    gt = C.load_coco(str(path))
    stats = C.coco_ap(gt, _perfect(iou_type, gt), iou_type)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_a_partial_case_scores_the_hand_computed_ap(tmp_path):
    """Cats only (image 3 has two): one exact box (score 0.9), one box where there is no cat (0.8), the small cat
    missed; the file holds the cat category only. At every IoU threshold the ranked list is TP, FP: recall
    reaches 0.5 at precision 1, then precision falls to 0.5 without new recall. The 101-point interpolated
    precision is 1 at recalls 0.00..0.50 (51 points) and 0 above: AP = 51 / 101."""
    gt = C.load_coco({**GT, "annotations": [a for a in GT["annotations"] if a["category_id"] == 3],
                      "categories": [GT["categories"][2]]})
    preds = [{"image_id": 3, "category_id": 3, "bbox": [110, 20, 300, 270], "score": 0.9},
             {"image_id": 3, "category_id": 3, "bbox": [200, 5, 40, 10], "score": 0.8}]
    stats = C.coco_ap(gt, preds, "bbox")
    assert stats["AP"] == pytest.approx(51 / 101, abs=1e-6) and stats["AP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert C.coco_ap(gt, [], "bbox")["AP"] == 0.0
    with pytest.raises(ValueError, match="iou_type"):
        C.coco_ap(gt, preds, "boxes")


def test_results_json_round_trip(tmp_path):
    url = str(tmp_path / "results" / "bbox.json")
    C.write_results(_perfect("bbox"), url)
    assert json.loads(open(url).read()) == _perfect("bbox")


def test_caption_scores():
    refs = {1: ["An astronaut in a white suit poses with a flag.", "A woman astronaut smiles in front of a flag."],
            2: ["A cup of coffee on a saucer.", "A white cup of coffee with a spoon."]}
    same = C.caption_scores(refs, {1: refs[1][0], 2: refs[2][0]})
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["cider"] > 3.0
    other = C.caption_scores(refs, {1: "a cat sleeps on a red blanket", 2: "a rocket stands on the pad"})
    assert other["bleu4"] < 0.01 and other["cider"] < 0.5 < same["cider"]
    assert C.tokenize_caption("A cup, of COFFEE.") == "a cup , of coffee ."


def test_cider_equals_the_hand_computed_value():
    """CIDEr-D (Vedantam et al. 2015, Eq. 2-4 with pycocoevalcap's clipping and length penalty) on two images with
    one reference each. idf = log(N) - log(max(1, df)) with N = 2: "a" is in both references (weight 0), every other
    n-gram weighs log 2 (so the weights cancel in the cosine). Image 1 predicted exactly: cosine 1 for n = 1, 2, 3
    and 0 for n = 4 (3 words have no 4-gram): 10 * 3/4 = 7.5. Image 2, "a dog sits" for "a dog runs": n = 1
    {dog, sits} vs {dog, runs} -> 1/2; n = 2 {a dog, dog sits} vs {a dog, dog runs} -> 1/2; n = 3 -> 0; n = 4 -> 0:
    10 * 1/4 = 2.5. Same lengths: no penalty. Corpus CIDEr = (7.5 + 2.5) / 2 = 5.0."""
    refs = {1: ["a cat sits"], 2: ["a dog runs"]}
    assert C.caption_scores(refs, {1: "a cat sits", 2: "a dog sits"})["cider"] == pytest.approx(5.0, abs=1e-9)
