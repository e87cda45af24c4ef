"""The generate job: a validated config -> the Ray pipeline over missing shards -> card and report.

Everything that can be wrong with the inputs is checked in :func:`prepare` before Ray starts, and
nothing already written is touched unless the user asked for ``--overwrite``.
"""

from __future__ import annotations

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
from synfer_ray.bundle import BundleManifest, content_hash
from synfer_ray.config import GenerateConfig
from synfer_ray.data.manifest import ManifestSpec
from synfer_ray.data.shards import CARD_NAME, CONFIG_NAME, ShardPlan, ShardStore
from synfer_ray.errors import SynferError
from synfer_ray.generator.sampler import SamplerSettings
from synfer_ray.pipeline import GenerateJob, ensure_ray, run_shards
from synfer_ray.precision import resolve
from synfer_ray.tracking import start_run

# Settings that change the bytes of a row; anything else (pool sizes, Ray address, tracking)
# may change between a run and its resumption.
_IDENTITY_KEYS = ("count", "seed", "class_mix", "class_assignment", "aus", "sampling", "labeling", "rows_per_shard",
                  "precision")


def _check_classifier_dir(path: str, field: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise SynferError(field, path, "a directory holding a saved FER classifier (config.json + safetensors)")


def identity(config: GenerateConfig, bundle_hash: str) -> dict[str, Any]:
    dumped = config.model_dump(mode="json")
    return {"bundle_hash": bundle_hash, "generator.batch_size": config.generator.batch_size,
            **{key: dumped[key] for key in _IDENTITY_KEYS}}


def prepare(config: GenerateConfig, overwrite: bool = False) -> tuple[GenerateJob, ShardStore, list[int]]:
    """Validate every input and claim the output directory; return the job and the shards to make."""
    bundle_path = Path(config.bundle)
    manifest = BundleManifest.read(bundle_path)
    if content_hash(bundle_path, manifest.base_model) != manifest.content_hash:
        raise SynferError("bundle", config.bundle, "an intact bundle: its files no longer match "
                                                   "synfer_bundle.json's content hash; rebuild or re-copy it")
    weights = taxonomy.class_mix_weights(manifest.classes, config.class_mix)
    sampling = config.sampling
    settings = SamplerSettings.from_config(sampling)
    for pool in (config.generator, config.labeler):  # fp16 on a CPU pool is refused now, not in an actor
        if pool.num_gpus == 0:
            resolve(config.precision, "cpu", field="precision")
    if sampling.sg_classifier:
        _check_classifier_dir(sampling.sg_classifier, "sampling.sg_classifier")
    elif sampling.sg_scale > 0 and not (bundle_path / "sg_classifier").is_dir():
        raise SynferError("sampling.sg_scale", sampling.sg_scale,
                          "0, or a guiding classifier: sampling.sg_classifier or the bundle's sg_classifier/")
    for index, voter in enumerate(config.labeling.voters):
        _check_classifier_dir(voter.path, f"labeling.voters[{index}].path")
    spec = ManifestSpec(seed=config.seed, classes=manifest.classes, class_weights=tuple(float(w) for w in weights),
                        au_names=manifest.au_names, au_jitter=config.aus.jitter,
                        extra_au_probability=config.aus.extra_probability, extra_au_max=config.aus.extra_max,
                        class_assignment=config.class_assignment)
    plan = ShardPlan(config.count, config.rows_per_shard)
    store = ShardStore(config.output)
    store.check_writable()
    wanted = identity(config, manifest.content_hash)
    if store.exists(CONFIG_NAME):
        existing = store.read_json(CONFIG_NAME).get("identity", {})
        if existing != wanted:
            if not overwrite:
                differs = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
                raise SynferError("output", config.output,
                                  f"an empty directory or one made by this same config; it was made with "
                                  f"different {', '.join(differs)}. Use another output, or pass --overwrite "
                                  f"to delete it and start again")
            store.clear()
    elif store.exists("data") and store.committed(plan) and not overwrite:
        raise SynferError("output", config.output, f"a directory without foreign shards (data/ exists but no "
                                                   f"{CONFIG_NAME}); use another output or --overwrite")
    store.write_json(CONFIG_NAME, {"identity": wanted, "config": config.model_dump(mode="json")})
    todo = sorted(set(range(plan.num_shards)) - store.committed(plan))
    job = GenerateJob(bundle=str(bundle_path.resolve()), output=config.output, spec=spec, plan=plan,
                      settings=settings, sg_classifier=sampling.sg_classifier, labeling=config.labeling,
                      generator=config.generator, labeler=config.labeler, precision=config.precision)
    return job, store, todo


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


LABEL_COLUMNS = ["target", "label", "accepted", "confidence"]


def build_card(config: GenerateConfig, job: GenerateJob, store: ShardStore, table: pa.Table, wall_seconds: float,
               made_rows: int) -> dict[str, Any]:
    """The dataset card; ``table`` holds LABEL_COLUMNS of every committed row."""
    plan = job.plan
    target = np.asarray(table.column("target").to_pylist())
    label = np.asarray(table.column("label").to_pylist())
    accepted = table.column("accepted").to_numpy(zero_copy_only=False)
    confidence = table.column("confidence").to_numpy()
    classes = list(job.spec.classes)
    records = [store.shard_record(k) for k in range(plan.num_shards)]
    return {
        "format": "synfer-dataset/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "requested_rows": plan.count,
        "rows": int(table.num_rows),
        "shards": plan.num_shards,
        "classes": classes,
        "au_names": list(job.spec.au_names),
        "counts": {
            "target": {c: int((target == c).sum()) for c in classes},
            "label": {c: int((label == c).sum()) for c in classes},
            "accepted_by_label": {c: int(((label == c) & accepted).sum()) for c in classes},
        },
        "acceptance_rate": float(accepted.mean()) if len(accepted) else 0.0,
        "label_agrees_with_target": float((label == target).mean()) if len(label) else 0.0,
        "mean_confidence": {c: float(confidence[label == c].mean()) if (label == c).any() else None
                            for c in classes},
        "bundle": {"path": job.bundle, "content_hash": BundleManifest.read(Path(job.bundle)).content_hash},
        "config": config.model_dump(mode="json"),
        "timing": {"wall_seconds_this_run": round(wall_seconds, 2), "rows_made_this_run": made_rows,
                   "images_per_second_this_run": round(made_rows / wall_seconds, 3) if wall_seconds else None,
                   "shard_seconds_total": round(sum(r["seconds"] for r in records), 2)},
        "versions": _versions(),
        "shard_files": records,
    }


def write_report(job: GenerateJob, store: ShardStore, card: dict, labels: pa.Table, directory: Path) -> list[Path]:
    from synfer_ray.reports import confidence_histograms, contact_sheet
    classes = card["classes"]
    per_class: dict[str, list[bytes]] = {c: [] for c in classes}
    for k in sorted(store.committed(job.plan)):
        table = pq.read_table(store.path("data", job.plan.file_name(k)), filesystem=store.fs,
                              columns=["image", "target"])
        for image, target in zip(table.column("image").to_pylist(), table.column("target").to_pylist()):
            if len(per_class[target]) < 8:
                per_class[target].append(image)
        if all(len(v) >= 8 for v in per_class.values()):
            break
    return [
        contact_sheet(per_class, classes, directory / "contact_sheet.png"),
        confidence_histograms(labels.column("confidence").to_numpy(), labels.column("label").to_pylist(),
                              classes, directory / "confidence_histograms.png",
                              tau=job.labeling.tau),
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
    return "\n".join(lines)


def run_generate(config: GenerateConfig, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Make (or finish) the dataset of ``config``; return its card."""
    job, store, todo = prepare(config, overwrite)
    plan = job.plan
    with start_run(config.tracking, "generate") as run:
        run.log_params({"config": config.model_dump(mode="json")})
        began = time.perf_counter()
        made = 0
        if todo:
            ensure_ray(config.ray)
            from tqdm import tqdm
            done_rows = plan.count - sum(plan.rows(k)[1] - plan.rows(k)[0] for k in todo)
            with tqdm(total=plan.count, initial=done_rows, unit="img", disable=not progress,
                      desc="generate", dynamic_ncols=True) as bar:
                for record in run_shards(job, todo):
                    start, stop = plan.rows(int(record["shard"]))
                    made += stop - start
                    bar.update(stop - start)
        missing = sorted(set(range(plan.num_shards)) - store.committed(plan))
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) were not committed ({missing[:10]}); "
                               f"run the same command again to make only those")
        labels = store.read_table(plan, columns=LABEL_COLUMNS)
        card = build_card(config, job, store, labels, time.perf_counter() - began, made)
        store.write_json(CARD_NAME, card)
        store.fs.create_dir(store.path("report"), recursive=True)
        with tempfile.TemporaryDirectory() as scratch:
            for path in write_report(job, store, card, labels, Path(scratch)):
                with store.fs.open_output_stream(store.path("report", path.name)) as stream:
                    stream.write(path.read_bytes())
                run.log_artifact(path, "report")
            card_copy = Path(scratch) / CARD_NAME
            card_copy.write_text(json.dumps(card, indent=2))
            run.log_artifact(card_copy)
        run.log_metrics({"rows": card["rows"], "acceptance_rate": card["acceptance_rate"],
                         "images_per_second": card["timing"]["images_per_second_this_run"] or 0.0})
        card["mlflow_run_id"] = run.run_id
        return card


def inspect_dataset(uri: str) -> tuple[dict | None, list[str]]:
    """The card (None if the run has not finished) and every integrity problem found."""
    store = ShardStore(uri)
    problems: list[str] = []
    if not store.exists(CONFIG_NAME):
        raise SynferError("path", uri, f"a dataset directory made by `synfer generate` (no {CONFIG_NAME})")
    config = GenerateConfig.model_validate(store.read_json(CONFIG_NAME)["config"])
    plan = ShardPlan(config.count, config.rows_per_shard)
    card = store.read_json(CARD_NAME) if store.exists(CARD_NAME) else None
    committed = store.committed(plan)
    if len(committed) < plan.num_shards:
        problems.append(f"{plan.num_shards - len(committed)} of {plan.num_shards} shards not committed yet")
    seen = 0
    for k in sorted(committed):
        record = store.shard_record(k)
        with store.fs.open_input_stream(store.path("data", plan.file_name(k))) as stream:
            data = stream.read()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            problems.append(f"{plan.file_name(k)}: sha256 differs from its record (file changed or torn)")
            continue
        ids = pq.read_table(pa.BufferReader(data), columns=["sample_id"]).column("sample_id").to_numpy()
        start, stop = plan.rows(k)
        if len(ids) != record["rows"] or len(set(ids.tolist())) != len(ids) or \
                (len(ids) and (ids.min() < start or ids.max() >= stop)):
            problems.append(f"{plan.file_name(k)}: sample_ids are not the unique rows {start}..{stop - 1}")
        seen += len(ids)
    if card is not None and card["rows"] != seen:
        problems.append(f"card says {card['rows']} rows, shards hold {seen}")
    return card, problems

