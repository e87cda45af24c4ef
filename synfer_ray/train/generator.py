"""``synfer train-generator``: labelled real faces in, a generator bundle out (SynFER's fine-tuning step).

Stages, each a Ray Train run that checkpoints and resumes: (1) the VAE (reconstruction + KL),
(2) the denoiser (UNet, text encoder, AU adapter; epsilon prediction, caption dropout for CFG,
EMA weights for sampling) on latents that Ray Data encodes once. The run directory keeps a
``stages/current`` bundle-layout directory that each finished stage updates, and ``stages.json``
listing finished stages, so a stopped run continues where it was. ``from_bundle`` starts from an
existing bundle (real SD weights on a cluster, or a bundle over a ``base_model``) instead of fresh
weights: its VAE and latent scale are kept unless ``vae.finetune``, the UNet trains at the bundle's
resolution, whole or as LoRA (``unet.unet_mode``), and a LoRA is merged into a plain UNet in the
bundle written at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from synfer_ray import taxonomy
from synfer_ray.config import (DenoiserStageConfig, GeneratorTrainConfig, LabelledFacesConfig, ScalingConfig,
                               StageConfig)
from synfer_ray.data.faces import FaceSource, check_labels, resolve_source, shuffled
from synfer_ray.errors import SynferError
from synfer_ray.train.diffusion import (LORA_DIR, StageJob, check_precision, denoiser_loop, parts_scaling_factor,
                                       vae_loop)
from synfer_ray.train.generator_report import originals_from, quality_report

BUNDLE_DIR = "bundle"


# --- reading labelled faces ----------------------------------------------------------------------

def check_faces(settings: LabelledFacesConfig, classes: Sequence[str], field: str = "data.path",
                au_count: int | None = None) -> tuple[FaceSource, dict[str, int]]:
    """Refuse missing columns, unknown labels, empty classes and AU vectors of the wrong length."""
    import pyarrow.dataset as pads
    source = resolve_source(settings.path, field)
    counts = check_labels(source, classes, field)
    empty = [name for name in classes if counts.get(name, 0) == 0]
    if empty:
        raise SynferError(field, settings.path, f"at least one row of every class; none of {empty} "
                                                f"(add such faces, or train on a class set without them)")
    if au_count is not None and au_rows(source):
        column = pads.dataset(source.data_path, format="parquet").to_table(columns=["aus"]).column("aus")
        lengths = {len(v) for v in column.to_pylist() if v is not None}
        for length in lengths:
            if length != au_count:
                raise SynferError(f"{field} (aus column)", f"{length} values per row",
                                  f"{au_count} AU intensities per row, in the bundle's AU order")
    return source, counts


def read_faces(source: FaceSource, settings: LabelledFacesConfig, seed: int, columns: Sequence[str] = ()):
    """Ray Data over the source's rows: the chosen part, and with ``limit`` each row kept with
    probability limit / rows by a seeded hash of its id (about ``limit`` rows, the same every run;
    no shuffle of the source)."""
    import pyarrow.dataset as pads
    import ray.data

    from synfer_ray.data.faces import RowSelection
    table = pads.dataset(source.data_path, format="parquet")
    wanted = ["image", "label"] + [c for c in columns if c in table.schema.names]
    dataset = ray.data.read_parquet(source.data_path, columns=wanted)
    available = table.count_rows() / (int(settings.part.split("/")[1]) if settings.part else 1)
    keep = min(1.0, settings.limit / available) if settings.limit and available else 1.0
    selection = RowSelection(part=settings.part, keep=keep, seed=seed)
    return dataset.map_batches(selection, batch_format="numpy") if selection != RowSelection(seed=seed) else dataset


def decoded_pixels(dataset, classes: Sequence[str], image_size: int):
    from synfer_ray.data.faces import decode_faces

    def decode(batch):
        out = decode_faces(batch, classes, image_size, soft=False, synthetic=False)
        return {"pixels": out["pixels"][out["valid"]]}
    return dataset.map_batches(decode, batch_format="numpy")


def encoded_latents(dataset, components: Path, classes: Sequence[str], au_names: Sequence[str],
                    au_jitter: float, image_size: int, actors: int, directory: Path, use_gpu: bool = False,
                    caption_style: str = "expression"):
    """Latents, tokens and AUs for every row, computed once by a pool of VAE actors (on a GPU each
    when the training runs on GPUs: an SD VAE at 512 px is slow on CPUs) and written as Parquet
    under ``directory`` by Ray Data; the training stage streams them back from there. Nothing is
    held in the object store, and a rerun reuses a finished directory."""
    import ray.data

    from synfer_ray.data.conditioning import EncodeForDenoiser
    if not (directory / LATENTS_DONE).is_file():
        staged = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(staged, ignore_errors=True)
        num_gpus = 1 if use_gpu else 0
        dataset.map_batches(
            EncodeForDenoiser, batch_size=128, batch_format="numpy",
            fn_constructor_kwargs={"components": str(components), "classes": tuple(classes),
                                   "au_names": tuple(au_names), "au_jitter": au_jitter, "image_size": image_size,
                                   "num_gpus": num_gpus, "caption_style": caption_style},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=1,
            num_gpus=num_gpus).write_parquet(str(staged))
        (staged / LATENTS_DONE).write_text("")
        shutil.rmtree(directory, ignore_errors=True)
        staged.rename(directory)
    return ray.data.read_parquet(str(directory))


LATENTS_DONE = "_SUCCESS"  # written last: a latents directory without it is redone


def class_repeats(counts: dict[str, int], classes: Sequence[str], balance: float) -> np.ndarray:
    """How often each class's rows are repeated: about (largest class / class) ** ``balance``."""
    largest = max(counts.values())
    return np.array([max(1, round((largest / max(counts.get(name, 0), 1)) ** balance)) for name in classes])


