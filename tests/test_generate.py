"""The generate job end to end on a real local Ray cluster, and its refusals before any Ray work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import own_ray_worker_pids
from synfer_ray.generator.rows import PROVENANCE_COLUMNS
from synfer_ray.labeler.ensemble import LABEL_COLUMNS
from synfer_ray import generate as generate_module
from synfer_ray.config import GenerateConfig, build_config
from synfer_ray.data.shards import CONFIG_NAME, ShardPlan, ShardStore
from synfer_ray.errors import SynferError
from synfer_ray.generate import inspect_dataset, prepare, run_generate

COUNT, PER_SHARD = 40, 16  # three shards, the last one short


def raw_config(bundle: Path, output: Path, voters=()) -> dict:
    return {
        "bundle": str(bundle), "output": str(output), "count": COUNT, "seed": 3, "rows_per_shard": PER_SHARD,
        "sampling": {"steps": 4, "sg_scale": 2.0},
        "labeling": {"voters": [{"path": str(v)} for v in voters], "tau": 0.2},
        "generator": {"min_actors": 2, "max_actors": 2, "num_cpus": 1, "batch_size": 8, "torch_threads": 1},
        "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def voters(tiny_bundle_path, second_voter):
    return [tiny_bundle_path / "sg_classifier", second_voter]


@pytest.fixture(scope="module")
def first_run(ray_cluster, tiny_bundle_path, voters, tmp_path_factory):
    output = tmp_path_factory.mktemp("gen") / "first"
    raw = raw_config(tiny_bundle_path, output, voters)
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{output.parent / 'mlflow.db'}", "experiment": "t"}
    card = run_generate(build_config(GenerateConfig, raw), progress=False)
    return output, card


def images_by_id(output: Path) -> dict[int, bytes]:
    table = pq.read_table(output / "data", columns=["sample_id", "image"])
    return dict(zip(table.column("sample_id").to_pylist(), table.column("image").to_pylist()))


@pytest.mark.slow
def test_dataset_reads_back_with_every_provenance_column(first_run, ray_cluster):
    import ray
    output, card = first_run
    table = pq.read_table(output / "data")
    assert table.num_rows == COUNT and card["rows"] == COUNT
    assert sorted(table.column("sample_id").to_pylist()) == list(range(COUNT))
    # Exactly the columns the docs' format reference describes (synfer_ray/reference.py reads these).
    assert table.column_names == [*PROVENANCE_COLUMNS, *LABEL_COLUMNS]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"].startswith(b"\x89PNG") and len(row["aus"]) == len(row["au_names"]) == 12
    assert len(row["votes"]) == 2 and len(row["votes"][0]) == 7 and row["voters"][0] == "sg_classifier"
    assert abs(sum(row["soft_label"]) - 1) < 1e-5 and row["label"] in card["classes"]
    assert row["accepted"] == (row["confidence"] >= 0.2)
    assert sum(card["counts"]["target"].values()) == COUNT
    # Ray Data reads the same directory (the _-prefixed bookkeeping is skipped).
    assert ray.data.read_parquet(str(output / "data")).count() == COUNT
    assert (output / "report" / "contact_sheet.png").stat().st_size > 1000
    assert (output / "report" / "confidence_histograms.png").stat().st_size > 1000
    _, problems = inspect_dataset(str(output))
    assert problems == []


@pytest.mark.slow
def test_run_is_tracked_in_mlflow(first_run):
    from mlflow.tracking import MlflowClient
    output, card = first_run
    client = MlflowClient(tracking_uri=f"sqlite:///{output.parent / 'mlflow.db'}")
    run = client.get_run(card["mlflow_run_id"])
    assert run.data.metrics["rows"] == COUNT
    assert run.data.params["config.count"] == str(COUNT)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/contact_sheet.png", "report/confidence_histograms.png"} <= artifacts


def settled_commits(store: ShardStore, plan: ShardPlan, quiet_seconds: float = 2.0, limit: float = 30.0) -> set[int]:
    """The committed shards once no new commit has landed for ``quiet_seconds``: tasks a killed
    driver had already started may still finish while Ray reaps its workers."""
    deadline = time.monotonic() + limit
    seen, since = store.committed(plan), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_seconds:
        time.sleep(0.1)
        now = store.committed(plan)
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_gives_the_same_dataset(ray_cluster, tiny_bundle_path, voters, tmp_path):
    """A driver SIGKILLed after its first shard landed; the rerun makes only the rest, and every
    image is byte-identical to an uninterrupted run of the same config. Shards of two rows, so
    that on a fast machine the kill still lands long before the last of twenty shards."""
    def config_for(output: Path) -> dict:
        raw = raw_config(tiny_bundle_path, output, voters)
        raw["rows_per_shard"] = 2
        raw["generator"].update(min_actors=1, max_actors=1)
        return raw

    reference = tmp_path / "uninterrupted"
    run_generate(build_config(GenerateConfig, config_for(reference)), progress=False)
    output = tmp_path / "killed"
    config_path = tmp_path / "gen.yaml"
    config_path.write_text(yaml.safe_dump(config_for(output)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "synfer_ray.cli", "generate", "--config", str(config_path),
                               f"ray.address={ray_cluster}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plan = ShardPlan(COUNT, 2)
    store = ShardStore(str(output))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None and not store.committed(plan):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    survivors = settled_commits(store, plan)
    assert 0 < len(survivors) < plan.num_shards, "the kill should land mid-run"
    before = {k: (output / "data" / plan.file_name(k)).read_bytes() for k in survivors}

    card = run_generate(build_config(GenerateConfig, config_for(output)), progress=False)
    assert card["timing"]["rows_made_this_run"] == COUNT - sum(plan.rows(k)[1] - plan.rows(k)[0]
                                                                for k in survivors)
    for k, data in before.items():  # finished shards were not redone
        assert (output / "data" / plan.file_name(k)).read_bytes() == data
    assert images_by_id(output) == images_by_id(reference)
    assert not list((output / "data").glob(".*")) and inspect_dataset(str(output))[1] == []


@pytest.mark.slow
def test_generator_actor_killed_mid_run_loses_no_rows(first_run, ray_cluster, tiny_bundle_path, voters,
                                                      tmp_path):
    reference, _ = first_run
    output = tmp_path / "actor-killed"
    config = build_config(GenerateConfig, raw_config(tiny_bundle_path, output, voters))
    store, plan = ShardStore(str(output)), ShardPlan(COUNT, PER_SHARD)
    killed: list[int] = []
    earlier = set(own_ray_worker_pids("GenerateShard"))  # actors of earlier runs on this cluster may still be exiting

    def kill_one_generator_when_busy():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            pids = [pid for pid in own_ray_worker_pids("GenerateShard") if pid not in earlier]
            if pids and store.exists(CONFIG_NAME) and not store.committed(plan):
                time.sleep(3)  # let it load the bundle and start sampling
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                except ProcessLookupError:
                    earlier.add(pids[0])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_generator_when_busy, daemon=True)
    killer.start()
    card = run_generate(config, progress=False)
    killer.join(timeout=5)
    assert killed, "no generator actor was found to kill"
    assert card["rows"] == COUNT and len(store.committed(plan)) == plan.num_shards
    assert images_by_id(output) == images_by_id(reference)


def test_changed_config_is_refused_and_overwrite_replaces(first_run, tiny_bundle_path, voters, tmp_path):
    output = tmp_path / "claimed"
    prepare(build_config(GenerateConfig, raw_config(tiny_bundle_path, output, voters)))
    changed = raw_config(tiny_bundle_path, output, voters)
    changed["sampling"]["steps"] = 5
    with pytest.raises(SynferError, match=r"output: .*different sampling.*--overwrite"):
        prepare(build_config(GenerateConfig, changed))
    # Pool sizes may change between a run and its resumption.
    resized = raw_config(tiny_bundle_path, output, voters)
    resized["generator"]["max_actors"] = 4
    prepare(build_config(GenerateConfig, resized))
    prepare(build_config(GenerateConfig, changed), overwrite=True)


def test_dataset_begun_before_a_setting_existed_resumes_while_it_is_left_as_it_was(tiny_bundle_path, voters,
                                                                                     tmp_path):
    output = tmp_path / "older"
    raw = raw_config(tiny_bundle_path, output, voters)
    prepare(build_config(GenerateConfig, raw))
    # What an older version kept: an identity without sampling.sg_adaptive, sampling.sg_class_scales
    # and labeling.mirror_average.
    record = json.loads((output / CONFIG_NAME).read_text())
    del record["identity"]["sampling"]["sg_adaptive"], record["identity"]["labeling"]["mirror_average"]
    del record["identity"]["sampling"]["sg_class_scales"]
    (output / CONFIG_NAME).write_text(json.dumps(record))
    job, _, passes = prepare(build_config(GenerateConfig, raw))
    assert not job.settings.sg_adaptive and passes[0].count == COUNT
    (output / CONFIG_NAME).write_text(json.dumps(record))
    for setting in ({"sg_adaptive": True}, {"sg_class_scales": {"fear": 16.0}}):
        # Set, it changes the rows: the older dataset is not resumed.
        with pytest.raises(SynferError, match=r"output: .*different sampling"):
            prepare(build_config(GenerateConfig, {**raw, "sampling": {**raw["sampling"], **setting}}))


@pytest.mark.parametrize("change, field", [
    (lambda c: c.update(count=-5), "count"),
    (lambda c: c.update(class_mix={"happy": 0.5, "grumpy": 0.5}), "class_mix"),
    (lambda c: c.update(class_mix={"happy": 0.5, "sad": 0.4}), "class_mix"),
    (lambda c: c.update(bundle="/nonexistent/bundle"), "bundle"),
    (lambda c: c["sampling"].update(steps=0), "sampling.steps"),
    (lambda c: c["sampling"].update(sg_class_scales={"fear": -8}), "sampling.sg_class_scales"),
    (lambda c: c["sampling"].update(sg_class_scales={"grumpy": 8}), "sampling.sg_class_scales.grumpy"),
    (lambda c: c["labeling"].update(voters=[{"path": "/nonexistent/voter"}]), r"labeling.voters\[0\].path"),
    (lambda c: c.update(colour="blue"), "colour"),
])
def test_bad_configs_fail_before_any_ray_work(monkeypatch, tiny_bundle_path, tmp_path, change, field):
    monkeypatch.setattr(generate_module, "ensure_ray", lambda *_: pytest.fail("Ray was started"))
    raw = raw_config(tiny_bundle_path, tmp_path / "out", ())
    change(raw)
    with pytest.raises(SynferError, match=rf"^{field}: "):
        run_generate(build_config(GenerateConfig, raw), progress=False)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_named(monkeypatch, tiny_bundle_path, tmp_path):
    monkeypatch.setattr(generate_module, "ensure_ray", lambda *_: pytest.fail("Ray was started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    raw = raw_config(tiny_bundle_path, blocker / "dataset", ())
    with pytest.raises(SynferError, match="^output: .*can write"):
        run_generate(build_config(GenerateConfig, raw), progress=False)
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_inspect_finds_a_changed_shard(first_run, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from synfer_ray.cli import app
    output, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 0 and "all shards intact" in result.output
    victim = sorted((copy / "data").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 1 and "sha256 differs" in result.output


@pytest.mark.slow
def test_score_reads_generated_faces_by_an_evaluator_against_a_baseline(first_run, second_voter, tmp_path):
    from typer.testing import CliRunner

    from synfer_ray.classifiers import embed_images, predict_probabilities
    from synfer_ray.models import load_classifier
    from synfer_ray.cli import app
    from synfer_ray.evaluate import diversity_by_class
    from synfer_ray.images import decode_rgb
    import shutil
    output, card = first_run
    # The dataset and a copy, read as one, against the dataset as the baseline: every row counted
    # twice, the same shares, no change.
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    result = CliRunner().invoke(app, ["score", str(output), str(copy), "--evaluator", str(second_voter),
                                      "--baseline", str(output), "--out", str(tmp_path / "score")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "score" / "score.json").read_text())
    made, plain = scores["score"], scores["baseline"]
    assert made["rows"] == 2 * COUNT and plain["rows"] == COUNT
    # What the evaluator reads, computed here in memory from the same rows.
    table = pq.read_table(output / "data", columns=["image", "target"])
    images = np.stack([decode_rgb(data) for data in table.column("image").to_pylist()])
    targets = np.asarray(table.column("target").to_pylist())
    evaluator = load_classifier(second_voter)
    read = np.asarray(evaluator.classes)[predict_probabilities(evaluator, images).argmax(axis=1)]
    assert made["fer_accuracy"] == pytest.approx((read == targets).mean())
    by_class = diversity_by_class(embed_images(evaluator, images), targets)
    assert plain["diversity"] == pytest.approx(np.mean(list(by_class.values())), abs=1e-4)
    assert scores["against_baseline"]["agreement_points"] == pytest.approx(0)
    assert "against the baseline: +0.0 points read as asked" in result.output
    # Refused before any Ray work, naming the argument: real faces are not a generated set, and the
    # evaluator must load.
    bad = CliRunner().invoke(app, ["score", str(output), "--evaluator", str(second_voter),
                                   "--baseline", str(output / "data")])
    assert bad.exit_code != 0 and "--baseline" in bad.output and "dataset.json" in bad.output
    bad = CliRunner().invoke(app, ["score", str(output), str(output), "--evaluator", str(second_voter)])
    assert bad.exit_code != 0 and "datasets" in bad.output and "once" in bad.output
    bad = CliRunner().invoke(app, ["score", str(output), "--evaluator", str(tmp_path / "no-model")])
    assert bad.exit_code != 0 and "--evaluator" in bad.output
    # An evaluator that does not know a class it would be asked to read (here: no disgust).
    from synfer_ray.classifiers import tiny_resnet
    six_classes = [c for c in card["classes"] if c != "disgust"]
    tiny_resnet(six_classes, seed=11).save_pretrained(tmp_path / "six-classes")
    bad = CliRunner().invoke(app, ["score", str(output), "--evaluator", str(tmp_path / "six-classes")])
    assert bad.exit_code != 0 and "--evaluator" in bad.output and "disgust" in bad.output


# --- accepted-count targets: the shipped faces-48 bundle, whose classes its guide accepts at very
# different rates (happy and sad often, disgust almost never) -------------------------------------

FACES_48 = Path(__file__).resolve().parents[1] / "models" / "faces-48"


def targets_config(output: Path, **change) -> dict:
    return {
        "bundle": str(FACES_48), "output": str(output), "seed": 5, "rows_per_shard": 4, "count": 14,
        "accepted_per_class": {"happy": 4, "sad": 4, "surprise": 3}, "max_rows": 300,
        "sampling": {"steps": 4, "scheduler": "dpmpp_2m"},
        # The guide alone (not the bundle's FERAnno too): the rates this test was sized by.
        "labeling": {"voters": [{"path": str(FACES_48 / "sg_classifier"), "name": "guide"}], "tau": 0.3,
                     "bundle_labeler": False},
        "generator": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 8},
        "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
        "tracking": {"enabled": False}, **change,
    }


@pytest.fixture(scope="module")
def targets_run(ray_cluster, tmp_path_factory):
    output = tmp_path_factory.mktemp("targets") / "uninterrupted"
    card = run_generate(build_config(GenerateConfig, targets_config(output)), progress=False)
    return output, card


@pytest.mark.slow
def test_accepted_targets_are_reached_by_top_up_passes(targets_run):
    output, card = targets_run
    targets = card["accepted_targets"]
    print({p["index"]: (p["count"], p["quotas"]) for p in card["passes"]}, targets)
    assert len(card["passes"]) >= 2 and targets["short"] == {} and "reached" in targets["stopped"]
    for name, wanted in targets["wanted"].items():
        assert card["counts"]["accepted_by_label"][name] >= wanted
    rates = [r for r in card["acceptance_by_target"].values() if r is not None]
    assert max(rates) - min(rates) > 0.3  # the classes really do accept at different rates
    table = pq.read_table(output / "data", columns=["sample_id", "target", "accepted", "label"])
    assert sorted(table.column("sample_id").to_pylist()) == list(range(card["rows"]))
    top_up = card["passes"][1]
    ids = np.asarray(table.column("sample_id").to_pylist())
    targets_of = np.asarray(table.column("target").to_pylist())[(ids >= top_up["start"])
                                                               & (ids < top_up["start"] + top_up["count"])]
    assert set(targets_of) == {name for name, _ in top_up["quotas"]}  # top-ups ask only for short classes
    assert inspect_dataset(str(output))[1] == []


@pytest.mark.slow
def test_an_interrupted_top_up_pass_reruns_to_the_rows_of_an_uninterrupted_one(targets_run, ray_cluster, tmp_path):
    reference, card = targets_run
    output = tmp_path / "killed"
    config_path = tmp_path / "gen.yaml"
    config_path.write_text(yaml.safe_dump(targets_config(output)))
    driver = subprocess.Popen([sys.executable, "-m", "synfer_ray.cli", "generate", "--config", str(config_path),
                               f"ray.address={ray_cluster}"], env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not list((output / "data").glob("pass-01-*")):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    top_up_shards = len(list((output / "data").glob("pass-01-*")))
    assert top_up_shards >= 1 and not (output / "dataset.json").exists(), "the kill should land in pass 1"
    rerun = run_generate(build_config(GenerateConfig, targets_config(output)), progress=False)
    assert images_by_id(output) == images_by_id(reference)
    assert rerun["passes"] == card["passes"] and rerun["rows"] == card["rows"]
    assert rerun["timing"]["rows_made_this_run"] < card["rows"]


@pytest.mark.slow
def test_a_budget_stop_reports_the_shortfall_of_each_class(ray_cluster, tmp_path):
    from synfer_ray.generate import summary_table
    config = targets_config(tmp_path / "budget", accepted_per_class=3, max_rows=40, count=21)
    card = run_generate(build_config(GenerateConfig, config), progress=False)
    targets = card["accepted_targets"]
    assert card["rows"] <= 40 and "budget" in targets["stopped"]
    assert targets["short"]["disgust"] == 3 - card["counts"]["accepted_by_label"]["disgust"] > 0
    for name, short in targets["short"].items():
        assert short == 3 - targets["accepted"][name] > 0
        assert f"{name}: {targets['accepted'][name]} of 3 accepted, {short} short" in summary_table(card)


DRIVER = """
import json, resource, sys, yaml
from synfer_ray.config import GenerateConfig, build_config
from synfer_ray.generate import run_generate
card = run_generate(build_config(GenerateConfig, yaml.safe_load(open(sys.argv[1]))), progress=False)
print("RESULT", json.dumps({"rows": card["rows"], "shards": card["shards"],
                            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_twenty_thousand_rows_cost_the_driver_no_more_memory_than_two_thousand(ray_cluster, tmp_path):
    """The cheap generator (a tiny 16x16 bundle, 1 step, no CFG) through the real pipeline, default
    shard sizes; the driver holds per-shard records only, so 10x the rows is not 10x its memory."""
    from synfer_ray.bundle import make_tiny_bundle
    bundle = tmp_path / "tiny-16"
    make_tiny_bundle(bundle, resolution=16)

    def driver(rows: int) -> dict:
        config = {"bundle": str(bundle), "output": str(tmp_path / f"ds-{rows}"), "count": rows,
                  "sampling": {"steps": 1, "cfg_scale": 1.0},
                  "labeling": {"voters": [{"path": str(bundle / "sg_classifier")}], "tau": 0.3},
                  "generator": {"min_actors": 2, "max_actors": 2, "num_cpus": 1, "batch_size": 512},
                  "labeler": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5, "batch_size": 512},
                  "ray": {"address": ray_cluster}, "tracking": {"enabled": False}}
        path = tmp_path / f"gen-{rows}.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-c", DRIVER, str(path)], capture_output=True, text=True,
                              timeout=900, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.split("RESULT", 1)[1])

    small, large = driver(2_000), driver(20_000)
    print(f"driver peak RSS: 2,000 rows {small['rss_mb']:.0f} MB in {small['shards']} shards, "
          f"20,000 rows {large['rss_mb']:.0f} MB in {large['shards']} shards")
    assert small["rows"] == 2_000 and large["rows"] == 20_000
    assert large["rss_mb"] <= 1.15 * small["rss_mb"]
    card, problems = inspect_dataset(str(tmp_path / "ds-20000"))
    assert problems == [] and card["shards"] == large["shards"]


