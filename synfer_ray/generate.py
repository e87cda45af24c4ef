"""The generate job: a validated config -> the Ray pipeline over missing shards -> card and report.

Everything that can be wrong with the inputs is checked in :func:`prepare` before Ray starts, and
nothing already written is touched unless the user asked for ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synfer_ray import taxonomy
from synfer_ray.bundle import BundleManifest, content_hash, load_latent_guide
from synfer_ray.config import ADDED_GENERATE_SETTINGS, GenerateConfig, without_added_settings
from synfer_ray.config.generate import without_row_neutral_settings
from synfer_ray.data.manifest import ManifestSpec
from synfer_ray.data.card import EXAMPLES_PER_CLASS, card_figures, total_statistics
from synfer_ray.data.passes import Pass, plan_top_up, shortfall
from synfer_ray.data.shards import (CARD_NAME, CONFIG_NAME, INDEX_NAME, PASSES_NAME, ShardPlan, ShardStore,
                                    auto_rows_per_shard)
from synfer_ray.errors import SynferError
from synfer_ray.generator.sampler import SamplerSettings
from synfer_ray.pipeline import GenerateJob, ensure_ray, run_shards
from synfer_ray.precision import resolve
from synfer_ray.tracking import start_run

# Settings that change the bytes of a row; anything else (pool sizes, Ray address, tracking)
# may change between a run and its resumption.
_IDENTITY_KEYS = ("count", "seed", "class_mix", "class_assignment", "aus", "sampling", "labeling", "rows_per_shard",
                  "precision", "accepted_per_class", "max_rows", "max_passes")


def _check_classifier_dir(path: str, field: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise SynferError(field, path, "a directory holding a saved FER classifier (config.json + safetensors)")


def _check_latent_guide(bundle_path: Path, sampling, guided: bool) -> None:
    """A given latent guide must be one, trained on this bundle's VAE; with ``sg_guide: latents`` and SG
    on, one must exist (the given one or the bundle's ``sg_latent_guide/``)."""
    from synfer_ray.generator.latent_guide import LATENT_GUIDE_DIR, is_latent_guide
    if sampling.sg_latent_guide:
        load_latent_guide(sampling.sg_latent_guide, bundle_path if (bundle_path / "vae").is_dir() else None,
                          field="sampling.sg_latent_guide")
    elif guided and sampling.sg_guide == "latents" and not is_latent_guide(bundle_path / LATENT_GUIDE_DIR):
        raise SynferError("sampling.sg_guide", sampling.sg_guide,
                          f"pixels, or a latent guide for this bundle: sampling.sg_latent_guide or the "
                          f"bundle's {LATENT_GUIDE_DIR}/ (it has none)")


def identity(config: GenerateConfig, bundle_hash: str) -> dict[str, Any]:
    # Settings that change how rows are computed but not their bytes (sampling.sg_checkpointing) are left
    # out: switching one resumes the same dataset.
    dumped = without_row_neutral_settings(config.model_dump(mode="json"))
    return {"bundle_hash": bundle_hash, "generator.batch_size": config.generator.batch_size,
            **{key: dumped[key] for key in _IDENTITY_KEYS}}


def accepted_targets(config: GenerateConfig, classes: tuple[str, ...]) -> dict[str, int] | None:
    """{class: accepted rows wanted}, in the bundle's class order, or None without targets."""
    targets = config.accepted_per_class
    if targets is None:
        return None
    if isinstance(targets, int):
        return {c: targets for c in classes}
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise SynferError("accepted_per_class", targets, f"classes of the bundle {list(classes)}; unknown {unknown}")
    return {c: targets[c] for c in classes if c in targets}


def row_budget(config: GenerateConfig, wanted: dict[str, int] | None, first: int) -> int:
    if wanted is None:
        return first
    return config.max_rows or max(first, 20 * sum(wanted.values()))


def shard_size(config: GenerateConfig, resolution: int):
    """rows -> rows per shard for a pass of that many rows (fixed when the pass is planned)."""
    return lambda rows: config.rows_per_shard or auto_rows_per_shard(rows, resolution, config.generator.max_actors)


def pass_plan(step: Pass) -> ShardPlan:
    return ShardPlan(step.count, step.rows_per_shard, step.start, step.index)


def pass_job(job: GenerateJob, step: Pass) -> GenerateJob:
    """The job of one pass: its shard plan and, for a top-up pass, its class quotas."""
    return dataclasses.replace(job, plan=pass_plan(step),
                               spec=dataclasses.replace(job.spec, quotas=step.quotas, quota_start=step.start))


def read_passes(store: ShardStore) -> list[Pass]:
    return [Pass.from_json(raw) for raw in store.read_json(PASSES_NAME)["passes"]] if store.exists(PASSES_NAME) else []


def write_passes(store: ShardStore, passes: list[Pass]) -> None:
    store.write_json(PASSES_NAME, {"passes": [p.as_json() for p in passes]})


def prepare(config: GenerateConfig, overwrite: bool = False) -> tuple[GenerateJob, ShardStore, list[Pass]]:
    """Validate every input and claim the output directory; return the first pass's job, the store
    and the passes recorded so far (the first pass on a fresh run)."""
    bundle_path = Path(config.bundle)
    manifest = BundleManifest.read(bundle_path)
    if content_hash(bundle_path, manifest.base_model) != manifest.content_hash:
        raise SynferError("bundle", config.bundle, "an intact bundle: its files no longer match "
                                                   "synfer_bundle.json's content hash; rebuild or re-copy it")
    weights = taxonomy.class_mix_weights(manifest.classes, config.class_mix)
    wanted = accepted_targets(config, manifest.classes)
    sampling = config.sampling
    # Class names as the bundle spells them (aliases forgiven), refused here if it has no such class.
    class_scales = {taxonomy.canonical_expression(name, manifest.classes, field=f"sampling.sg_class_scales.{name}"):
                    scale for name, scale in sampling.sg_class_scales.items()}
    settings = dataclasses.replace(SamplerSettings.from_config(sampling), sg_class_scales=class_scales)
    for pool in (config.generator, config.labeler):  # fp16 on a CPU pool is refused now, not in an actor
        if pool.num_gpus == 0:
            resolve(config.precision, "cpu", field="precision")
    if sampling.sg_classifier:
        _check_classifier_dir(sampling.sg_classifier, "sampling.sg_classifier")
    elif settings.uses_sg and sampling.sg_guide == "pixels" and not (bundle_path / "sg_classifier").is_dir():
        raise SynferError("sampling.sg_scale", sampling.sg_scale,
                          "0, or a guiding classifier: sampling.sg_classifier or the bundle's sg_classifier/")
    _check_latent_guide(bundle_path, sampling, settings.uses_sg)
    for index, voter in enumerate(config.labeling.voters):
        _check_classifier_dir(voter.path, f"labeling.voters[{index}].path")
    spec = ManifestSpec(seed=config.seed, classes=manifest.classes, class_weights=tuple(float(w) for w in weights),
                        au_names=manifest.au_names, au_jitter=config.aus.jitter,
                        extra_au_probability=config.aus.extra_probability, extra_au_max=config.aus.extra_max,
                        class_assignment=config.class_assignment, caption_style=manifest.caption_style)
    first_count = config.count or sum(wanted.values())
    first = Pass(index=0, start=0, count=first_count, rows_per_shard=shard_size(config, manifest.resolution)(first_count))
    store = ShardStore(config.output)
    store.check_writable()
    identity_now = identity(config, manifest.content_hash)
    job = GenerateJob(bundle=str(bundle_path.resolve()), output=config.output, spec=spec, plan=pass_plan(first),
                      settings=settings, sg_classifier=sampling.sg_classifier,
                      sg_latent_guide=sampling.sg_latent_guide, labeling=config.labeling,
                      generator=config.generator, labeler=config.labeler, precision=config.precision)
    if store.exists(CONFIG_NAME):
        # A dataset begun before a setting existed resumes under a config that leaves it as it was.
        existing = without_added_settings(store.read_json(CONFIG_NAME).get("identity", {}), ADDED_GENERATE_SETTINGS)
        compared = without_added_settings(identity_now, ADDED_GENERATE_SETTINGS)
        if existing != compared:
            if not overwrite:
                differs = sorted(k for k in set(existing) | set(compared) if existing.get(k) != compared.get(k))
                raise SynferError("output", config.output,
                                  f"an empty directory or one made by this same config; it was made with "
                                  f"different {', '.join(differs)}. Use another output, or pass --overwrite "
                                  f"to delete it and start again")
            store.clear()
    elif store.exists("data") and store.data_files() and not overwrite:
        raise SynferError("output", config.output, f"a directory without foreign shards (data/ exists but no "
                                                   f"{CONFIG_NAME}); use another output or --overwrite")
    store.write_json(CONFIG_NAME, {"identity": identity_now, "config": config.model_dump(mode="json")})
    passes = read_passes(store)
    if not passes:
        passes = [first]
        write_passes(store, passes)
    return job, store, passes


def _versions() -> dict[str, str]:
    import diffusers
    import pyarrow
    import ray
    import torch
    import transformers

    import synfer_ray
    return {"synfer_ray": synfer_ray.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "pyarrow": pyarrow.__version__, "python": sys.version.split()[0]}


def build_card(config: GenerateConfig, job: GenerateJob, passes: list[Pass], records: list[dict],
               wall_seconds: float, made_rows: int, targets: dict | None) -> dict[str, Any]:
    """The dataset card, from the statistics each shard's writer recorded (no row is read)."""
    classes = list(job.spec.classes)
    total = total_statistics([r["statistics"] for r in records], classes)
    by_pass = []
    for step in passes:
        mine = total_statistics([r["statistics"] for r in records if r.get("pass", 0) == step.index], classes)
        by_pass.append({**step.as_json(), "rows": int(mine["rows"]),
                        "accepted_by_label": dict(zip(classes, mine["accepted_by_label"].tolist()))})
    made = total["target"]
    return {
        "format": "synfer-dataset/2",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "requested_rows": passes[0].count,
        "shards": len(records),
        "shard_index": INDEX_NAME,
        "classes": classes,
        "au_names": list(job.spec.au_names),
        **card_figures(total, classes),
        # Per class asked for: the share of its rows accepted with that same label.
        "acceptance_by_target": {c: float(total["accepted_by_target"][i] / made[i]) if made[i] else None
                                 for i, c in enumerate(classes)},
        "passes": by_pass,
        "accepted_targets": targets,
        "bundle": {"path": job.bundle, "content_hash": BundleManifest.read(Path(job.bundle)).content_hash},
        "config": config.model_dump(mode="json"),
        "timing": {"wall_seconds_this_run": round(wall_seconds, 2), "rows_made_this_run": made_rows,
                   "images_per_second_this_run": round(made_rows / wall_seconds, 3) if wall_seconds else None,
                   "shard_seconds_total": round(sum(r["seconds"] for r in records), 2)},
        "versions": _versions(),
    }


def contact_sheet_rows(store: ShardStore, records: list[dict], classes: list[str],
                       per_class: int = EXAMPLES_PER_CLASS) -> dict[str, list[bytes]]:
    """Up to ``per_class`` images per target class, read from the few shards whose records name them
    (their row groups only): bounded by the classes, not by the dataset."""
    wanted: dict[int, dict[str, list[int]]] = {}
    need = {c: per_class for c in classes}
    for index, record in enumerate(records):
        for name, offsets in (record["statistics"] or {}).get("examples", {}).items():
            take = offsets[:need.get(name, 0)]
            if take:
                wanted.setdefault(index, {})[name] = take
                need[name] -= len(take)
        if not any(need.values()):
            break
    images: dict[str, list[bytes]] = {c: [] for c in classes}
    for index, by_class in wanted.items():
        offsets = [o for chosen in by_class.values() for o in chosen]
        table = store.read_rows(records[index], offsets, ["image", "target"])
        for image, target in zip(table.column("image").to_pylist(), table.column("target").to_pylist()):
            images[target].append(image)
    return images


def write_report(job: GenerateJob, store: ShardStore, card: dict, records: list[dict], directory: Path) -> list[Path]:
    from synfer_ray.reports import confidence_histograms, contact_sheet
    classes = card["classes"]
    return [
        contact_sheet(contact_sheet_rows(store, records, classes), classes, directory / "contact_sheet.png"),
        confidence_histograms(card["confidence_histogram"]["by_label"], classes,
                              directory / "confidence_histograms.png", tau=job.labeling.tau),
    ]


def summary_table(card: dict) -> str:
    lines = [f"{'class':10s} {'target':>7s} {'label':>7s} {'accepted':>9s} {'mean conf':>10s}"]
    for c in card["classes"]:
        conf = card["mean_confidence"][c]
        lines.append(f"{c:10s} {card['counts']['target'][c]:7d} {card['counts']['label'][c]:7d} "
                     f"{card['counts']['accepted_by_label'][c]:9d} {conf if conf is None else round(conf, 3)!s:>10s}")
    timing = card["timing"]
    lines.append(f"rows {card['rows']} / requested {card['requested_rows']}, acceptance {card['acceptance_rate']:.1%}, "
                 f"made this run {timing['rows_made_this_run']} in {timing['wall_seconds_this_run']} s "
                 f"({timing['images_per_second_this_run']} img/s)")
    targets = card.get("accepted_targets")
    if targets:
        lines.append(f"accepted-count targets: {len(card['passes'])} pass(es), {targets['stopped']}")
        for name, short in targets["short"].items():
            lines.append(f"  {name}: {targets['accepted'][name]} of {targets['wanted'][name]} accepted, "
                         f"{short} short")
    return "\n".join(lines)


def _stop_reason(passes: list[Pass], missing: dict, rows: int, budget: int, max_passes: int) -> str:
    if not missing:
        return "every class reached its target"
    if len(passes) >= max_passes:
        return f"stopped at max_passes ({max_passes}) with classes short"
    if rows >= budget:
        return f"stopped at the budget (max_rows {budget}) with classes short"
    return "stopped: the budget left cannot make a row for the short classes"


def run_generate(config: GenerateConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Make (or finish) the dataset of ``config``, pass after pass; return its card."""
    job, store, passes = prepare(config, overwrite)
    manifest = BundleManifest.read(Path(config.bundle))
    classes = list(manifest.classes)
    wanted = accepted_targets(config, manifest.classes)
    budget = row_budget(config, wanted, passes[0].count)
    from tqdm import tqdm
    with start_run(config.tracking, "generate") as run, \
            tqdm(unit="img", disable=not progress, desc="generate", dynamic_ncols=True) as bar:
        run.log_params({"config": config.model_dump(mode="json")})
        began = time.perf_counter()
        made = 0
        jobs = [pass_job(job, step) for step in passes]
        known = {record["file"]: record for record in store.records([j.plan for j in jobs])}
        done = 0
        while done < len(jobs):
            for pass_job_ in jobs[done:]:
                plan = pass_job_.plan
                bar.total = sum(j.plan.count for j in jobs)
                todo = sorted(set(range(plan.num_shards)) - store.committed(plan))
                bar.update(plan.count - sum(plan.rows(k)[1] - plan.rows(k)[0] for k in todo))
                if todo:
                    ensure_ray(config.ray)
                    for record in run_shards(pass_job_, todo):
                        known[record["file"]] = record
                        made += record["stop"] - record["start"]
                        bar.update(record["stop"] - record["start"])
                missing = sorted(set(range(plan.num_shards)) - store.committed(plan))
                if missing:
                    raise RuntimeError(f"{len(missing)} shard(s) of pass {plan.pass_index} were not committed "
                                       f"({missing[:10]}); run the same command again to make only those")
            done = len(jobs)
            if wanted is None or len(passes) >= config.max_passes:
                break
            total = total_statistics([r["statistics"] for r in known.values()], classes)
            step = plan_top_up(passes, wanted, dict(zip(classes, total["target"].tolist())),
                               dict(zip(classes, total["accepted_by_label"].tolist())), budget - total["rows"],
                               shard_size(config, manifest.resolution))
            if step is None:
                break
            passes.append(step)
            write_passes(store, passes)  # recorded before its first shard: a rerun makes the same rows
            jobs.append(pass_job(job, step))
        finishing = time.perf_counter()
        records = [known[f"data/{j.plan.file_name(k)}"] for j in jobs for k in range(j.plan.num_shards)]
        store.write_index(records)
        targets = None
        if wanted is not None:
            total = total_statistics([r["statistics"] for r in records], classes)
            accepted = dict(zip(classes, total["accepted_by_label"].tolist()))
            missing = shortfall(wanted, accepted)
            targets = {"wanted": wanted, "accepted": {c: accepted[c] for c in wanted}, "short": missing,
                       "budget": budget, "max_passes": config.max_passes,
                       "stopped": _stop_reason(passes, missing, int(total["rows"]), budget, config.max_passes)}
        card = build_card(config, job, passes, records, finishing - began, made, targets)
        store.fs.create_dir(store.path("report"), recursive=True)
        with tempfile.TemporaryDirectory() as scratch:
            for path in write_report(job, store, card, records, Path(scratch)):
                with store.fs.open_output_stream(store.path("report", path.name)) as stream:
                    stream.write(path.read_bytes())
                run.log_artifact(path, "report")
            # Index, statistics and report: what finishing costs, by shards not rows.
            card["timing"]["finish_seconds"] = round(time.perf_counter() - finishing, 3)
            store.write_json(CARD_NAME, card)  # last: a card means a finished dataset
            card_copy = Path(scratch) / CARD_NAME
            card_copy.write_text(json.dumps(card, indent=2))
            run.log_artifact(card_copy)
        run.log_metrics({"rows": card["rows"], "acceptance_rate": card["acceptance_rate"], "passes": len(passes),
                         "images_per_second": card["timing"]["images_per_second_this_run"] or 0.0})
        card["mlflow_run_id"] = run.run_id
        return card


def inspect_dataset(uri: str) -> tuple[dict | None, list[str]]:
    """The card (None if the run has not finished) and every integrity problem found; reads one
    shard at a time."""
    store = ShardStore(uri)
    problems: list[str] = []
    if not store.exists(CONFIG_NAME):
        raise SynferError("path", uri, f"a dataset directory made by `synfer generate` (no {CONFIG_NAME})")
    config = GenerateConfig.model_validate(store.read_json(CONFIG_NAME)["config"])
    card = store.read_json(CARD_NAME) if store.exists(CARD_NAME) else None
    # Datasets from before passes: one pass of ``count`` rows in shards of the configured size.
    passes = read_passes(store) or [Pass(0, 0, config.count or 0, config.rows_per_shard or 256)]
    plans = [pass_plan(step) for step in passes]
    names = store.data_files()
    seen = 0
    records = {record["file"]: record for record in store.records(plans)}
    for plan in plans:
        committed = store.committed(plan, names)
        if len(committed) < plan.num_shards:
            problems.append(f"pass {plan.pass_index}: {plan.num_shards - len(committed)} of {plan.num_shards} "
                            f"shards not committed yet")
        for k in sorted(committed):
            record = records[f"data/{plan.file_name(k)}"]
            with store.fs.open_input_stream(store.path("data", plan.file_name(k))) as stream:
                data = stream.read()
            if hashlib.sha256(data).hexdigest() != record["sha256"]:
                problems.append(f"{plan.file_name(k)}: sha256 differs from its record (file changed or torn)")
                continue
            ids = pq.read_table(pa.BufferReader(data), columns=["sample_id"]).column("sample_id").to_numpy()
            start, stop = plan.rows(k)
            if len(ids) != record["rows"] or len(np.unique(ids)) != len(ids) or \
                    (len(ids) and (ids.min() < start or ids.max() >= stop)):
                problems.append(f"{plan.file_name(k)}: sample_ids are not the unique rows {start}..{stop - 1}")
            seen += len(ids)
    if card is not None and card["rows"] != seen:
        problems.append(f"card says {card['rows']} rows, shards hold {seen}")
    return card, problems