def balanced(latents, repeats: np.ndarray):
    """The latents dataset with each row repeated by its class's factor (the training loop draws
    fresh noise, timestep, mirror and posterior sample for every copy)."""
    if np.all(repeats == 1):
        return latents

    def repeat(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        times = repeats[batch["label"].astype(np.int64)]
        return {name: np.repeat(column, times, axis=0) for name, column in batch.items()}
    return latents.map_batches(repeat, batch_format="numpy")


# --- stages --------------------------------------------------------------------------------------

class StageLedger:
    """Which stages of a run are finished (``stages.json``), so a rerun skips them."""

    def __init__(self, output: Path):
        self.path = output / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def finish(self, stage: str, record: dict[str, Any]) -> None:
        self.done[stage] = record
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.done, indent=2))
        temporary.replace(self.path)


def fit_stage(loop, job: StageJob, dataset, scaling: ScalingConfig, name: str, storage: Path, shuffle: str):
    """One Ray Train run of ``loop`` over ``dataset`` in a seeded random order (``shuffle``, see
    :func:`synfer_ray.data.faces.shuffled`); a rerun with the same name and storage resumes it."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    trainer = TorchTrainer(
        loop, train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=scaling.worker_resources()),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        datasets={"train": shuffled(dataset, shuffle, job.seed)},
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        history = json.loads((Path(directory) / "synfer_state.json").read_text())["history"]
        return Path(directory), history, result


def stage_job(stage: str, components: Path, settings: StageConfig, seed: int, scaling: ScalingConfig,
              run, **extra) -> StageJob:
    return StageJob(stage=stage, components=str(components), steps=settings.steps, batch_size=settings.batch_size,
                    lr=settings.lr, warmup_steps=settings.warmup_steps, checkpoint_every=settings.checkpoint_every,
                    log_every=settings.log_every, seed=seed, torch_threads=scaling.torch_threads,
                    precision=settings.precision, mlflow_uri=run.uri, mlflow_run_id=run.run_id, **extra)


def lora_settings(stage: DenoiserStageConfig) -> dict[str, Any]:
    """The StageJob fields of a LoRA run (none for a full one)."""
    if stage.unet_mode != "lora":
        return {}
    return {"lora_rank": stage.lora.rank, "lora_alpha": stage.lora.alpha,
            "lora_targets": tuple(stage.lora.target_modules)}


def replace_components(checkpoint: Path, subdirectory: str, names: Sequence[str], components: Path) -> None:
    """Copy ``checkpoint/<subdirectory>/<name>`` over ``components/<name>`` for each trained part."""
    for name in names:
        target = components / name
        staged = components / f".{name}.new"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(checkpoint / subdirectory / name, staged)
        config = target / "config.json"
        if name == "vae" and config.is_file():  # keep fields written after the stage (scaling factor)
            staged_config = staged / "config.json"
            merged = {**json.loads(config.read_text()), **json.loads(staged_config.read_text())}
            staged_config.write_text(json.dumps(merged, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)


LATENT_SCALE_ROWS = 1024  # rows the latent scale is measured on


def set_latent_scale(components: Path, dataset, samples: int = LATENT_SCALE_ROWS, device: str | None = None,
                     chunk: int = 16) -> float:
    """SD's trick: scale latents to unit variance, measured on the training images (``chunk`` at a
    time on ``device``: CUDA where there is one, so an SD VAE at 512 px fits and is quick)."""
    import torch
    from diffusers import AutoencoderKL
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = AutoencoderKL.from_pretrained(components, subfolder="vae", use_safetensors=True,
                                        torch_dtype=torch.float32).to(device).eval()
    batch = next(iter(dataset.iter_batches(batch_size=samples, batch_format="numpy")))
    pixels = torch.from_numpy(np.array(batch["pixels"])).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = torch.cat([vae.encode(part.to(device).float() / 127.5 - 1).latent_dist.mean.cpu()
                             for part in pixels.split(chunk)])
    scale = float(1.0 / latents.std())
    config_path = components / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = scale
    config_path.write_text(json.dumps(config, indent=2))
    return scale


# --- the job -------------------------------------------------------------------------------------

SD_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _start_components(config: GeneratorTrainConfig, components: Path) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Write the starting weights once; return (classes, AU names, resolution)."""
    from synfer_ray.bundle import BundleManifest, new_generator
    if config.from_bundle:
        manifest = BundleManifest.read(Path(config.from_bundle))
        if not components.is_dir():
            copy_bundle_parts(Path(config.from_bundle), manifest.base_model, components)
        return manifest.classes, manifest.au_names, manifest.resolution
    arch = config.architecture
    if not components.is_dir():
        new_generator(arch, config.seed).save(components, taxonomy.expression_set(arch.expressions), arch.resolution)
    return taxonomy.expression_set(arch.expressions), taxonomy.au_set(arch.au_set), arch.resolution


