"""Small real datasets made from images that installed packages ship (scikit-image), written in the folder layouts the
downstream protocols read: the quickstart's downstream stage and the tests use them; nothing is downloaded.

* :func:`write_lfw_faces`: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces, 25×25 gray) as an ImageNet-style
  ``{root}/{train,val}/{faces,nonfaces}/*.png`` folder (80/20 per class) for the linear probe and fine-tuning;
* :func:`write_motorcycle_nyuv2`: crops of the Middlebury 2014 motorcycle pair (``stereo_motorcycle``) with depth
  from its ground-truth disparity, in the NYUv2 layout (``datasets/dense_folder.py``) for the depth protocol;
* :func:`write_horse_ade20k`: the ``horse`` silhouette composited on the astronaut photograph, 2 classes, in the
  ADE20K layout for the segmentation protocol;
* :func:`write_class_split`: any ``[N, H, W]`` float images with labels as a train/val class folder.
"""

from __future__ import annotations

import os

import numpy as np

# calibration of the down-sampled pair in scikit-image (``skimage.data.stereo_motorcycle`` docstring)
MOTORCYCLE = {"focal_px": 994.978, "baseline_mm": 193.001, "doffs_px": 31.086}


def write_class_split(root: str, images, labels, names, size: int = 32, train_fraction: float = 0.8) -> str:
    """``{root}/{train,val}/{class name}/{i}.png`` from float ``[0, 1]`` gray images, the first ``train_fraction`` of
    each class in train, the rest in val, resized to ``size`` px (bicubic). Returns ``root``."""
    from PIL import Image

    labels = np.asarray(labels)
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)
        cut = int(round(len(idx) * train_fraction))
        for j, i in enumerate(idx):
            d = os.path.join(root, "train" if j < cut else "val", name)
            os.makedirs(d, exist_ok=True)
            arr = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(os.path.join(d, f"{i:04d}.png"))
    return root


def write_lfw_faces(root: str, size: int = 32) -> str:
    """scikit-image's ``lfw_subset`` (100 faces then 100 non-faces, 25×25 gray in [0, 1]) as
    ``{root}/{train,val}/{faces,nonfaces}/*.png`` at ``size`` px: 160 train, 40 val images. Returns ``root``."""
    import skimage.data

    return write_class_split(root, skimage.data.lfw_subset(), [0] * 100 + [1] * 100, ["faces", "nonfaces"], size)


def motorcycle_depth_mm() -> tuple[np.ndarray, np.ndarray]:
    """``(left image uint8 [500, 741, 3], depth uint16 [500, 741] millimetres, 0 = unknown)`` of scikit-image's
    Middlebury 2014 pair: Z = f·B / (d + doffs) (Middlebury's formula; ``doffs`` is the principal points' x offset)."""
    import skimage.data

    left, _, disp = skimage.data.stereo_motorcycle()
    ok = np.isfinite(disp)
    depth = np.where(ok, MOTORCYCLE["focal_px"] * MOTORCYCLE["baseline_mm"] / (np.where(ok, disp, 0) + MOTORCYCLE["doffs_px"]), 0.0)
    return left, np.round(depth).astype(np.uint16)


def write_motorcycle_nyuv2(root: str, n_train: int = 4, n_val: int = 3) -> str:
    """NYUv2-layout folder ``{root}/{train,val}/{rgb,depth,semseg}/*.png`` of 240x320 crops downscaled 2x."""
    from PIL import Image

    left, depth = motorcycle_depth_mm()
    med = np.median(depth[depth > 0])
    offsets = [(r, c) for r in (0, 130, 260) for c in (0, 210, 420)][:n_train + n_val]
    for k, (r, c) in enumerate(offsets):
        split = "train" if k < n_train else "val"
        rgb = np.asarray(Image.fromarray(left[r:r + 240, c:c + 320]).resize((160, 120), Image.BILINEAR))
        d = depth[r:r + 240:2, c:c + 320:2]  # nearest: unknown pixels stay exactly 0
        seg = np.where(d == 0, 255, np.where(d < med, 0, 1)).astype(np.uint8)
        for mod, arr in (("rgb", rgb), ("depth", d), ("semseg", seg)):
            os.makedirs(os.path.join(root, split, mod), exist_ok=True)
            Image.fromarray(arr).save(os.path.join(root, split, mod, f"moto{k}.png"))
    return root


def horse_scene() -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8 [328, 400, 3], ADE20K-style labels uint8: 1 horse, 2 background, 0 border)``."""
    import skimage.data
    from PIL import Image

    horse = ~skimage.data.horse()  # the silhouette is False on a True background
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((400, 328), Image.BILINEAR)).astype(float)
    rgb = np.where(horse[..., None], 0.3 * photo + 0.7 * np.array([140.0, 80.0, 30.0]), photo)
    label = np.where(horse, 1, 2).astype(np.uint8)
    label[:3], label[-3:], label[:, :3], label[:, -3:] = 0, 0, 0, 0
    return rgb.round().astype(np.uint8), label


def write_horse_ade20k(root: str, n_train: int = 6, n_val: int = 3) -> str:
    """ADE20K-layout folder of 200x240 crops (some flipped) of :func:`horse_scene`, downscaled 2x."""
    from PIL import Image

    rgb, label = horse_scene()
    offsets = [(0, 0), (128, 160), (64, 80), (0, 160), (128, 0), (40, 120), (100, 40), (20, 60), (90, 150)]
    for k, (r, c) in enumerate(offsets[:n_train + n_val]):
        split = "training" if k < n_train else "validation"
        im, lab = rgb[r:r + 200, c:c + 240], label[r:r + 200, c:c + 240]
        if k % 2:
            im, lab = im[:, ::-1], lab[:, ::-1]
        for d in ("images", "annotations"):
            os.makedirs(os.path.join(root, d, split), exist_ok=True)
        Image.fromarray(np.ascontiguousarray(im)).resize((120, 100), Image.BILINEAR).save(
            os.path.join(root, "images", split, f"horse{k}.jpg"), quality=95)
        Image.fromarray(np.ascontiguousarray(lab)).resize((120, 100), Image.NEAREST).save(
            os.path.join(root, "annotations", split, f"horse{k}.png"))
    return root
