"""Making and reading datasets: ``generate``, ``generate-one``, ``inspect``, ``score``, ``demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from synfer_ray.cli.common import config_help, config_path, fail, parse_aus
from synfer_ray.config import DEFAULT_SG_TARGET
from synfer_ray.errors import SynferError

app = typer.Typer()


@app.command("generate")
def generate(
    config: str = typer.Option(..., "--config", "-c", help=config_help("generate")),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. count=1000 sampling.steps=30."),
    overwrite: bool = typer.Option(False, help="Delete an output made by a different config first."),
) -> None:
    """Make (or finish) a labelled synthetic dataset: manifest -> generator -> labeler -> shards."""
    from synfer_ray.config import GenerateConfig, load_config
    from synfer_ray.generate import run_generate, summary_table
    try:
        parsed = load_config(GenerateConfig, config_path(config), overrides or [])
        card = run_generate(parsed, overwrite=overwrite)
    except SynferError as error:
        fail(error)
    typer.echo(summary_table(card))
    typer.echo(f"dataset: {parsed.output}")
    if card.get("mlflow_run_id"):
        from synfer_ray.tracking import tracking_uri
        typer.echo(f"mlflow run: {card['mlflow_run_id']} ({tracking_uri(parsed.tracking)})")


@app.command("generate-one")
def generate_one(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    expression: str = typer.Option(..., help="Target expression, e.g. happy."),
    out: Path = typer.Option(Path("samples"), help="Directory for the PNGs and provenance JSON."),
    au: list[str] = typer.Option([], help="AU intensity NAME=VALUE, repeatable; default: the class prototype."),
    prompt: Optional[str] = typer.Option(None, help="Caption; default: sampled from the seed."),
    seed: int = typer.Option(0, help="Seed of the first image; image k uses seed + k."),
    n: int = typer.Option(4, "-n", "--num-images", min=1, max=256, help="Number of images."),
    steps: int = typer.Option(25, help="Sampling steps."),
    cfg_scale: float = typer.Option(3.0, help="Classifier-free guidance scale (1 = off)."),
    au_scale: float = typer.Option(1.0, help="Weight of the AU attention (0 = text only)."),
    sg_scale: float = typer.Option(0.0, help="Semantic-guidance step: percent of the steered norm (0 = off)."),
    sg_window: float = typer.Option(0.4, help="Fraction of late steps with semantic guidance."),
    sg_target: str = typer.Option(DEFAULT_SG_TARGET, help="What semantic guidance steers: text, au or both."),
    sg_adaptive: bool = typer.Option(False, help="Scale each image's SG step by 1 - p(target)."),
    sg_classifier: Optional[Path] = typer.Option(None, help="Guiding classifier (default: the bundle's)."),
    sg_guide: str = typer.Option("pixels", help="What the guide reads: pixels (the decoded image, read by the "
                                                "guiding classifier) or latents (the predicted latent, read by "
                                                "the latent guide; no decode)."),
    sg_reuse_pass: bool = typer.Option(False, help="Take the guide's UNet pass as the guided step's conditional "
                                                   "half (one pass fewer; the move acts from the next step)."),
    sg_checkpointing: bool = typer.Option(False, help="Recompute activations in guided steps' backward pass: "
                                                      "less memory, more time, the same images."),
    sg_latent_guide: Optional[Path] = typer.Option(None, help="Latent guide for --sg-guide latents (default: the "
                                                              "bundle's sg_latent_guide/)."),
    reference: Optional[Path] = typer.Option(None, help="Reference face for layout initialisation."),
    scheduler: str = typer.Option("ddim", help="ddim, dpmpp_2m, unipc or euler."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16; fp16 needs --device cuda."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Write PNGs of one expression for a quick look, each with its full provenance."""
    from synfer_ray.generate_one import generate_pngs
    try:
        written = generate_pngs(bundle, expression, out, aus=parse_aus(au), prompt=prompt, seed=seed, n=n,
                                steps=steps, cfg_scale=cfg_scale, au_scale=au_scale, sg_scale=sg_scale,
                                sg_window=sg_window, sg_target=sg_target, sg_adaptive=sg_adaptive,
                                sg_classifier=sg_classifier, sg_guide=sg_guide, sg_reuse_pass=sg_reuse_pass,
                                sg_checkpointing=sg_checkpointing, sg_latent_guide=sg_latent_guide,
                                reference=reference,
                                scheduler=scheduler, precision=precision, device=device)
    except SynferError as error:
        fail(error)
    for path in written:
        typer.echo(str(path))


@app.command("inspect")
def inspect(path: str = typer.Argument(..., help="Dataset directory or URI.")) -> None:
    """Print a dataset's card and verify every shard (checksums, row ranges)."""
    from synfer_ray.generate import inspect_dataset, summary_table
    try:
        card, problems = inspect_dataset(path)
    except SynferError as error:
        fail(error)
    if card is not None:
        typer.echo(summary_table(card))
        typer.echo(f"bundle {card['bundle']['content_hash'][:16]}, {card['shards']} shards, "
                   f"created {card['created']}")
    for problem in problems:
        typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo("all shards intact")


