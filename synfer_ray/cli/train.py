"""Training and evaluating models: ``train``, ``train-generator``, ``train-labeler``, ``train-adapter``, ``evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from synfer_ray.cli.common import config_help, config_path, fail
from synfer_ray.errors import SynferError

app = typer.Typer()

OVERWRITE_HELP = "Replace a finished run in the same output."


def echo_train_summary(summary: dict, tracking) -> None:
    """Print a FER training run's best epoch, test figures, model path and MLflow run."""
    from synfer_ray.tracking import tracking_uri
    typer.echo(f"best epoch {summary['best_epoch']}: val accuracy {summary['best_val_accuracy']:.4f}")
    if "test" in summary:
        typer.echo("test: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items() if isinstance(v, float)))
    typer.echo(f"model: {summary['model']}")
    if summary.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {summary['mlflow_run_id']} ({tracking_uri(tracking)})")


def _echo_generator_summary(summary: dict, tracking) -> None:
    from synfer_ray.tracking import tracking_uri
    for stage, last in summary.get("stages", {}).items():
        if last:
            typer.echo(f"{stage}: step {last['step']}, " + ", ".join(
                f"{k} {v:.4g}" for k, v in last.items() if k != "step"))
    for name, value in summary.get("quality", {}).items():
        typer.echo(f"{name}: {value:.4f}")
    typer.echo(f"bundle: {summary['bundle']} (content hash {summary['content_hash'][:16]})")
    if summary.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {summary['mlflow_run_id']} ({tracking_uri(tracking)})")


@app.command("train")
def train(
    config: str = typer.Option(..., "--config", "-c", help=config_help("train")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. optim.epochs=5 scaling.num_workers=4."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
) -> None:
    """Train a FER classifier on Ray Train + DeepSpeed, evaluate it on real faces, track it in MLflow."""
    from synfer_ray.config import TrainConfig, load_config
    from synfer_ray.train.fer import run_train
    try:
        parsed = load_config(TrainConfig, config_path(config), overrides or [])
        summary = run_train(parsed, overwrite=overwrite)
    except SynferError as error:
        fail(error)
    echo_train_summary(summary, parsed.tracking)


@app.command("train-generator")
def train_generator(
    config: str = typer.Option(..., "--config", "-c", help=config_help("train-generator")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. unet.steps=200 data.limit=2000."),
    from_bundle: Optional[str] = typer.Option(None, "--from", help="Fine-tune this bundle instead of starting fresh."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
) -> None:
    """Train a generator bundle (VAE, then UNet + text encoder + AU adapter) on labelled faces."""
    from synfer_ray.config import GeneratorTrainConfig, load_config
    from synfer_ray.train.generator import run_train_generator
    try:
        extra = [f"from_bundle={from_bundle}"] if from_bundle else []
        parsed = load_config(GeneratorTrainConfig, config_path(config), (overrides or []) + extra)
        summary = run_train_generator(parsed, overwrite=overwrite)
    except SynferError as error:
        fail(error)
    _echo_generator_summary(summary, parsed.tracking)


@app.command("train-labeler")
def train_labeler(
    config: str = typer.Option(..., "--config", "-c",
                               help=config_help("train-labeler", "YAML path of a train config with model.bundle set")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. optim.epochs=5 model.bundle=PATH."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
) -> None:
    """Train FERAnno (diffusion features -> classes) on labelled faces; install it in a new bundle version."""
    from synfer_ray.config import TrainConfig, load_config
    from synfer_ray.train.labeler import run_train_labeler
    try:
        parsed = load_config(TrainConfig, config_path(config), ["model.arch=feranno", *(overrides or [])])
        summary = run_train_labeler(parsed, overwrite=overwrite)
    except SynferError as error:
        fail(error)
    echo_train_summary(summary, parsed.tracking)
    typer.echo(f"bundle with labeler/: {summary['bundle']} (content hash {summary['bundle_hash'][:16]})")


@app.command("train-adapter")
def train_adapter(
    config: str = typer.Option(..., "--config", "-c", help=config_help("train-adapter")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. stage.steps=2000 bundle=PATH."),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
) -> None:
    """Train a bundle's AU adapter (UNet, VAE, text encoder frozen) on image + caption + AU rows."""
    from synfer_ray.config import AdapterTrainConfig, load_config
    from synfer_ray.train.adapter import run_train_adapter
    from synfer_ray.tracking import tracking_uri
    try:
        parsed = load_config(AdapterTrainConfig, config_path(config), overrides or [])
        summary = run_train_adapter(parsed, overwrite=overwrite)
    except SynferError as error:
        fail(error)
    if summary["history"]:
        typer.echo(f"diffusion loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} "
                   f"over {summary['history'][-1]['step']} steps")
    typer.echo(f"bundle: {summary['bundle']} (content hash {summary['content_hash'][:16]})")
    if summary.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {summary['mlflow_run_id']} ({tracking_uri(parsed.tracking)})")


@app.command("evaluate")
def evaluate(
    model: Path = typer.Argument(..., help="A saved classifier directory (e.g. OUTPUT/model)."),
    data: str = typer.Argument(..., help="Labelled faces: Parquet file/directory or a synfer dataset."),
    out: Optional[Path] = typer.Option(None, help="Write eval_report.json/.txt and confusion_matrix.png here."),
    device: str = typer.Option("auto", help="auto (CUDA where available), cpu or cuda."),
    mirror_average: bool = typer.Option(False, help="Read each face and its mirror image; report their mean "
                                                    "(as labeling.mirror_average)."),
) -> None:
    """Accuracy, UAR, macro-F1, per-class table and confusion matrix of a model on labelled faces."""
    from synfer_ray.evaluate import evaluate_model, format_report, write_report
    try:
        report = evaluate_model(model, data, device=device, mirror_average=mirror_average)
    except SynferError as error:
        fail(error)
    typer.echo(format_report(report))
    if out:
        for path in write_report(report, out):
            typer.echo(str(path))