def copy_bundle_parts(bundle: Path, base_model: str | None, components: Path) -> None:
    """``components`` = the bundle's SD parts (from its ``base_model`` when it names one: a directory,
    or a hub id fetched once) plus its ``au_adapter/``; staged, then renamed into place."""
    staged = components.with_name(components.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    source = bundle if base_model is None else _base_directory(base_model)
    for name in SD_PARTS:
        if not (source / name).exists():
            raise SynferError("from_bundle", str(bundle), f"a bundle whose SD weights have {name} "
                                                          f"({source} lacks it)")
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, staged / name)
    # A hub SD pipeline names a safety checker and feature extractor that a bundle does not carry.
    index = json.loads((staged / "model_index.json").read_text())
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if name in index:
            index[name] = [None, None]
    (staged / "model_index.json").write_text(json.dumps({**index, "requires_safety_checker": False}, indent=2))
    shutil.copytree(bundle / "au_adapter", staged / "au_adapter")
    staged.rename(components)


def _base_directory(base_model: str) -> Path:
    """A base model's local directory: the path itself, or the hub snapshot of its diffusers weights."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(base_model, allow_patterns=[
            "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "text_encoder/config.json",
            "text_encoder/model.safetensors", *(f"{part}/{file}" for part in ("unet", "vae")
                                                for file in ("config.json", "diffusion_pytorch_model.safetensors"))]))
    except Exception as error:  # offline, unknown id, no access: say which base and why
        raise SynferError("from_bundle (base_model)", base_model, "a directory or a reachable hub id of "
                                                                  f"diffusers SD weights ({error!r:.300})") from error


def _check(config: GeneratorTrainConfig, output: Path, overwrite: bool):
    from synfer_ray.bundle import BundleManifest
    from synfer_ray.models import load_classifier
    if (output / BUNDLE_DIR).exists() and not overwrite:
        raise SynferError("output", config.output, "a directory without a finished bundle/ (this run is done); "
                                                   "use another output or --overwrite")
    if config.from_bundle:
        manifest = BundleManifest.read(Path(config.from_bundle))
        classes, au_names = manifest.classes, manifest.au_names
    else:
        classes = taxonomy.expression_set(config.architecture.expressions)
        au_names = taxonomy.au_set(config.architecture.au_set)
    source, counts = check_faces(config.data, classes, au_count=len(au_names))
    for field, stage in (("vae.precision", config.vae), ("unet.precision", config.unet)):
        check_precision(stage.precision, config.scaling.use_gpu, field)
    for field in ("sg_classifier", "quality.evaluator"):
        path = config.sg_classifier if field == "sg_classifier" else config.quality.evaluator
        if path:
            model = load_classifier(path, field=field)
            missing = sorted(set(classes) - set(model.classes))
            if missing:
                raise SynferError(field, path, f"a classifier over the generator's classes; it lacks {missing}")
    return source, counts


def run_train_generator(config: GeneratorTrainConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train (or fine-tune) a generator on labelled faces; write ``<output>/bundle``; report quality."""
    from synfer_ray.pipeline import ensure_ray
    from synfer_ray.tracking import start_run

    output = Path(config.output).resolve()
    source, counts = _check(config, output, overwrite)
    if overwrite and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "train_generator_config.json").write_text(config.model_dump_json(indent=2))
    components = output / "stages" / "current"
    classes, au_names, resolution = _start_components(config, components)
    ledger = StageLedger(output)
    with start_run(config.tracking, config.name) as run:
        run.log_params({"config": config.model_dump(mode="json"), "lineage.data": source.lineage,
                        "data.class_counts": counts})
        run.set_tags({"synfer.job": "train-generator"})
        ensure_ray(config.ray)
        import ray.data
        ray.data.DataContext.get_current().enable_progress_bars = False
        faces = read_faces(source, config.data, config.seed, columns=("caption", "aus"))
        if "vae" not in ledger.done and config.from_bundle and not config.vae.finetune:
            # A bundle's VAE (SD's above all) is kept with its scaling factor, not relearnt on faces.
            ledger.finish("vae", {"history": [], "kept": True,
                                  "scaling_factor": parts_scaling_factor(str(components))})
        if "vae" not in ledger.done:
            pixels = decoded_pixels(faces, classes, resolution)
            if config.vae.steps:
                job = stage_job("vae", components, config.vae, config.seed, config.scaling, run,
                                kl_weight=config.vae.kl_weight)
                checkpoint, history, _ = fit_stage(vae_loop, job, pixels, config.scaling, f"{config.name}-vae",
                                                   output / "ray", config.data.shuffle)
                replace_components(checkpoint, "weights", ["vae"], components)
            else:
                history = []
            # Measured on rows spread over the whole source (the first rows of a source written class
            # by class are one class), chosen by the seeded row-id hash: no shuffle of every row.
            sample = read_faces(source, config.data.model_copy(update={"limit": min(
                config.data.limit or LATENT_SCALE_ROWS, LATENT_SCALE_ROWS)}), config.seed)
            scale = set_latent_scale(components, decoded_pixels(sample, classes, resolution), LATENT_SCALE_ROWS)
            ledger.finish("vae", {"history": history, "scaling_factor": scale})
        if "denoiser" not in ledger.done:
            stage = config.unet
            trainable = tuple(name for name, on in (("unet", True), ("text_encoder", stage.train_text_encoder),
                                                    ("au_adapter", stage.train_adapter)) if on)
            latents = encoded_latents(faces, components, classes, au_names, stage.au_jitter, resolution,
                                      actors=max(1, int(config.ray.num_cpus or 2) // 2),
                                      directory=output / "latents", use_gpu=config.scaling.use_gpu,
                                      caption_style=stage.captions)
            latents = balanced(latents, class_repeats(counts, classes, stage.class_balance))
            job = stage_job("denoiser", components, stage, config.seed, config.scaling, run,
                            caption_dropout=stage.caption_dropout, ema_decay=stage.ema_decay, trainable=trainable,
                            **lora_settings(stage))
            checkpoint, history, _ = fit_stage(denoiser_loop, job, latents, config.scaling,
                                               f"{config.name}-denoiser", output / "ray", config.data.shuffle)
            # A LoRA lands beside the untouched UNet (components/unet_lora); write_bundle merges it.
            replace_components(checkpoint, "ema", job.saved_modules, components)
            ledger.finish("denoiser", {"history": history, "trainable": trainable, "unet_mode": stage.unet_mode})
        training = {"data": {"path": config.data.path, "lineage": source.lineage, "class_counts": counts},
                    "captions": config.unet.captions,
                    "config": config.model_dump(mode="json"),
                    "au_conditioning": "per-class prototype AUs (label conditioning)"
                    if not au_rows(source) else f"rows' own AU vectors ({au_rows(source)} rows; others prototypes)",
                    "final": {stage: record["history"][-1] if record["history"] else None
                              for stage, record in ledger.done.items()}}
        bundle = write_bundle(components, output / BUNDLE_DIR, classes, resolution, config.sg_classifier, training)
        originals = originals_from(faces.take_batch(16, batch_format="numpy"), classes, resolution)
        report = quality_report(output / BUNDLE_DIR, config.quality, output / "report", originals)
        run.log_metrics({k: v for k, v in report["metrics"].items()})
        run.log_artifacts(output / "report", "report")
        run.log_artifact(output / "stages.json")
        run.log_artifact(output / "train_generator_config.json")
        summary = {"bundle": str(output / BUNDLE_DIR), "content_hash": bundle.content_hash,
                   "stages": {stage: record["history"][-1] if record["history"] else None
                              for stage, record in ledger.done.items()},
                   "quality": report["metrics"], "au_conditioning": training["au_conditioning"],
                   "mlflow_run_id": run.run_id}
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def au_rows(source: FaceSource) -> int:
    """How many rows carry their own AU vector (streamed: the column never sits whole on the driver)."""
    import pyarrow.dataset as pads
    dataset = pads.dataset(source.data_path, format="parquet")
    if "aus" not in dataset.schema.names:
        return 0
    return sum(batch.num_rows - batch.column(0).null_count for batch in dataset.to_batches(columns=["aus"]))


def write_bundle(components: Path, target: Path, classes: Sequence[str], resolution: int,
                 sg_classifier: str | None, training: dict[str, Any]):
    """Copy the trained components to ``target`` with the guide (a LoRA merged into a plain UNet),
    and seal the manifest."""
    from synfer_ray.bundle import seal_bundle
    from synfer_ray.models import load_classifier
    from synfer_ray.train.diffusion import merge_lora_directory
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(components, staged, ignore=shutil.ignore_patterns("synfer_bundle.json", "sg_classifier",
                                                                      LORA_DIR))
    if (components / LORA_DIR).is_dir():
        merge_lora_directory(staged / "unet", components / LORA_DIR)
    guide = load_classifier(sg_classifier, field="sg_classifier") if sg_classifier else None
    manifest = seal_bundle(staged, classes, resolution, guide, training)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    return manifest