@app.command("score")
def score(
    datasets: list[str] = typer.Argument(..., help="Finished synfer datasets, read as one (a setting at several "
                                                   "seeds)."),
    evaluator: Path = typer.Option(..., help="A FER classifier trained on real faces (not the generator's guide)."),
    baseline: list[str] = typer.Option([], help="Datasets of the same seeds made another way, e.g. without SG "
                                                "(repeatable): the change against them."),
    out: Optional[Path] = typer.Option(None, help="Write score.json here."),
) -> None:
    """Score generated datasets with a FER classifier trained on real faces.

    Reports the share of faces read as the class asked of them (overall and per class) and the
    within-class diversity; with --baseline, the change against the baseline datasets. This is
    semantic guidance's held-out check: score `synfer generate` output made at seeds no sweep used."""
    from synfer_ray.models import load_classifier
    from synfer_ray.config import RayConfig
    from synfer_ray.data.faces import resolve_source
    from synfer_ray.data.shards import CARD_NAME, ShardStore
    from synfer_ray.pipeline import ensure_ray
    from synfer_ray.study import against_baseline, score_dataset
    try:
        classes = None
        for field, paths in (("datasets", datasets), ("--baseline", baseline)):
            if len({Path(path).resolve() for path in paths}) < len(paths):
                raise SynferError(field, paths, "each dataset once (the same rows read twice count once)")
            for path in paths:
                if not resolve_source(path, field).synthetic:
                    raise SynferError(field, path, "a finished synfer dataset (a `synfer generate` output "
                                                   "directory with dataset.json)")
                card = ShardStore(path).read_json(CARD_NAME)
                classes = classes or card["classes"]
                if card["classes"] != classes:
                    raise SynferError(field, path, f"datasets of one bundle's classes {classes}; it has "
                                                   f"{card['classes']}")
        # Refused here, before any actor starts: one that does not load, or does not know a class.
        missing = [c for c in classes if c not in load_classifier(evaluator, field="--evaluator").classes]
        if missing:
            raise SynferError("--evaluator", str(evaluator), f"a classifier that knows every class of the datasets; "
                                                             f"it lacks {missing}")
    except SynferError as error:
        fail(error)
    ensure_ray(RayConfig())
    scores = {"datasets": datasets, "evaluator": str(evaluator),
              "score": score_dataset(datasets, str(evaluator), classes)}
    if baseline:
        scores["baseline_datasets"] = baseline
        scores["baseline"] = score_dataset(baseline, str(evaluator), classes)
    for name in ("score", "baseline"):
        if name in scores:
            figures = scores[name]
            by_class = ", ".join(f"{c} {share:.0%}" for c, share in figures["fer_accuracy_per_class"].items())
            typer.echo(f"{'faces' if name == 'score' else 'baseline'}: {figures['rows']} rows, read as asked "
                       f"{figures['fer_accuracy']:.1%} ({by_class}), diversity {figures['diversity']:.4f}")
    if baseline:
        change = scores["against_baseline"] = against_baseline(scores["score"], scores["baseline"])
        typer.echo(f"against the baseline: {change['agreement_points']:+.1f} points read as asked, diversity "
                   f"{change['diversity_change']:+.1%}")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "score.json").write_text(json.dumps(scores, indent=2))
        typer.echo(f"report: {out / 'score.json'}")


@app.command("demo")
def demo(
    output: Path = typer.Option(Path("outputs/demo"), help="Where the bundle, dataset and MLflow store go."),
    count: int = typer.Option(224, help="Images to generate."),
) -> None:
    """Make a small labelled dataset on built-in defaults, with nothing to configure.

    Runs `synfer generate` on local Ray with the shipped faces-48 bundle (a tiny random-weight one
    where it is absent), a local MLflow store and local output."""
    from synfer_ray.bundle import MANIFEST_NAME, make_tiny_bundle
    from synfer_ray.config import GenerateConfig, load_config
    from synfer_ray.generate import run_generate, summary_table
    from synfer_ray.presets import preset_path
    shipped = Path(__file__).resolve().parents[2] / "models" / "faces-48"  # the checkout's models/
    if (shipped / MANIFEST_NAME).is_file():
        bundle = shipped
        typer.echo(f"using the shipped bundle {bundle} (FER-2013 faces, research use only)")
    else:
        bundle = output / "bundle"
        if not (bundle / MANIFEST_NAME).is_file():
            typer.echo(f"making a tiny random-weight bundle at {bundle} (no shipped models/faces-48 here)")
            make_tiny_bundle(bundle)
    dataset = output / "dataset"
    overrides = [f"bundle={bundle}", f"output={dataset}", f"count={count}",
                 f"labeling.voters=[{{path: {bundle / 'sg_classifier'}, name: bundle-guide}}]",
                 f"tracking.uri=sqlite:///{(output / 'mlflow.db').resolve()}"]
    try:
        config = load_config(GenerateConfig, preset_path("tiny"), overrides)
        card = run_generate(config)
    except SynferError as error:
        fail(error)
    typer.echo(summary_table(card))
    typer.echo(f"dataset: {dataset} (read it with pyarrow.parquet.read_table('{dataset}/data'))")
    typer.echo(f"report: {dataset}/report/contact_sheet.png")
    typer.echo(f"mlflow: run {card['mlflow_run_id']} in sqlite:///{(output / 'mlflow.db').resolve()}")
