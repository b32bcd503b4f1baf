"""A COCO-format dataset written by hand over three scikit-image photographs (astronaut 512 x 512, coffee 600 x 400,
chelsea 451 x 300): boxes and polygons of the objects in them (instances), 17 keypoints on the astronaut
(person_keypoints), two captions per image (captions); and the key=value overrides of a tiny multitask run with the
four sequence tasks (det, seg, kpt, cap) sharing one Masked AutoDecoder."""

from __future__ import annotations

import json
import os

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea")
# COCO order: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles (the ankles are out of the picture)
KPTS = [258, 118, 2, 275, 103, 2, 240, 103, 2, 296, 113, 2, 220, 113, 1, 340, 210, 2, 175, 215, 2, 380, 330, 2,
        150, 330, 2, 340, 430, 2, 190, 420, 2, 300, 470, 2, 220, 470, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
IMAGES = [{"id": 1, "file_name": "astronaut.jpg", "width": 512, "height": 512},
          {"id": 2, "file_name": "coffee.jpg", "width": 600, "height": 400},
          {"id": 3, "file_name": "chelsea.jpg", "width": 451, "height": 300}]
PERSON = {"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)], "skeleton": [[16, 14], [14, 12]]}
CATEGORIES = [PERSON, {"id": 2, "name": "cup"}, {"id": 3, "name": "cat"}]
INSTANCES = [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [120, 40, 300, 472], "area": 98000.0, "iscrowd": 0,
     "segmentation": [[150, 40, 380, 40, 420, 300, 400, 512, 120, 512, 130, 200]]},
    {"id": 2, "image_id": 2, "category_id": 2, "bbox": [180, 70, 260, 230], "area": 45000.0, "iscrowd": 0,
     "segmentation": [[230, 70, 390, 70, 440, 140, 440, 240, 390, 300, 230, 300, 180, 240, 180, 140]]},
    {"id": 3, "image_id": 3, "category_id": 3, "bbox": [110, 20, 300, 270], "area": 70000.0, "iscrowd": 0,
     "segmentation": [[110, 120, 200, 20, 330, 20, 410, 150, 380, 290, 140, 290]]},
    {"id": 4, "image_id": 3, "category_id": 3, "bbox": [5, 200, 60, 60], "area": 3000.0, "iscrowd": 0,
     "segmentation": [[35, 200, 65, 230, 35, 260, 5, 230]]}]
CAPTIONS = {1: ["An astronaut in a white suit poses with a flag.", "A woman astronaut smiles in front of a flag."],
            2: ["A cup of coffee on a saucer.", "A white cup of coffee with a spoon."],
            3: ["A cat lies on a red blanket.", "A tabby cat rests on a blanket."]}


def write_coco_photos(root: str) -> dict[str, str]:
    """``{root}/images/*.jpg`` and ``{root}/instances.json``, ``person_keypoints.json``, ``captions.json``;
    returns their paths by name (``images``, ``instances``, ``keypoints``, ``captions``)."""
    import skimage.data
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for name, img in zip(PHOTOS, IMAGES):
        arr = np.asarray(getattr(skimage.data, name)())
        pil = Image.fromarray(arr).convert("RGB")
        assert pil.size == (img["width"], img["height"]), (name, pil.size)
        pil.save(os.path.join(root, "images", img["file_name"]), quality=90)
    person = dict(INSTANCES[0], keypoints=KPTS, num_keypoints=13)
    files = {"instances": {"images": IMAGES, "categories": CATEGORIES, "annotations": INSTANCES},
             "keypoints": {"images": IMAGES, "categories": [PERSON], "annotations": [person]},
             "captions": {"images": IMAGES, "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                                                           for i, caps in CAPTIONS.items()
                                                           for j, c in enumerate(caps)]}}
    out = {"images": os.path.join(root, "images")}
    for name, data in files.items():
        out[name] = os.path.join(root, f"{name}.json")
        with open(out[name], "w") as fh:
            json.dump(data, fh)
    return out


def sequence_task_args(coco: dict[str, str], output: str, encoder: str, steps: int) -> list[str]:
    """Overrides of a tiny run of the four sequence tasks (32 px, a 1-layer 32-wide decoder, seg drawn twice as often
    as each other task: its 16 x 16 grids need the most steps),
    each scored on its own training annotations by evaluate."""
    args = [f"output={output}", f"encoder={encoder}", "img_size=32", f"train.steps={steps}", "train.zero_stage=0",
            "train.num_workers=0", "train.seed=1", "train.log_interval=1", "optim.lr=0.005", "optim.min_lr=0.002",
            "optim.warmup_steps=1", "optim.encoder_lr_mult=0.3", "optim.weight_decay=0.0"]
    files = {"det": "instances", "seg": "instances", "kpt": "keypoints", "cap": "captions"}
    for task, f in files.items():
        args += [f"tasks.{task}.kind={task}", f"tasks.{task}.annotations={coco[f]}",
                 f"tasks.{task}.images={coco['images']}", f"tasks.{task}.val_annotations={coco[f]}",
                 f"tasks.{task}.micro_batch={1 if task == 'kpt' else 3}",
                 f"tasks.{task}.global_batch={1 if task == 'kpt' else 3}",
                 f"tasks.{task}.sampling_weight={2.0 if task == 'seg' else 1.0}", f"tasks.{task}.head_width=32",
                 f"tasks.{task}.decoder_depth=1", f"tasks.{task}.decoder_heads=2"]
    return args
