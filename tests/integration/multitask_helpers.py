"""Helpers for multitask tests: a tiny pre-trained encoder written as a release folder, an ImageNet-style class
folder of scikit-image photographs, and the tiny multitask settings (3 tasks, 32 px)."""

from __future__ import annotations

import json
import os

import numpy as np

# class of each photograph (a small hand-written label set)
PHOTO_CLASSES = {"astronaut": "person", "camera": "person", "chelsea": "animal", "coffee": "object",
                 "rocket": "object", "coins": "object", "immunohistochemistry": "texture", "colorwheel": "texture"}


def write_tiny_encoder(folder: str, seed: int = 0) -> str:
    """A release folder (``model.safetensors`` + ``model_config.json``) of a random-weight MultiMAE with a 4-block,
    32-wide encoder at 32 px; returns ``folder``."""
    import torch
    from safetensors.torch import save_file

    from polymae.models.multimae import create_model

    torch.manual_seed(seed)
    model = create_model("multimae_tiny", img_size=32, dim=32, depth=4, num_heads=2, semseg_num_classes=8,
                         decoder_dim=32, decoder_depth=1, decoder_heads=2)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "model_config.json"), "w") as fh:
        json.dump({"name": "multimae_tiny", "init_kwargs": model.init_kwargs, "pretrain": {"img_size": 32}}, fh)
    return folder


def write_class_folder(root: str, names=tuple(PHOTO_CLASSES), size: int = 64) -> str:
    """``{root}/{class}/{photo}.jpg`` for the scikit-image photographs ``names``; returns ``root``."""
    import skimage.data
    from PIL import Image

    for name in names:
        d = os.path.join(root, PHOTO_CLASSES[name])
        os.makedirs(d, exist_ok=True)
        arr = np.asarray(getattr(skimage.data, name)())
        Image.fromarray(arr).convert("RGB").resize((size, size)).save(os.path.join(d, f"{name}.jpg"), quality=90)
    return root


def multitask_args(shards: str, classes: str, encoder: str, output: str, steps: int = 6) -> list[str]:
    """``key=value`` overrides of a tiny 3-task run: depth + semseg on ``shards``, cls on ``classes``."""
    return [f"output={output}", f"encoder={encoder}", "img_size=32", f"train.steps={steps}",
            "train.num_workers=0", "train.readers=2", "train.seed=3", "train.shuffle_buffer=4", "train.log_interval=1",
            "optim.lr=0.002", "optim.warmup_steps=1", "optim.encoder_lr_mult=0.5", "optim.layer_decay=0.75",
            "tasks.depth.kind=depth", f"tasks.depth.shards={shards}", "tasks.depth.micro_batch=2",
            "tasks.depth.global_batch=4", "tasks.depth.sampling_weight=0.5", "tasks.depth.head_width=16",
            "tasks.semseg.kind=semseg", f"tasks.semseg.shards={shards}", "tasks.semseg.micro_batch=1",
            "tasks.semseg.global_batch=4", "tasks.semseg.sampling_weight=0.3", "tasks.semseg.loss_weight=0.5",
            "tasks.semseg.head_width=16", "tasks.semseg.head_depth=1",
            "tasks.cls.kind=cls", f"tasks.cls.folder={classes}", "tasks.cls.micro_batch=2", "tasks.cls.global_batch=4",
            "tasks.cls.sampling_weight=0.2", "tasks.cls.loss_weight=2.0"]
