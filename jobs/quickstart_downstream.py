"""The quickstart's downstream stage: the pre-trained and the multitask checkpoints through three ``polymae evaluate``
protocols on small real datasets that scikit-image ships (``datasets/samples.py``), then ``--compare``.

* ``linear_probe`` on ``lfw_subset`` (faces vs non-faces): frozen encoder, BN + linear, LARS; top-1;
* ``depth`` on crops of the Middlebury 2014 motorcycle pair (NYUv2 layout, depth from the ground-truth
  disparity): a DPT head fine-tuned with berHu; δ1-3, AbsRel, RMSE over every validation image;
* ``semseg`` on the horse silhouette over a photograph (ADE20K layout, 2 classes): a ConvNeXt head; mIoU.

The settings are tiny (64 px, 30-40 fine-tuning steps) so the stage takes seconds on 2 CPU cores; the numbers
show the pipeline working end to end, not the quality of a 40-step model. Each run writes its ``results.json``,
pictures and rows of ``{work}/results`` (the results table).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("polymae.quickstart")

#: the protocols' key=value settings; ``{data}`` is replaced by the dataset folder
PROTOCOLS: dict[str, list[str]] = {
    "linear_probe": ["linear_probe.data={data}", "linear_probe.img_size=64", "linear_probe.epochs=30",
                     "linear_probe.warmup_epochs=3", "linear_probe.batch_size=32", "linear_probe.blr=30",
                     "linear_probe.augment=false", "linear_probe.num_workers=0"],
    "depth": ["depth.root={data}", "depth.img_size=64", "depth.steps=40", "depth.batch_size=4", "depth.lr=1e-2",
              "depth.warmup_epochs=0.5", "depth.weight_decay=0", "depth.head_width=16", "depth.num_workers=0",
              "depth.pictures=2", "depth.drop_path=0"],
    "semseg": ["semseg.root={data}", "semseg.layout=ade20k", "semseg.num_classes=2", "semseg.img_size=64",
               "semseg.steps=30", "semseg.batch_size=4", "semseg.lr=5e-3", "semseg.warmup_epochs=0.5",
               "semseg.weight_decay=0", "semseg.head_width=16", "semseg.head_depth=1", "semseg.num_workers=0",
               "semseg.pictures=2", "semseg.drop_path=0"],
}


def prepare_downstream_data(work: str) -> dict[str, str]:
    """``{protocol: dataset folder}`` under ``{work}/downstream`` (rewritten each run)."""
    import shutil

    from polymae.datasets.samples import write_horse_ade20k, write_lfw_faces, write_motorcycle_nyuv2

    root = os.path.join(work, "downstream")
    shutil.rmtree(root, ignore_errors=True)
    return {"linear_probe": write_lfw_faces(os.path.join(root, "lfw"), size=64),
            "depth": write_motorcycle_nyuv2(os.path.join(root, "motorcycle-nyuv2")),
            "semseg": write_horse_ade20k(os.path.join(root, "horse-ade20k"))}


def run_downstream_stage(work: str, checkpoints: dict[str, str]) -> dict:
    """Every checkpoint of ``checkpoints`` (``{label: run folder}``) through :data:`PROTOCOLS`, then the results
    table's comparison of them. Returns ``{"metrics": {label: {protocol: metrics}}, "outputs": {label: {protocol:
    folder}}, "table": folder, "compare": markdown}``.

    Raises:
        RuntimeError / ConfigError: as ``polymae evaluate``.
    """
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate
    from polymae.pipeline.evaluate.results import compare

    data = prepare_downstream_data(work)
    table = os.path.join(work, "results")
    metrics: dict = {}
    outputs: dict = {}
    for label, ckpt in checkpoints.items():
        for protocol, settings in PROTOCOLS.items():
            overrides = [f"checkpoint={ckpt}", f"protocol={protocol}", f"results_table={table}", "batch_size=8",
                         *(s.format(data=data[protocol]) for s in settings)]
            res = evaluate(load_config(EvaluateConfig, overrides=overrides))
            metrics.setdefault(label, {})[protocol] = res["metrics"]
            outputs.setdefault(label, {})[protocol] = res["output"]
            log.info("%s %s: %s", label, protocol, res["metrics"])
    return {"metrics": metrics, "outputs": outputs, "table": table, "compare": compare(table, list(checkpoints.values()))}
