"""The ``synfer`` command line. Each command parses its options once and calls one library function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from synfer_ray.config import DEFAULT_SG_TARGET, DIVERSITY_TOLERANCE
from synfer_ray.errors import SynferError

app = typer.Typer(help="Make labelled synthetic facial-expression datasets with SynFER, on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bundle_app = typer.Typer(help="Create and inspect model bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
data_app = typer.Typer(help="Bring labelled faces into the schema every job reads.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(error: SynferError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@bundle_app.command("make-tiny")
def bundle_make_tiny(
    path: Path = typer.Argument(..., help="Directory to write the bundle into."),
    seed: int = typer.Option(0, help="Weight seed; the same seed gives the same bytes."),
    resolution: int = typer.Option(48, help="Image size in pixels (multiple of 4)."),
    expressions: str = typer.Option("affectnet7", help="Class set: affectnet7 or affectnet8."),
    au_set: str = typer.Option("fineface12", help="AU names: fineface12 or opengraphau41."),
) -> None:
    """Write a small random-weight bundle in the real SD layout (for tests and demos)."""
    from synfer_ray import taxonomy
    from synfer_ray.bundle import make_tiny_bundle
    try:
        manifest = make_tiny_bundle(path, seed=seed, resolution=resolution,
                                    classes=taxonomy.expression_set(expressions), au_names=taxonomy.au_set(au_set))
    except SynferError as error:
        _fail(error)
    typer.echo(f"wrote {path} (content hash {manifest.content_hash[:16]})")


@bundle_app.command("make-random")
def bundle_make_random(
    path: Path = typer.Argument(..., help="Directory to write the bundle into."),
    arch: str = typer.Option(..., help="sd15 (Stable Diffusion 1.5), sd21 (2.1, v-prediction) or tiny."),
    resolution: Optional[int] = typer.Option(None, help="Image size (default: 512 sd15, 768 sd21, 48 tiny)."),
    seed: int = typer.Option(0, help="Weight seed; the same seed gives the same bytes."),
    dtype: str = typer.Option("fp16", help="How the weights are stored: fp16 or fp32 (loading computes in fp32)."),
    expressions: str = typer.Option("affectnet7", help="Class set: affectnet7 or affectnet8."),
    au_set: str = typer.Option("fineface12", help="AU names: fineface12 or opengraphau41."),
) -> None:
    """Write a random-weight bundle with the real architecture and configs of SD 1.5 or 2.1 (or tiny)."""
    import torch

    from synfer_ray import taxonomy
    from synfer_ray.bundle import make_random_bundle
    types = {"fp16": torch.float16, "fp32": torch.float32}
    try:
        if dtype not in types:
            raise SynferError("--dtype", dtype, "fp16 or fp32")
        manifest = make_random_bundle(path, arch, resolution=resolution, seed=seed, dtype=types[dtype],
                                      classes=taxonomy.expression_set(expressions), au_names=taxonomy.au_set(au_set))
    except SynferError as error:
        _fail(error)
    typer.echo(f"wrote {path} ({arch} at {manifest.resolution}px, content hash {manifest.content_hash[:16]})")


@bundle_app.command("init")
def bundle_init(
    path: Path = typer.Argument(..., help="Directory to write the bundle into."),
    base: str = typer.Option(..., help="Stable Diffusion weights: a hub id or a diffusers directory."),
    expressions: str = typer.Option("affectnet7", help="Class set: affectnet7 or affectnet8."),
    au_set: str = typer.Option("fineface12", help="AU names: fineface12 or opengraphau41."),
    resolution: Optional[int] = typer.Option(None, help="Image size (default: what the base generates, "
                                                         "UNet sample size x VAE factor)."),
) -> None:
    """Start a bundle over existing SD weights with a fresh (untrained) AU adapter."""
    from synfer_ray import taxonomy
    from synfer_ray.bundle import init_bundle
    try:
        manifest = init_bundle(path, base, classes=taxonomy.expression_set(expressions),
                               au_names=taxonomy.au_set(au_set), resolution=resolution)
    except SynferError as error:
        _fail(error)
    typer.echo(f"wrote {path} over {base} (content hash {manifest.content_hash[:16]})")


@bundle_app.command("export")
def bundle_export(
    source: Path = typer.Argument(..., help="Bundle directory."),
    target: Path = typer.Argument(..., help="Where to write the copy."),
    dtype: str = typer.Option("fp16", help="fp16 or bf16 (the weights' storage type)."),
    card: Optional[Path] = typer.Option(None, help="A model card (Markdown) to ship as README.md."),
) -> None:
    """Copy a bundle with its weights stored in half precision (for shipping); loads back in fp32."""
    import torch

    from synfer_ray.bundle import export_bundle
    types = {"fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        if dtype not in types:
            raise SynferError("--dtype", dtype, "fp16 or bf16")
        if card is not None and not card.is_file():
            raise SynferError("--card", str(card), "an existing Markdown file")
        manifest = export_bundle(source, target, types[dtype], card.read_text() if card else None)
    except SynferError as error:
        _fail(error)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    typer.echo(f"wrote {target} ({size / 2**20:.1f} MiB, content hash {manifest.content_hash[:16]})")


@bundle_app.command("quality")
def bundle_quality(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    evaluator: Path = typer.Option(..., help="A FER classifier trained on real faces (not the bundle's guide)."),
    faces: Path = typer.Option(..., help="Labelled real faces (Parquet) for the reconstructions."),
    out: Path = typer.Option(..., help="Directory for contact_sheet.png, reconstructions.png, quality.json."),
    per_class: int = typer.Option(32, help="Samples per class."),
    steps: int = typer.Option(25, help="DDIM steps."),
    cfg_scale: float = typer.Option(3.0, help="Classifier-free guidance scale."),
    sg_scale: float = typer.Option(0.0, help="Semantic guidance scale (the bundle's sg_classifier guides)."),
    seed: int = typer.Option(10_000, help="Seed of the first sample."),
    scheduler: str = typer.Option("ddim", help="ddim, dpmpp_2m, unipc or euler."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16 (GPU): the bundle's weights."),
) -> None:
    """How often a real-data FER classifier agrees with the asked class, per class; contact sheet."""
    import pyarrow.dataset as pads

    from synfer_ray.bundle import BundleManifest
    from synfer_ray.config import QualityConfig, build_config
    from synfer_ray.train.generator_report import originals_from, quality_report
    try:
        manifest = BundleManifest.read(bundle)
        rows = pads.dataset(str(faces), format="parquet").head(64, columns=["image", "label"]).to_pydict()
        quality = build_config(QualityConfig, {
            "evaluator": str(evaluator), "samples_per_class": per_class, "seed": seed, "precision": precision,
            "sampling": {"steps": steps, "cfg_scale": cfg_scale, "sg_scale": sg_scale, "scheduler": scheduler}})
        report = quality_report(bundle, quality, out, originals_from(rows, manifest.classes, manifest.resolution))
    except SynferError as error:
        _fail(error)
    for name, value in report["metrics"].items():
        typer.echo(f"{name}: {value:.4f}")
    typer.echo(f"report: {out}")


TOLERANCE_HELP = ("Diversity SG may cost against no SG, for the rule's pick and the per-class mixes; under the "
                  "target's bound it leaves a margin for the pick's luck, e.g. 0.08.")


def _check_tolerance(tolerance: float) -> None:
    if not 0 < tolerance < 1:
        raise SynferError("--tolerance", tolerance, "a share of no SG's diversity between 0 and 1, e.g. 0.08")


@bundle_app.command("sg-sweep")
def bundle_sg_sweep(
    bundle: Path = typer.Argument(..., help="Bundle directory (its sg_classifier/ guides)."),
    evaluator: Path = typer.Option(..., help="A FER classifier trained on real faces (not the bundle's guide)."),
    out: Path = typer.Option(..., help="Directory for sweep.json, sweep.md and a contact sheet per point."),
    target: list[str] = typer.Option(["text", "au", "both"], help="SG targets to sweep (repeatable)."),
    scale: list[float] = typer.Option([2, 4, 8, 16, 32], help="SG scales, percent of the norm (repeatable)."),
    per_class: int = typer.Option(50, help="Samples per class and point (the same seeds at every point)."),
    steps: int = typer.Option(25, help="Sampling steps."),
    cfg_scale: float = typer.Option(3.0, help="Classifier-free guidance scale."),
    sg_window: float = typer.Option(0.4, help="Fraction of late steps with semantic guidance."),
    step_rule: list[str] = typer.Option(["fixed"], help="SG step rules to sweep (repeatable): fixed, or adaptive "
                                                        "(each sample's step times 1 - p(target))."),
    scheduler: str = typer.Option("ddim", help="ddim, dpmpp_2m, unipc or euler."),
    seed: int = typer.Option(10_000, help="Seed of the first sample."),
    sg_classifier: Optional[Path] = typer.Option(None, help="Guiding classifier (default: the bundle's)."),
    real_faces: Optional[str] = typer.Option(None, help="Labelled real faces (Parquet): the same readings of "
                                                        "as many real faces per class, a row to compare with."),
    tolerance: float = typer.Option(DIVERSITY_TOLERANCE, help=TOLERANCE_HELP),
) -> None:
    """Evaluator agreement, diversity and a contact sheet for each SG target and scale."""
    from synfer_ray.generator.sampler import SamplerSettings
    from synfer_ray.train.generator_report import sg_sweep
    try:
        _check_tolerance(tolerance)
        base = SamplerSettings(steps=steps, cfg_scale=cfg_scale, sg_window=sg_window, scheduler=scheduler)
        for name in target:
            SamplerSettings(sg_target=name)  # refused here, before any sampling, naming sg_target
        if any(value < 0 for value in scale):
            raise SynferError("--scale", scale, "SG scales >= 0")
        if set(step_rule) - {"fixed", "adaptive"}:
            raise SynferError("--step-rule", step_rule, "fixed and/or adaptive")
        report = sg_sweep(bundle, str(evaluator), base, target, scale, per_class, seed, out, log=typer.echo,
                          sg_classifier=str(sg_classifier) if sg_classifier else None, step_rules=step_rule,
                          real_faces=real_faces, tolerance=tolerance)
    except SynferError as error:
        _fail(error)
    typer.echo(f"report: {out / 'sweep.md'} ({len(report['points'])} points)")


@bundle_app.command("sg-pool")
def bundle_sg_pool(
    sweeps: list[Path] = typer.Argument(..., help="Two or more sg-sweep output directories of one bundle, "
                                                  "evaluator and sampler, made at different --seed values."),
    out: Path = typer.Option(..., help="Directory for the pooled sweep.json and sweep.md."),
    tolerance: float = typer.Option(DIVERSITY_TOLERANCE, help=TOLERANCE_HELP),
) -> None:
    """Several seeds' sweeps read as one: every point's readings averaged, the default rule and the
    per-class mixes read off all their faces (fewer lucky picks than one seed's 50 faces a class)."""
    from synfer_ray.train.generator_report import pooled_sweep, sweep_table
    try:
        _check_tolerance(tolerance)
        reports = []
        for directory in sweeps:
            path = directory / "sweep.json"
            if not path.is_file():
                raise SynferError("sweeps", str(directory), "directories written by `synfer bundle sg-sweep` "
                                                            "(each holds sweep.json)")
            reports.append(json.loads(path.read_text()))
        pooled = pooled_sweep(reports)
    except SynferError as error:
        _fail(error)
    out.mkdir(parents=True, exist_ok=True)
    classes = [name for name in pooled["points"][0]["agreement"] if name != "overall"]
    (out / "sweep.json").write_text(json.dumps({**pooled, "pooled_from": [str(d) for d in sweeps],
                                                   "tolerance": tolerance}, indent=2))
    (out / "sweep.md").write_text(f"Pooled from {len(sweeps)} sweeps (seeds {', '.join(map(str, pooled['seeds']))}): "
                                  f"{pooled['per_class']} faces a class at every point.\n\n"
                                  + sweep_table(pooled, classes, tolerance=tolerance))
    typer.echo((out / "sweep.md").read_text())
    typer.echo(f"report: {out / 'sweep.md'} ({len(pooled['points'])} points, seeds {pooled['seeds']})")


@bundle_app.command("info")
def bundle_info(path: Path = typer.Argument(..., help="Bundle directory.")) -> None:
    """Print a bundle's manifest after checking its content hash."""
    from dataclasses import asdict

    from synfer_ray.bundle import BundleManifest, content_hash
    try:
        manifest = BundleManifest.read(path)
    except SynferError as error:
        _fail(error)
    intact = content_hash(path, manifest.base_model) == manifest.content_hash
    typer.echo(json.dumps({**asdict(manifest), "intact": intact}, indent=2))
    if not intact:
        raise typer.Exit(code=1)


@data_app.command("import")
def data_import(
    source: Path = typer.Argument(..., help="Image folder per class, FER-2013-style CSV, or Parquet."),
    out: Path = typer.Argument(..., help="Output directory (train.parquet, validation.parquet, report)."),
    kind: str = typer.Option("auto", help="auto, folder, csv or parquet."),
    expressions: str = typer.Option("affectnet7", help="Class set: affectnet7 or affectnet8."),
    label_map: Optional[str] = typer.Option(None, help="SOURCE=CLASS pairs (0=anger,1=disgust) or a JSON/YAML file."),
    image_column: str = typer.Option("image", help="Parquet: the image-bytes column."),
    label_column: str = typer.Option("label", help="Parquet/CSV: the label column (CSV default: emotion)."),
    caption_column: Optional[str] = typer.Option(None, help="Parquet: a caption column."),
    aus_column: Optional[str] = typer.Option(None, help="Parquet: an AU-vector column."),
    au_set: Optional[str] = typer.Option(None, help="AU names of the AU column: fineface12 or opengraphau41."),
    id_column: Optional[str] = typer.Option(None, help="Parquet: a stable row id (default: a hash of the image)."),
    usage_column: Optional[str] = typer.Option(
        None, help="Parquet: FER-2013-style Usage (Training / PublicTest / PrivateTest); CSV: Usage when present."),
    val_fraction: float = typer.Option(0.1, help="Share of rows for validation (by id hash)."),
    seed: int = typer.Option(0, help="Seed of the split hash."),
    skip_bad: bool = typer.Option(False, help="Drop corrupt images and unknown labels (listed in the report)."),
) -> None:
    """Convert labelled faces into the labelled-faces Parquet schema, split train/validation by id hash."""
    from synfer_ray import taxonomy
    from synfer_ray.data.importer import ImportOptions, class_counts_table, import_faces, parse_label_map
    try:
        classes = taxonomy.expression_set(expressions)
        options = ImportOptions(kind=kind, classes=classes, label_map=parse_label_map(label_map),
                                image_column=image_column, label_column=label_column,
                                caption_column=caption_column, aus_column=aus_column,
                                au_names=taxonomy.au_set(au_set) if au_set else None, id_column=id_column,
                                usage_column=usage_column,
                                val_fraction=val_fraction, seed=seed, skip_bad=skip_bad)
        report = import_faces(source, out, options)
    except SynferError as error:
        _fail(error)
    typer.echo(class_counts_table(report, classes))
    rejected = report["rejected"]
    dropped = rejected["corrupt_images"]["count"] + sum(v["count"] for v in rejected["unknown_labels"].values())
    if dropped:
        typer.echo(f"dropped {dropped} rows (see {out / 'import_report.json'})")
    typer.echo(f"wrote {out / 'train.parquet'} and {out / 'validation.parquet'}")


def _parse_aus(pairs: list[str]) -> dict[str, float]:
    aus = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            aus[name.strip()] = float(value)
        except ValueError:
            raise SynferError("--au", pair, "NAME=VALUE, e.g. --au AU12=0.8") from None
        if not sep:
            raise SynferError("--au", pair, "NAME=VALUE, e.g. --au AU12=0.8")
    return aus


@app.command("generate-one")
def generate_one(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    expression: str = typer.Option(..., help="Target expression, e.g. happy."),
    out: Path = typer.Option(Path("samples"), help="Directory for the PNGs and provenance JSON."),
    au: list[str] = typer.Option([], help="AU intensity NAME=VALUE, repeatable; default: the class prototype."),
    prompt: Optional[str] = typer.Option(None, help="Caption; default: sampled from the seed."),
    seed: int = typer.Option(0, help="Seed of the first image; image k uses seed + k."),
    n: int = typer.Option(4, "-n", "--num-images", min=1, max=256, help="Number of images."),
    steps: int = typer.Option(25, help="DDIM steps."),
    cfg_scale: float = typer.Option(3.0, help="Classifier-free guidance scale (1 = off)."),
    au_scale: float = typer.Option(1.0, help="Weight of the AU attention (0 = text only)."),
    sg_scale: float = typer.Option(0.0, help="Semantic-guidance step: percent of the steered norm (0 = off)."),
    sg_window: float = typer.Option(0.4, help="Fraction of late steps with semantic guidance."),
    sg_target: str = typer.Option(DEFAULT_SG_TARGET, help="What semantic guidance steers: text, au or both."),
    sg_adaptive: bool = typer.Option(False, help="Scale each image's SG step by 1 - p(target)."),
    sg_classifier: Optional[Path] = typer.Option(None, help="Guiding classifier (default: the bundle's)."),
    reference: Optional[Path] = typer.Option(None, help="Reference face for layout initialisation."),
    scheduler: str = typer.Option("ddim", help="ddim, dpmpp_2m, unipc or euler."),
    precision: str = typer.Option("auto", help="auto, fp32, bf16 or fp16; fp16 needs --device cuda."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Write PNGs of one expression for a quick look, each with its full provenance."""
    from synfer_ray.generate_one import generate_pngs
    try:
        written = generate_pngs(bundle, expression, out, aus=_parse_aus(au), prompt=prompt, seed=seed, n=n,
                                steps=steps, cfg_scale=cfg_scale, au_scale=au_scale, sg_scale=sg_scale,
                                sg_window=sg_window, sg_target=sg_target, sg_adaptive=sg_adaptive,
                                sg_classifier=sg_classifier,
                                reference=reference,
                                scheduler=scheduler, precision=precision, device=device)
    except SynferError as error:
        _fail(error)
    for path in written:
        typer.echo(str(path))


def _config_path(config: str | None) -> Path | None:
    from synfer_ray.presets import preset_path
    if config is None:
        return None
    return Path(config) if Path(config).exists() else (preset_path(config) or Path(config))


@app.command("generate")
def generate(
    config: str = typer.Option(..., "--config", "-c", help="YAML config path, or a preset name (tiny)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. count=1000 sampling.steps=30."),
    overwrite: bool = typer.Option(False, help="Delete an output made by a different config first."),
) -> None:
    """Make (or finish) a labelled synthetic dataset: manifest -> generator -> labeler -> shards."""
    from synfer_ray.config import GenerateConfig, load_config
    from synfer_ray.generate import run_generate, summary_table
    try:
        parsed = load_config(GenerateConfig, _config_path(config), overrides or [])
        card = run_generate(parsed, overwrite=overwrite)
    except SynferError as error:
        _fail(error)
    typer.echo(summary_table(card))
    typer.echo(f"dataset: {parsed.output}")
    if card.get("mlflow_run_id"):
        from synfer_ray.tracking import tracking_uri
        typer.echo(f"mlflow run: {card['mlflow_run_id']} ({tracking_uri(parsed.tracking)})")


@app.command("inspect")
def inspect(path: str = typer.Argument(..., help="Dataset directory or URI.")) -> None:
    """Print a dataset's card and verify every shard (checksums, row ranges)."""
    from synfer_ray.generate import inspect_dataset, summary_table
    try:
        card, problems = inspect_dataset(path)
    except SynferError as error:
        _fail(error)
    if card is not None:
        typer.echo(summary_table(card))
        typer.echo(f"bundle {card['bundle']['content_hash'][:16]}, {card['shards']} shards, "
                   f"created {card['created']}")
    for problem in problems:
        typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(code=1)
    typer.echo("all shards intact")


def _echo_train_summary(summary: dict, tracking) -> None:
    from synfer_ray.tracking import tracking_uri
    typer.echo(f"best epoch {summary['best_epoch']}: val accuracy {summary['best_val_accuracy']:.4f}")
    if "test" in summary:
        typer.echo("test: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items() if isinstance(v, float)))
    typer.echo(f"model: {summary['model']}")
    if summary.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {summary['mlflow_run_id']} ({tracking_uri(tracking)})")


@app.command("train")
def train(
    config: str = typer.Option(..., "--config", "-c", help="YAML config path."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. optim.epochs=5 scaling.num_workers=4."),
    overwrite: bool = typer.Option(False, help="Replace a finished run in the same output."),
) -> None:
    """Train a FER classifier on Ray Train + DeepSpeed, evaluate it on real faces, track it in MLflow."""
    from synfer_ray.config import TrainConfig, load_config
    from synfer_ray.train.fer import run_train
    try:
        parsed = load_config(TrainConfig, _config_path(config), overrides or [])
        summary = run_train(parsed, overwrite=overwrite)
    except SynferError as error:
        _fail(error)
    _echo_train_summary(summary, parsed.tracking)


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


@app.command("train-generator")
def train_generator(
    config: str = typer.Option(..., "--config", "-c", help="YAML config path, or a preset (faces-48, tiny-generator)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. unet.steps=200 data.limit=2000."),
    from_bundle: Optional[str] = typer.Option(None, "--from", help="Fine-tune this bundle instead of starting fresh."),
    overwrite: bool = typer.Option(False, help="Replace a finished run in the same output."),
) -> None:
    """Train a generator bundle (VAE, then UNet + text encoder + AU adapter) on labelled faces."""
    from synfer_ray.config import GeneratorTrainConfig, load_config
    from synfer_ray.train.generator import run_train_generator
    try:
        extra = [f"from_bundle={from_bundle}"] if from_bundle else []
        parsed = load_config(GeneratorTrainConfig, _config_path(config), (overrides or []) + extra)
        summary = run_train_generator(parsed, overwrite=overwrite)
    except SynferError as error:
        _fail(error)
    _echo_generator_summary(summary, parsed.tracking)


@app.command("train-labeler")
def train_labeler(
    config: str = typer.Option(..., "--config", "-c", help="YAML config path (a train config; model.bundle set)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. optim.epochs=5 model.bundle=PATH."),
    overwrite: bool = typer.Option(False, help="Replace a finished run in the same output."),
) -> None:
    """Train FERAnno (diffusion features -> classes) on labelled faces; install it in a new bundle version."""
    from synfer_ray.config import TrainConfig, load_config
    from synfer_ray.train.labeler import run_train_labeler
    try:
        parsed = load_config(TrainConfig, _config_path(config), ["model.arch=feranno", *(overrides or [])])
        summary = run_train_labeler(parsed, overwrite=overwrite)
    except SynferError as error:
        _fail(error)
    _echo_train_summary(summary, parsed.tracking)
    typer.echo(f"bundle with labeler/: {summary['bundle']} (content hash {summary['bundle_hash'][:16]})")


@app.command("train-adapter")
def train_adapter(
    config: str = typer.Option(..., "--config", "-c", help="YAML config path."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. stage.steps=2000 bundle=PATH."),
    overwrite: bool = typer.Option(False, help="Replace a finished run in the same output."),
) -> None:
    """Train a bundle's AU adapter (UNet, VAE, text encoder frozen) on image + caption + AU rows."""
    from synfer_ray.config import AdapterTrainConfig, load_config
    from synfer_ray.train.adapter import run_train_adapter
    from synfer_ray.tracking import tracking_uri
    try:
        parsed = load_config(AdapterTrainConfig, _config_path(config), overrides or [])
        summary = run_train_adapter(parsed, overwrite=overwrite)
    except SynferError as error:
        _fail(error)
    if summary["history"]:
        typer.echo(f"diffusion loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} "
                   f"over {summary['history'][-1]['step']} steps")
    typer.echo(f"bundle: {summary['bundle']} (content hash {summary['content_hash'][:16]})")
    if summary.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {summary['mlflow_run_id']} ({tracking_uri(parsed.tracking)})")


@app.command("study")
def study(
    config: str = typer.Option(..., "--config", "-c", help="Study YAML (configs/study.yaml)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. generation.per_class=50."),
) -> None:
    """SynFER's claims on real faces: guide + evaluator, generator, labeler, four conditions, downstream."""
    from synfer_ray.config import StudyConfig, load_config
    from synfer_ray.study import run_study
    from synfer_ray.tracking import tracking_uri
    try:
        parsed = load_config(StudyConfig, _config_path(config), overrides or [])
        results = run_study(parsed)
    except SynferError as error:
        _fail(error)
    typer.echo(Path(results["report"]).read_text())
    typer.echo(f"report: {results['report']}")
    if results.get("mlflow_run_id"):
        typer.echo(f"mlflow run: {results['mlflow_run_id']} ({tracking_uri(parsed.tracking)})")


@app.command("pipeline")
def pipeline(
    config: str = typer.Option(..., "--config", "-c", help="YAML with a generate: and a train: section."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. generate.count=500 train.optim.epochs=3."),
) -> None:
    """generate -> train -> evaluate in one go (the `jobs/pipeline.py` of `ray job submit`)."""
    from synfer_ray.config import PipelineConfig, load_config
    from synfer_ray.generate import run_generate, summary_table
    from synfer_ray.train.fer import run_train
    try:
        parsed = load_config(PipelineConfig, _config_path(config), overrides or [])
        card = run_generate(parsed.generate, progress=False)
        typer.echo(summary_table(card))
        typer.echo(f"dataset: {parsed.generate.output}")
        summary = run_train(parsed.train)
    except SynferError as error:
        _fail(error)
    _echo_train_summary(summary, parsed.train.tracking)


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
        _fail(error)
    typer.echo(format_report(report))
    if out:
        for path in write_report(report, out):
            typer.echo(str(path))


@app.command("score")
def score(
    datasets: list[str] = typer.Argument(..., help="Finished synfer datasets, read as one (a setting at several "
                                                   "seeds)."),
    evaluator: Path = typer.Option(..., help="A FER classifier trained on real faces (not the generator's guide)."),
    baseline: list[str] = typer.Option([], help="Datasets of the same seeds made another way, e.g. without SG "
                                                "(repeatable): the change against them."),
    out: Optional[Path] = typer.Option(None, help="Write score.json here."),
) -> None:
    """How a real-faces evaluator reads generated faces: the share read as the class asked of them
    (overall and per class) and within-class diversity; with --baseline, the change against it.
    SG's held-out check: the faces users get from `synfer generate`, on seeds no sweep saw."""
    from synfer_ray.classifiers import load_classifier
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
        _fail(error)
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


@app.command("serve")
def serve_command(
    config: str = typer.Option(..., "--config", "-c", help="YAML ServeConfig path."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. port=8080 max_images=4."),
) -> None:
    """Serve the generator over HTTP with Ray Serve (binds 127.0.0.1 unless host says otherwise)."""
    from synfer_ray.config import ServeConfig, load_config
    from synfer_ray.serve import run_serve
    try:
        parsed = load_config(ServeConfig, _config_path(config), overrides or [])
        from synfer_ray.bundle import BundleManifest
        BundleManifest.read(Path(parsed.bundle))  # a missing bundle fails here, not in a replica
        run_serve(parsed)
    except SynferError as error:
        _fail(error)


@app.command("demo")
def demo(
    output: Path = typer.Option(Path("outputs/demo"), help="Where the bundle, dataset and MLflow store go."),
    count: int = typer.Option(224, help="Images to generate."),
) -> None:
    """The main job on embedded defaults: local Ray, the shipped faces-48 bundle (a tiny random one
    where it is absent), local MLflow, local output."""
    from synfer_ray.bundle import MANIFEST_NAME, make_tiny_bundle
    from synfer_ray.config import GenerateConfig, load_config
    from synfer_ray.generate import run_generate, summary_table
    from synfer_ray.presets import preset_path
    shipped = Path(__file__).resolve().parents[1] / "models" / "faces-48"
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
        _fail(error)
    typer.echo(summary_table(card))
    typer.echo(f"dataset: {dataset} (read it with pyarrow.parquet.read_table('{dataset}/data'))")
    typer.echo(f"report: {dataset}/report/contact_sheet.png")
    typer.echo(f"mlflow: run {card['mlflow_run_id']} in sqlite:///{(output / 'mlflow.db').resolve()}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