@pytest.mark.slow
def test_bf16_generation_with_labels_matches_fp32_within_rounding(ray_cluster, tiny_bundle_path, voters, tmp_path):
    """The same config in bf16 and fp32 through the whole pipeline (generator and labeler pools):
    every row labelled, the precision recorded, the images a few levels apart at most."""
    def run(precision: str):
        raw = raw_config(tiny_bundle_path, tmp_path / precision, voters)
        raw.update(count=16, rows_per_shard=8, precision=precision)
        run_generate(build_config(GenerateConfig, raw), progress=False)
        table = pq.read_table(tmp_path / precision / "data").sort_by("sample_id")
        assert table.column("precision").to_pylist() == [precision] * 16
        assert all(len(v) == 2 for v in table.column("votes").to_pylist())
        return table

    full, half = run("fp32"), run("bf16")
    from synfer_ray.images import decode_rgb
    difference = np.stack([np.abs(decode_rgb(a).astype(int) - decode_rgb(b).astype(int))
                           for a, b in zip(full.column("image").to_pylist(), half.column("image").to_pylist())])
    print(f"bf16 vs fp32 through generate: max pixel difference {difference.max()}/255, mean {difference.mean():.2f}")
    assert difference.mean() < 3 and difference.max() <= 64
    soft = np.abs(np.array(full.column("soft_label").to_pylist()) - np.array(half.column("soft_label").to_pylist()))
    assert soft.max() < 0.1  # the labelers, in bf16 too, see nearly the same faces


def test_a_local_cluster_reads_parquet_footers_with_as_many_actors_as_it_has_cpus(monkeypatch):
    import os

    from synfer_ray.pipeline import PARQUET_FOOTER_ACTORS, footer_readers_for
    monkeypatch.delenv(PARQUET_FOOTER_ACTORS, raising=False)
    footer_readers_for(2)
    assert os.environ[PARQUET_FOOTER_ACTORS] == "2"
    footer_readers_for(64)  # a value already set (by the user, or before) is kept
    assert os.environ[PARQUET_FOOTER_ACTORS] == "2"
    monkeypatch.delenv(PARQUET_FOOTER_ACTORS)
    footer_readers_for(64)
    assert os.environ[PARQUET_FOOTER_ACTORS] == "32"  # never more than Ray's own default
