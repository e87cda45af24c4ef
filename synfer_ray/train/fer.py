"""FER classifier training on Ray Train + DeepSpeed, then evaluation on real faces and MLflow.

The driver validates the config and the data, builds Ray Data pipelines (read -> decode ->
augment), and runs :func:`train_loop` on every worker under ``TorchTrainer``. The loop is an
ordinary PyTorch loop around a DeepSpeed engine (ZeRO 0-3), reporting a checkpoint every epoch
so that a lost worker resumes from the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from synfer_ray import taxonomy
from synfer_ray.config import SourceConfig, TrainConfig
from synfer_ray.data.faces import FaceSource, RowSelection, check_labels, resolve_source
from synfer_ray.data.shards import filesystem, is_uri
from synfer_ray.errors import SynferError

STATE_NAME = "synfer_state.json"
AUGMENT_BLOCK_BATCHES = 16  # rows per block fed to augmentation, in per-worker batches
MODEL_DIR = "model"
CACHE_SHARE = 0.25  # data.cache auto: decoded rows kept when they fill at most this share of the object store


@dataclass(frozen=True)
class TrainJob:
    """What every worker needs, as plain values."""

    classes: tuple[str, ...]
    arch: str
    pretrained: str | None
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    label_smoothing: float
    gradient_accumulation: int
    zero_stage: int
    precision: str  # fp32, bf16 or fp16: DeepSpeed's mixed precision (GPU workers)
    patience: int | None
    seed: int
    torch_threads: int
    train_rows: int
    class_weights: tuple[float, ...] | None
    mlflow_uri: str | None
    mlflow_run_id: str | None
    bundle: str | None = None  # feranno: the bundle whose frozen UNet gives the features
    labeler: dict | None = None  # feranno: feature settings and head sizes


# --- the worker loop --------------------------------------------------------------------------

def _deepspeed_config(job: TrainJob) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": job.batch_size,
            "gradient_accumulation_steps": job.gradient_accumulation,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": job.zero_stage},
            "bf16": {"enabled": job.precision == "bf16"},
            # Dynamic loss scaling (loss_scale 0), as DeepSpeed recommends for fp16.
            "fp16": {"enabled": job.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            # DeepSpeed >= 0.19 casts only parameters unless told: batch norm's running statistics in
            # fp32 beside half weights is refused on CPU (and depends on the kernel on CUDA).
            **({"data_types": {"buffer_dtype": job.precision}} if job.precision != "fp32" else {}),
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _export_model(engine, job: TrainJob, directory: Path, rank: int) -> None:
    """Write the classifier as safetensors + config (rank 0), gathering ZeRO-3 partitions first."""
    import deepspeed
    model = engine.module
    if job.zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                model.save_pretrained(directory)
    elif rank == 0:
        model.save_pretrained(directory)


def without_shared_memory_collectives() -> None:
    """On CPU workers, keep DeepSpeed from building its shared-memory all-reduce (``deepspeed_shm_comm``).
    Every ``deepspeed.initialize`` JIT-loads that op under a lock file in ~/.cache/torch_extensions;
    a worker killed while it holds the lock (a lost node, a stopped job, a killed worker) leaves the
    lock behind, and every later DeepSpeed start on that machine waits for it forever (seen on the
    netns cluster: both workers of the next run stuck in ``FileBaton.wait``). The op only speeds up
    DeepSpeed's inference all-reduce; training's collectives are gloo's either way, and a fresh
    machine no longer compiles C++ (a minute on 2 cores) before its first epoch. DeepSpeed keeps its
    probe of compatible ops in one dict so that such edits hold."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def train_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from synfer_ray.models import build_classifier
    from synfer_ray.evaluate import confusion_matrix, metrics_from_confusion
    from synfer_ray.train.losses import soft_cross_entropy, warmup_cosine

    job: TrainJob = loop_config["job"]
    torch.set_num_threads(job.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = build_classifier(job.arch, job.classes, job.image_size, job.pretrained, seed=job.seed,
                             bundle=job.bundle, labeler=job.labeler)
    steps_per_epoch = max(1, math.ceil(job.train_rows / world / job.batch_size / job.gradient_accumulation))
    total_steps = steps_per_epoch * job.epochs
    # Frozen parts (FERAnno's diffusion model) stay out of the optimiser.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr,
                                  weight_decay=job.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(job.warmup_fraction * total_steps)))
    without_shared_memory_collectives()
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=_deepspeed_config(job))
    device = engine.device
    class_weights = torch.tensor(job.class_weights, device=device) if job.class_weights else None
    state = {"epoch": 0, "best": -1.0, "since_best": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory)
            state = json.loads((Path(directory) / STATE_NAME).read_text())
    mlflow = None
    if rank == 0 and job.mlflow_run_id:
        from mlflow.tracking import MlflowClient
        mlflow = MlflowClient(job.mlflow_uri)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.precision, torch.float32)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SynferError("optim.precision", job.precision, "fp16 or fp32 on this GPU (it has no bf16)")
    for epoch in range(state["epoch"], job.epochs):
        engine.train()
        began = time.perf_counter()
        loss_sum = torch.zeros(3, device=device)  # loss * rows, rows, skipped
        data_wait = 0.0  # time blocked on the input pipeline: the first thing to look at when slow
        waiting_since = time.perf_counter()
        for batch in train_shard.iter_torch_batches(batch_size=job.batch_size, device=device,
                                                    local_shuffle_buffer_size=4 * job.batch_size,
                                                    local_shuffle_seed=job.seed + epoch):
            data_wait += time.perf_counter() - waiting_since
            pixels = batch["pixels"].permute(0, 3, 1, 2).to(dtype) / 255
            valid = batch["valid"].bool()
            loss = soft_cross_entropy(engine(pixels).float(), batch["target"], job.label_smoothing,
                                      class_weights, valid)
            engine.backward(loss)
            engine.step()
            loss_sum += torch.stack([loss.detach() * valid.sum(), valid.sum().float(),
                                     (~valid).sum().float()])
            waiting_since = time.perf_counter()
        train_seconds = time.perf_counter() - began
        engine.eval()
        matrix = np.zeros((len(job.classes),) * 2, np.int64)
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=4 * job.batch_size, device=device):
                valid = batch["valid"].bool()
                predicted = engine(batch["pixels"].permute(0, 3, 1, 2).to(dtype) / 255).argmax(dim=1)
                truth = batch["target"].argmax(dim=1)
                matrix += confusion_matrix(truth[valid].cpu().numpy(), predicted[valid].cpu().numpy(),
                                           len(job.classes))
        counts = torch.from_numpy(matrix).to(device)
        dist.all_reduce(counts)
        dist.all_reduce(loss_sum)
        validation = metrics_from_confusion(counts.cpu().numpy(), job.classes)
        metrics = {"epoch": epoch, "train_loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
                   "train_rows": int(loss_sum[1]), "val_rows": int(counts.sum()), "skipped_images": int(loss_sum[2]),
                   "val_accuracy": validation["accuracy"], "val_uar": validation["uar"],
                   "val_macro_f1": validation["macro_f1"], "lr": schedule.get_last_lr()[0],
                   "train_seconds": train_seconds, "data_wait_seconds": data_wait}
        improved = validation["accuracy"] > state["best"]
        state = {"epoch": epoch + 1, "best": max(state["best"], validation["accuracy"]),
                 "since_best": 0 if improved else state["since_best"] + 1,
                 "history": state["history"] + [metrics]}
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory)  # a collective: every rank writes its own partitions
            _export_model(engine, job, Path(directory) / MODEL_DIR, rank)
            if rank == 0:
                (Path(directory) / STATE_NAME).write_text(json.dumps(state))
            if mlflow:
                mlflow.log_batch(job.mlflow_run_id, metrics=[
                    _metric(name, value, epoch) for name, value in metrics.items() if name != "epoch"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        if job.patience and state["since_best"] >= job.patience:
            break


def _metric(name: str, value: float, step: int):
    from mlflow.entities import Metric
    return Metric(name, float(value), int(time.time() * 1000), step)


# --- the driver ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedData:
    train_sources: list[tuple[SourceConfig, FaceSource, RowSelection]]
    validation: tuple[SourceConfig, FaceSource] | None
    test: tuple[SourceConfig, FaceSource] | None
    train_rows: int  # expected rows per epoch (selections are per-row hashes: within a few sqrt(rows))
    class_counts: dict[str, float]  # expected rows per class in the training mix
    source_rows: list[int] = dataclasses.field(default_factory=list)  # expected rows of each data.train source
    validation_rows: int = 0  # expected validation rows


def _split_share(split: str | None, val_fraction: float) -> float:
    return {"train": 1 - val_fraction, "validation": val_fraction}.get(split, 1.0)


def _rows_for_ratio(ratio: float, available: float, base_rows: float, index: int) -> int:
    wanted = max(1, round(ratio * base_rows))
    if wanted > available:
        raise SynferError(f"data.train[{index}].ratio", ratio,
                          f"at most {available / max(base_rows, 1):.3g}: this source has {available:.0f} rows after "
                          f"its filters and data.train[0] has {base_rows:.0f}; lower the ratio or make more rows")
    return wanted


def prepare_data(config: TrainConfig, classes: tuple[str, ...]) -> PreparedData:
    """Resolve and check every source (columns, labels) before any Ray work, and decide which rows
    each one gives: from per-class counts streamed through the driver (accepted rows only), never
    the rows themselves."""
    data = config.data
    seed = config.optim.seed
    train_sources, counts, rows, base_rows, source_rows = [], {c: 0.0 for c in classes}, 0.0, 0.0, []
    validation_rows = 0.0
    for index, settings in enumerate(data.train):
        field = f"data.train[{index}].path"
        source = resolve_source(settings.path, field)
        labels = check_labels(source, classes, field, accepted_only=settings.accepted_only)
        # part k/n keeps 1/n of the rows (a uniform hash), accepted_only is in the counts already
        available = sum(labels.values()) / (int(settings.part.split("/")[1]) if settings.part else 1)
        wanted = settings.limit
        if settings.ratio is not None:
            wanted = _rows_for_ratio(settings.ratio, available, base_rows, index)
        keep = min(1.0, wanted / available) if wanted and available else 1.0
        given = available * keep
        if index == 0:
            base_rows = given
        # The first source gives the validation rows when no validation source is named.
        split = settings.split or ("train" if data.validation is None and index == 0 else None)
        if index == 0 and data.validation is None:
            validation_rows = given * data.val_fraction
        given *= _split_share(split, data.val_fraction)
        rows += given
        source_rows.append(round(given))
        share = given / max(sum(labels.values()), 1)  # this source's classes, scaled to the rows it gives
        for name, count in labels.items():
            counts[name] += count * share
        selection = RowSelection(part=settings.part, accepted_only=source.synthetic and settings.accepted_only,
                                 keep=keep, seed=seed, split=split, val_fraction=data.val_fraction)
        train_sources.append((settings, source, selection))
    extra = {}
    for name in ("validation", "test"):
        settings = getattr(data, name)
        if settings is not None:
            source = resolve_source(settings.path, f"data.{name}.path")
            labels = check_labels(source, classes, f"data.{name}.path", accepted_only=settings.accepted_only)
            extra[name] = (settings, source)
            if name == "validation":
                parts = int(settings.part.split("/")[1]) if settings.part else 1
                validation_rows = sum(labels.values()) / parts * _split_share(settings.split, data.val_fraction)
    if rows < config.scaling.num_workers:
        raise SynferError("data.train", [s.path for s in data.train],
                          f"at least one training row per worker ({config.scaling.num_workers})")
    return PreparedData(train_sources, extra.get("validation"), extra.get("test"), int(rows), counts, source_rows,
                        round(validation_rows))


def _read(source: FaceSource, selection: RowSelection, config: TrainConfig, classes: tuple[str, ...]):
    import ray

    from synfer_ray.data.faces import decode_faces
    columns = ["image", "label"] + (["soft_label", "accepted"] if source.synthetic else [])
    dataset = ray.data.read_parquet(source.data_path, columns=columns)
    if selection != RowSelection():
        dataset = dataset.map_batches(selection, batch_format="numpy")
    return dataset.map_batches(decode_faces, batch_format="numpy", fn_kwargs={
        "classes": classes, "image_size": config.data.image_size, "soft": config.data.labels == "soft",
        "synthetic": source.synthetic})


def decoded_bytes(rows: int, image_size: int, num_classes: int) -> int:
    """Object-store bytes of decoded rows (``decode_faces``: pixels, float targets, a valid flag)."""
    return rows * (image_size * image_size * 3 + 4 * num_classes + 1)


def cache_decoded_rows(config: TrainConfig, prepared: PreparedData, num_classes: int, store_bytes: float) -> bool:
    """``data.cache``: keep the decoded rows in Ray's object store for every epoch after the first
    (``Dataset.materialize``), instead of reading, decoding and shuffling them again each epoch (on a
    2-core machine that was 10-20 s of every epoch of a few hundred rows). ``auto`` does so when the
    train + validation rows fill at most CACHE_SHARE of the cluster's object store (``store_bytes``;
    FER-2013 at 48x48: 0.2 GB); millions of larger rows stream as before."""
    if config.data.cache != "auto":
        return config.data.cache == "always"
    rows = prepared.train_rows + prepared.validation_rows
    return decoded_bytes(rows, config.data.image_size, num_classes) <= CACHE_SHARE * store_bytes


def build_datasets(config: TrainConfig, prepared: PreparedData, classes: tuple[str, ...]):
    """Train and validation datasets: rows chosen by their ids, in a seeded random order
    (``data.shuffle``), shuffled again locally by the workers each epoch."""
    import ray

    from synfer_ray.data.faces import augment, shuffled
    cache = cache_decoded_rows(config, prepared, len(classes), ray.cluster_resources().get("object_store_memory", 0))
    parts = [_read(source, selection, config, classes) for _, source, selection in prepared.train_sources]
    train = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if prepared.validation is not None:
        settings, source = prepared.validation
        validation = _read(source, RowSelection(part=settings.part, accepted_only=source.synthetic
                                                and settings.accepted_only, seed=config.optim.seed,
                                                split=settings.split, val_fraction=config.data.val_fraction),
                           config, classes)
    else:
        first = prepared.train_sources[0][2]
        _, source, _ = prepared.train_sources[0]
        validation = _read(source, dataclasses.replace(first, split="validation", keep=1.0), config, classes)
    if cache:
        validation = validation.materialize()
    if config.data.class_balanced_sampling:
        from synfer_ray.data.faces import balance_classes
        if cache:  # the resampling differs every epoch: only what comes before it is kept
            train = train.materialize()
        counts = np.array([max(prepared.class_counts.get(c, 0), 1) for c in classes], np.float64)
        repeats = counts.sum() / (len(classes) * counts)
        train = train.map_batches(balance_classes, batch_format="numpy", fn_kwargs={"repeats": repeats.tolist()})
    train = shuffled(train, config.data.shuffle, config.optim.seed)  # after the repeats: copies spread out
    aug = config.data.augment
    # The split above leaves a few large blocks, and each epoch's first batch waits for a whole
    # block to be augmented (2 s of every 18 s epoch on FER-2013); small blocks stream.
    train = train.repartition(target_num_rows_per_block=AUGMENT_BLOCK_BATCHES * config.optim.batch_size)
    if cache and not config.data.class_balanced_sampling:
        train = train.materialize()  # the seeded order is the same every epoch; augmentation is not
    train = train.map_batches(augment, batch_format="numpy", fn_kwargs={
        "crop_padding": aug.crop_padding, "flip": aug.flip, "color_jitter": aug.color_jitter})
    return train, validation


def _class_weights(counts: dict[str, float], classes: tuple[str, ...]) -> tuple[float, ...]:
    present = np.array([max(counts.get(c, 0), 1) for c in classes], dtype=np.float64)
    weights = present.sum() / (len(classes) * present)
    return tuple(float(w) for w in weights)


def _check_bundle(config: TrainConfig) -> None:
    """For the classifiers over a frozen bundle (feranno, latent-guide): the bundle exists, before any Ray
    work. A latent guide trains a small head over a frozen VAE and UNet: ZeRO-3 would partition those
    across workers and gather them again at every step, for nothing (train-labeler refuses it for FERAnno)."""
    from synfer_ray.bundle import BundleManifest
    model = config.model
    if model.arch in ("feranno", "latent-guide"):
        try:
            BundleManifest.read(Path(model.bundle))
        except SynferError as error:
            raise SynferError("model.bundle", model.bundle, error.accepted) from None
    if model.arch == "latent-guide" and config.optim.zero_stage == 3:
        raise SynferError("optim.zero_stage", 3, "0, 1 or 2 for model.arch latent-guide (only its small head "
                                                 "trains; its frozen VAE and UNet are not worth partitioning)")


def _precision(config: TrainConfig) -> str:
    """Mixed precision is for GPU workers: refused on CPU workers, before any Ray work."""
    precision = config.optim.precision
    if precision != "fp32" and not config.scaling.use_gpu:
        raise SynferError("optim.precision", precision, "fp32 with CPU workers, or scaling.use_gpu: true "
                                                        "(DeepSpeed's bf16/fp16 run on GPUs)")
    return precision


@contextlib.contextmanager
def _run_directory(output: str) -> Iterator[Path]:
    """Where model/, eval/ and the run's JSON files are written: ``output`` itself when it is a local
    path; for a URI (``s3://bucket/run``) a local staging directory, uploaded there when the run
    succeeds (Ray Train's checkpoints go to the URI directly)."""
    if not is_uri(output):
        directory = Path(output).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    import pyarrow.fs as pafs
    fs, root = filesystem(output)
    with tempfile.TemporaryDirectory(prefix="synfer-train-") as staging:
        yield Path(staging)
        pafs.copy_files(staging, root, destination_filesystem=fs)


def run_train(config: TrainConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train, pick the best epoch, evaluate on the test set, track and register; return a summary.
    ``output`` is a local directory or a URI (``s3://bucket/run``: checkpoints, model, evaluation)."""
    import pyarrow.fs as pafs
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from synfer_ray.pipeline import ensure_ray
    from synfer_ray.tracking import start_run

    classes = taxonomy.expression_set(config.model.expressions)
    fs, root = filesystem(config.output)
    if fs.get_file_info(f"{root}/{MODEL_DIR}").type != pafs.FileType.NotFound and not overwrite:
        raise SynferError("output", config.output, "a directory without a trained model/ (this one is finished); "
                                                   "use another output or --overwrite")
    _check_bundle(config)
    precision = _precision(config)
    prepared = prepare_data(config, classes)
    if overwrite:
        fs.delete_dir_contents(root, missing_dir_ok=True)
    location = config.output.rstrip("/") if is_uri(config.output) else root
    lineage = {f"lineage.train.{i}": source.lineage for i, (_, source, _) in enumerate(prepared.train_sources)}
    if prepared.test:
        lineage["lineage.test"] = prepared.test[1].lineage
    with start_run(config.tracking, config.name) as run, _run_directory(config.output) as output:
        (output / "train_config.json").write_text(config.model_dump_json(indent=2))
        run.log_params({"config": config.model_dump(mode="json"), **lineage})
        run.set_tags({"synfer.job": "train"})
        ensure_ray(config.ray)
        ray.data.DataContext.get_current().enable_progress_bars = False
        train, validation = build_datasets(config, prepared, classes)
        optim = config.optim
        job = TrainJob(classes=classes, arch=config.model.arch, pretrained=config.model.pretrained,
                       image_size=config.data.image_size, epochs=optim.epochs, batch_size=optim.batch_size,
                       lr=optim.lr, weight_decay=optim.weight_decay, warmup_fraction=optim.warmup_fraction,
                       label_smoothing=optim.label_smoothing, gradient_accumulation=optim.gradient_accumulation,
                       zero_stage=optim.zero_stage, precision=precision,
                       patience=optim.early_stopping_patience, seed=optim.seed,
                       torch_threads=config.scaling.torch_threads, train_rows=prepared.train_rows,
                       class_weights=_class_weights(prepared.class_counts, classes)
                       if config.data.class_balanced_loss else None,
                       mlflow_uri=run.uri, mlflow_run_id=run.run_id,
                       bundle=str(Path(config.model.bundle).resolve()) if config.model.bundle else None,
                       labeler=config.model.labeler.model_dump())
        scaling = config.scaling
        trainer = TorchTrainer(
            train_loop, train_loop_config={"job": job},
            scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                                   resources_per_worker=scaling.worker_resources()),
            torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            datasets={"train": train, "validation": validation},
            run_config=ray.train.RunConfig(
                name=config.name, storage_path=f"{location}/ray",
                failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_accuracy",
                                                             checkpoint_score_order="max")))
        result = trainer.fit()
        best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda pair: pair[1]["val_accuracy"])
        with best_checkpoint.as_directory() as directory:
            shutil.copytree(Path(directory) / MODEL_DIR, output / MODEL_DIR)
        # The latest checkpoint carries every epoch's metrics, across worker restarts.
        with result.checkpoint.as_directory() as directory:
            history = json.loads((Path(directory) / STATE_NAME).read_text())["history"]
        summary: dict[str, Any] = {"best_epoch": int(best_metrics["epoch"]),
                                   "best_val_accuracy": best_metrics["val_accuracy"], "history": history,
                                   "model": f"{location}/{MODEL_DIR}", "lineage": lineage,
                                   "source_rows": [{"path": s.path, "rows": rows} for s, rows in
                                                   zip(config.data.train, prepared.source_rows)],
                                   "mlflow_run_id": run.run_id}
        if prepared.test:
            from synfer_ray.evaluate import evaluate_model, headline_figures, write_report
            report = evaluate_model(output / MODEL_DIR, prepared.test[0].path)
            for path in write_report(report, output / "eval"):
                run.log_artifact(path, "eval")
            run.log_metrics({f"test_{k}": report[k] for k in ("accuracy", "uar", "macro_f1")})
            summary["test"] = headline_figures(report)
        (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        run.log_artifact(output / "train_config.json")
        run.log_artifact(output / "summary.json")
        run.log_artifacts(output / MODEL_DIR, MODEL_DIR)
        if config.register_as:
            summary["registered"] = run.register_model(config.register_as, MODEL_DIR, tags=lineage)
        return summary
