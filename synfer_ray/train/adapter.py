"""``synfer train-adapter``: train only a bundle's AU adapter on image + caption + AU rows.

The UNet, VAE and text encoder stay frozen (METHOD.md section 1); the loss is the scheduler's
(epsilon, or velocity for SD 2.x) through the decoupled cross-attention. Rows come as FEText-style
Parquet (``image``, ``caption``, ``aus``; ``label`` optional). The trained adapter (EMA weights)
goes into a new version of the bundle, with the training step recorded in its manifest. A bundle
over a ``base_model`` (``synfer bundle init``) trains the same way, its SD parts read from the base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from synfer_ray.config import AdapterTrainConfig
from synfer_ray.errors import SynferError

BUNDLE_DIR = "bundle"
REQUIRED = ("image", "caption", "aus")


def check_adapter_data(config: AdapterTrainConfig, classes, au_names):
    import pyarrow.dataset as pads

    from synfer_ray.data.faces import FaceSource, check_labels, resolve_source
    source = resolve_source(config.data.path, "data.path")
    dataset = pads.dataset(source.data_path, format="parquet")
    missing = [c for c in REQUIRED if c not in dataset.schema.names]
    if missing:
        raise SynferError("data.path", config.data.path, f"Parquet with columns {list(REQUIRED)} (FEText style; "
                                                         f"`synfer data import --caption-column --aus-column` "
                                                         f"makes it); missing {missing}")
    if "label" in dataset.schema.names:
        check_labels(FaceSource(source.path, False, source.lineage), classes, "data.path")
    lengths = {len(v) for v in dataset.to_table(columns=["aus"]).column("aus").to_pylist() if v is not None}
    wrong = sorted(n for n in lengths if n != len(au_names))
    if wrong:
        raise SynferError("data.path (aus column)", f"vectors of length {wrong}",
                          f"{len(au_names)} AU intensities per row, in the bundle's order {list(au_names)}")
    if not lengths:
        raise SynferError("data.path (aus column)", "all null", "AU vectors on the rows the adapter learns from")
    return source


def run_train_adapter(config: AdapterTrainConfig, overwrite: bool = False) -> dict[str, Any]:
    from synfer_ray.bundle import BundleManifest, new_bundle_version
    from synfer_ray.pipeline import ensure_ray
    from synfer_ray.tracking import start_run
    from synfer_ray.train.diffusion import check_precision, denoiser_loop
    from synfer_ray.train.generator import encoded_latents, fit_stage, read_faces, stage_job

    bundle = Path(config.bundle).resolve()
    manifest = BundleManifest.read(bundle)
    output = Path(config.output).resolve()
    if (output / BUNDLE_DIR).exists() and not overwrite:
        raise SynferError("output", config.output, "a directory without a finished bundle/ (this run is done); "
                                                   "use another output or --overwrite")
    source = check_adapter_data(config, manifest.classes, manifest.au_names)
    check_precision(config.stage.precision, config.scaling.use_gpu, "stage.precision")
    if overwrite and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "train_adapter_config.json").write_text(config.model_dump_json(indent=2))
    # A bundle over a base model (`synfer bundle init`) holds only the adapter: the SD parts come from the base.
    components = manifest.base_model or str(bundle)
    with start_run(config.tracking, config.name) as run:
        run.log_params({"config": config.model_dump(mode="json"), "lineage.data": source.lineage,
                        "bundle": manifest.content_hash})
        run.set_tags({"synfer.job": "train-adapter"})
        ensure_ray(config.ray)
        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False
        faces = read_faces(source, config.data, config.seed, columns=("caption", "aus"))
        latents = encoded_latents(faces, Path(components), manifest.classes, manifest.au_names,
                                  config.stage.au_jitter, manifest.resolution,
                                  actors=max(1, int(config.ray.num_cpus or 2) // 2),
                                  directory=output / "latents", use_gpu=config.scaling.use_gpu)
        job = stage_job("adapter", Path(components), config.stage, config.seed, config.scaling, run,
                        caption_dropout=config.stage.caption_dropout, ema_decay=config.stage.ema_decay,
                        trainable=("au_adapter",), adapter_source=str(bundle))
        checkpoint, history, _ = fit_stage(denoiser_loop, job, latents, config.scaling, config.name, output / "ray",
                                           config.data.shuffle)
        staged = output / "au_adapter"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(checkpoint / "ema" / "au_adapter", staged)
        sealed = new_bundle_version(bundle, output / BUNDLE_DIR, {"au_adapter": staged},
                                    {"job": "train-adapter", "data": source.lineage, "steps": config.stage.steps,
                                     "final": history[-1] if history else None, "mlflow_run_id": run.run_id})
        (output / "history.json").write_text(json.dumps(history, indent=2))
        run.log_artifact(output / "history.json")
        summary = {"bundle": str(output / BUNDLE_DIR), "content_hash": sealed.content_hash, "history": history,
                   "first_loss": history[0]["loss"] if history else None,
                   "final_loss": history[-1]["loss"] if history else None, "mlflow_run_id": run.run_id}
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
