"""``synfer train-labeler``: FERAnno trained on labelled faces through the FER training job.

The labeler is one more architecture of :func:`synfer_ray.train.fer.run_train` (``feranno``: a
head over the bundle's frozen diffusion features), so it gets the same data pipeline, Ray Train +
DeepSpeed loop, checkpoints, resume, evaluation and MLflow registry. Afterwards the head is also
installed as ``labeler/`` in a new version of the bundle, which the generation pipeline and Serve
then use as a voter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from synfer_ray.config import TrainConfig
from synfer_ray.errors import SynferError
from synfer_ray.labeler.feranno import LABELER_DIR

BUNDLE_DIR = "bundle"


def run_train_labeler(config: TrainConfig, overwrite: bool = False) -> dict[str, Any]:
    from synfer_ray.bundle import BundleManifest, new_bundle_version
    from synfer_ray.train.fer import MODEL_DIR, run_train
    if config.model.arch != "feranno":
        raise SynferError("model.arch", config.model.arch, "feranno (train-labeler trains the FERAnno labeler; "
                                                           "use `synfer train` for other classifiers)")
    if config.optim.zero_stage == 3:
        raise SynferError("optim.zero_stage", 3, "0, 1 or 2 for the labeler (its frozen UNet is read by hooks, "
                                                 "which ZeRO-3 partitioning would hide)")
    BundleManifest.read(Path(config.model.bundle))  # a clear error before any Ray work
    summary = run_train(config, overwrite=overwrite)
    output = Path(config.output).resolve()
    installed = head_for_bundle(output / MODEL_DIR, output / "labeler-for-bundle")
    manifest = new_bundle_version(config.model.bundle, output / BUNDLE_DIR, {LABELER_DIR: installed},
                                  {"job": "train-labeler", "mlflow_run_id": summary.get("mlflow_run_id"),
                                   "test": summary.get("test")})
    shutil.rmtree(installed)
    summary["bundle"] = str(output / BUNDLE_DIR)
    summary["bundle_hash"] = manifest.content_hash
    return summary


def head_for_bundle(head: Path, target: Path) -> Path:
    """A copy of the trained head without the path of the bundle it was trained on: inside a bundle
    the head reads the enclosing bundle's UNet (checked by its hash), and that path would only tie
    the new bundle's content hash to the machine and directory it was made in."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(head, target)
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config["bundle"] = None
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target
