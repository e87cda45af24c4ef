"""Jobs made of other jobs: ``study`` (the real-faces study) and ``pipeline`` (generate -> train -> evaluate)."""

from __future__ import annotations

from pathlib import Path

import typer

from synfer_ray.cli.common import config_help, config_path, fail
from synfer_ray.cli.train import echo_train_summary
from synfer_ray.errors import SynferError

app = typer.Typer()


@app.command("study")
def study(
    config: str = typer.Option(..., "--config", "-c", help=config_help("study", "Study YAML (configs/study.yaml)")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. generation.per_class=50."),
) -> None:
    """SynFER's claims on real faces: guide + evaluator, generator, labeler, four conditions, downstream."""
    from synfer_ray.config import StudyConfig, load_config
    from synfer_ray.study import run_study
    from synfer_ray.tracking import tracking_uri
    try:
        parsed = load_config(StudyConfig, config_path(config), overrides or [])
        results = run_study(parsed)
    except SynferError as error:
        fail(error)
    typer.echo(Path(results["report"]).read_text())
    typer.echo(f"report: {results['report']}")
    if results.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {results['mlflow_run_id']} ({tracking_uri(parsed.tracking)})")


@app.command("pipeline")
def pipeline(
    config: str = typer.Option(..., "--config", "-c",
                               help=config_help("pipeline", "YAML with a generate: and a train: section")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. generate.count=500 train.optim.epochs=3."),
) -> None:
    """generate -> train -> evaluate in one go (the `jobs/pipeline.py` of `ray job submit`)."""
    from synfer_ray.config import PipelineConfig, load_config
    from synfer_ray.generate import run_generate, summary_table
    from synfer_ray.train.fer import run_train
    try:
        parsed = load_config(PipelineConfig, config_path(config), overrides or [])
        card = run_generate(parsed.generate, progress=False)
        typer.echo(summary_table(card))
        typer.echo(f"dataset: {parsed.generate.output}")
        summary = run_train(parsed.train)
    except SynferError as error:
        fail(error)
    echo_train_summary(summary, parsed.train.tracking)
