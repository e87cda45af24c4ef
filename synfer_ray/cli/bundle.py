"""``synfer bundle``: make, inspect, export and measure model bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from synfer_ray.cli.common import fail
from synfer_ray.config import DIVERSITY_TOLERANCE
from synfer_ray.errors import SynferError

app = typer.Typer(help="Make, inspect, export and measure model bundles.", no_args_is_help=True)


@app.command("make-tiny")
def make_tiny(
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
        fail(error)
    typer.echo(f"wrote {path} (content hash {manifest.content_hash[:16]})")


@app.command("make-random")
def make_random(
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
        fail(error)
    typer.echo(f"wrote {path} ({arch} at {manifest.resolution}px, content hash {manifest.content_hash[:16]})")


@app.command("init")
def init(
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
        fail(error)
    typer.echo(f"wrote {path} over {base} (content hash {manifest.content_hash[:16]})")


@app.command("export")
def export(
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
        fail(error)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    typer.echo(f"wrote {target} ({size / 2**20:.1f} MiB, content hash {manifest.content_hash[:16]})")


@app.command("quality")
def quality(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    evaluator: Path = typer.Option(..., help="A FER classifier trained on real faces (not the bundle's guide)."),
    faces: Path = typer.Option(..., help="Labelled real faces (Parquet) for the reconstructions."),
    out: Path = typer.Option(..., help="Directory for contact_sheet.png, reconstructions.png, quality.json."),
    per_class: int = typer.Option(32, help="Samples per class."),
    steps: int = typer.Option(25, help="Sampling steps."),
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
        settings = build_config(QualityConfig, {
            "evaluator": str(evaluator), "samples_per_class": per_class, "seed": seed, "precision": precision,
            "sampling": {"steps": steps, "cfg_scale": cfg_scale, "sg_scale": sg_scale, "scheduler": scheduler}})
        report = quality_report(bundle, settings, out, originals_from(rows, manifest.classes, manifest.resolution))
    except SynferError as error:
        fail(error)
    for name, value in report["metrics"].items():
        typer.echo(f"{name}: {value:.4f}")
    typer.echo(f"report: {out}")


TOLERANCE_HELP = ("Diversity SG may cost against no SG, for the rule's pick and the per-class mixes; under the "
                  "target's bound it leaves a margin for the pick's luck, e.g. 0.08.")


def _check_tolerance(tolerance: float) -> None:
    if not 0 < tolerance < 1:
        raise SynferError("--tolerance", tolerance, "a share of no SG's diversity between 0 and 1, e.g. 0.08")


@app.command("sg-sweep")
def sg_sweep(
    bundle: Path = typer.Argument(..., help="Bundle directory (its sg_classifier/, or with --sg-guide latents its "
                                            "sg_latent_guide/, guides)."),
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
    sg_guide: str = typer.Option("pixels", help="What the guide reads at every point: pixels (the decoded image, "
                                                "read by the guiding classifier) or latents (the predicted "
                                                "latent, read by the latent guide)."),
    sg_reuse_pass: bool = typer.Option(False, help="Take the guide's UNet pass as the guided step's conditional "
                                                   "half (one pass fewer; the move acts from the next step)."),
    sg_checkpointing: bool = typer.Option(False, help="Recompute activations in guided steps' backward pass: "
                                                      "less memory, more time, the same faces."),
    sg_latent_guide: Optional[Path] = typer.Option(None, help="Latent guide for --sg-guide latents (default: the "
                                                              "bundle's sg_latent_guide/)."),
    real_faces: Optional[str] = typer.Option(None, help="Labelled real faces (Parquet): the same readings of "
                                                        "as many real faces per class, a row to compare with."),
    tolerance: float = typer.Option(DIVERSITY_TOLERANCE, help=TOLERANCE_HELP),
) -> None:
    """Evaluator agreement, diversity and a contact sheet for each SG target and scale."""
    from synfer_ray.generator.sampler import SamplerSettings
    from synfer_ray.train.generator_report import sg_sweep
    try:
        _check_tolerance(tolerance)
        base = SamplerSettings(steps=steps, cfg_scale=cfg_scale, sg_window=sg_window, scheduler=scheduler,
                               sg_guide=sg_guide, sg_reuse_pass=sg_reuse_pass, sg_checkpointing=sg_checkpointing)
        for name in target:
            SamplerSettings(sg_target=name)  # refused here, before any sampling, naming sg_target
        if any(value < 0 for value in scale):
            raise SynferError("--scale", scale, "SG scales >= 0")
        if set(step_rule) - {"fixed", "adaptive"}:
            raise SynferError("--step-rule", step_rule, "fixed and/or adaptive")
        report = sg_sweep(bundle, str(evaluator), base, target, scale, per_class, seed, out, log=typer.echo,
                          sg_classifier=str(sg_classifier) if sg_classifier else None, step_rules=step_rule,
                          real_faces=real_faces, tolerance=tolerance,
                          sg_latent_guide=str(sg_latent_guide) if sg_latent_guide else None)
    except SynferError as error:
        fail(error)
    typer.echo(f"report: {out / 'sweep.md'} ({len(report['points'])} points)")


@app.command("sg-pool")
def sg_pool(
    sweeps: list[Path] = typer.Argument(..., help="Two or more sg-sweep output directories of one bundle, "
                                                  "evaluator and sampler, made at different --seed values."),
    out: Path = typer.Option(..., help="Directory for the pooled sweep.json and sweep.md."),
    tolerance: float = typer.Option(DIVERSITY_TOLERANCE, help=TOLERANCE_HELP),
) -> None:
    """Read several seeds' sg-sweep outputs as one sweep.

    Every point's readings are averaged, and the default rule and the per-class mixes are read off
    all their faces (fewer lucky picks than one seed's 50 faces a class)."""
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
        fail(error)
    out.mkdir(parents=True, exist_ok=True)
    classes = [name for name in pooled["points"][0]["agreement"] if name != "overall"]
    (out / "sweep.json").write_text(json.dumps({**pooled, "pooled_from": [str(d) for d in sweeps],
                                                   "tolerance": tolerance}, indent=2))
    (out / "sweep.md").write_text(f"Pooled from {len(sweeps)} sweeps (seeds {', '.join(map(str, pooled['seeds']))}): "
                                  f"{pooled['per_class']} faces a class at every point.\n\n"
                                  + sweep_table(pooled, classes, tolerance=tolerance))
    typer.echo((out / "sweep.md").read_text())
    typer.echo(f"report: {out / 'sweep.md'} ({len(pooled['points'])} points, seeds {pooled['seeds']})")


@app.command("info")
def info(path: Path = typer.Argument(..., help="Bundle directory.")) -> None:
    """Print a bundle's manifest after checking its content hash."""
    from dataclasses import asdict

    from synfer_ray.bundle import BundleManifest, content_hash
    try:
        manifest = BundleManifest.read(path)
    except SynferError as error:
        fail(error)
    intact = content_hash(path, manifest.base_model) == manifest.content_hash
    typer.echo(json.dumps({**asdict(manifest), "intact": intact}, indent=2))
    if not intact:
        raise typer.Exit(code=1)


@app.command("add-latent-guide")
def add_latent_guide(
    bundle: Path = typer.Argument(..., help="Bundle directory the guide was trained on (its VAE must match)."),
    guide: Path = typer.Argument(..., help="A latent guide: OUTPUT/model of `synfer train` with model.arch "
                                           "latent-guide."),
    out: Path = typer.Argument(..., help="A new or empty directory for the new bundle version: a copy of BUNDLE "
                                         "with the guide as sg_latent_guide/ and a new content hash."),
) -> None:
    """Install a trained latent guide into a new version of a bundle, for `sampling.sg_guide: latents`."""
    from synfer_ray.models import install_latent_guide
    try:
        manifest = install_latent_guide(bundle, guide, out)
    except SynferError as error:
        fail(error)
    typer.echo(f"wrote {out} with sg_latent_guide/ (content hash {manifest.content_hash[:16]})")
