"""The pure parts of training and evaluation: losses, schedule, metrics, decoding, label checks."""

import collections
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from synfer_ray import taxonomy
from synfer_ray.data.faces import augment, check_labels, decode_faces, resolve_source
from synfer_ray.errors import SynferError
from synfer_ray.evaluate import confusion_matrix, metrics_from_confusion
from synfer_ray.train.losses import soft_cross_entropy, warmup_cosine


def test_soft_cross_entropy_matches_torch_on_hard_labels_and_masks_invalid_rows():
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 6, 1, 2, 5])
    one_hot = torch.eye(7)[labels]
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, one_hot, 0.1), expected, atol=1e-6)
    valid = torch.tensor([True, True, True, False, False, False])
    assert torch.allclose(soft_cross_entropy(logits, one_hot, 0.0, valid=valid),
                          torch.nn.functional.cross_entropy(logits[:3], labels[:3]), atol=1e-6)
    assert soft_cross_entropy(logits, one_hot, valid=torch.zeros(6, dtype=torch.bool)) == 0


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=0.01) and factor(100) == pytest.approx(0.0, abs=1e-9)


def test_metrics_from_a_hand_made_confusion_matrix():
    truth = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    report = metrics_from_confusion(confusion_matrix(truth, predicted, 3), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(6 / 8)
    assert report["uar"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    f1_a = 2 * (3 / 4) * (3 / 4) / (3 / 2)
    f1_b = 2 * 0.5 * 0.5 / 1.0
    assert report["macro_f1"] == pytest.approx((f1_a + f1_b + 1) / 3)
    assert report["per_class"]["b"]["support"] == 2


def test_corrupt_images_are_flagged_not_raised():
    table = pa.table({"image": [b"junk", pa.array([b""]).to_pylist()[0]], "label": ["happy", "sad"]})
    decoded = decode_faces(table.to_pydict(), taxonomy.AFFECTNET_7, 48, soft=False, synthetic=False)
    assert not decoded["valid"].any() and decoded["pixels"].shape == (2, 48, 48, 3)


def test_decode_maps_aliases_and_augment_keeps_shapes(separable_parquet):
    batch = pq.read_table(separable_parquet["train"]).slice(0, 50).to_pydict()
    decoded = decode_faces(batch, taxonomy.AFFECTNET_7, 48, soft=False, synthetic=False)
    assert decoded["valid"].all()
    assert decoded["target"][0].argmax() == taxonomy.AFFECTNET_7.index("neutral")
    augmented = augment(decoded, crop_padding=4, flip=True, color_jitter=0.2, seed=0)
    assert augmented["pixels"].shape == decoded["pixels"].shape
    assert not np.array_equal(augmented["pixels"], decoded["pixels"])


def test_label_checks_name_the_problem(tmp_path, separable_parquet):
    source = resolve_source(str(separable_parquet["train"]), "data.train[0].path")
    counts = check_labels(source, taxonomy.AFFECTNET_7, "data.train[0].path")
    assert counts["anger"] == 40 and counts["happy"] == 45
    pq.write_table(pa.table({"image": [b"x"], "label": ["bored"]}), tmp_path / "bad.parquet")
    with pytest.raises(SynferError, match="label column.*'bored'"):
        check_labels(resolve_source(str(tmp_path / "bad.parquet"), "f"), taxonomy.AFFECTNET_7, "f")
    pq.write_table(pa.table({"pixels": [b"x"], "label": ["happy"]}), tmp_path / "cols.parquet")
    with pytest.raises(SynferError, match=r"missing \['image'\]"):
        check_labels(resolve_source(str(tmp_path / "cols.parquet"), "f"), taxonomy.AFFECTNET_7, "f")
    with pytest.raises(SynferError, match="^f: .*existing"):
        resolve_source(str(tmp_path / "absent"), "f")


def test_class_balanced_sampling_evens_out_an_imbalanced_set():
    from synfer_ray.data.faces import balance_classes
    counts = np.array([800, 150, 50])
    labels = np.repeat(np.arange(3), counts)
    batch = {"target": np.eye(3, dtype=np.float32)[labels], "row": np.arange(len(labels))}
    repeats = counts.sum() / (3 * counts)
    out = balance_classes(batch, repeats, seed=0)
    seen = np.bincount(out["target"].argmax(axis=1), minlength=3)
    assert np.all(np.abs(seen - counts.sum() / 3) < 0.12 * counts.sum() / 3)  # equal shares (sampling noise)
    assert abs(len(out["row"]) - counts.sum()) < 0.05 * counts.sum()  # an epoch of the same length
    assert set(out["row"][out["target"].argmax(axis=1) == 2]) == set(np.flatnonzero(labels == 2))  # every rare row used


def test_parts_are_disjoint_cover_everything_and_keep_duplicates_together():
    from synfer_ray.data.faces import in_part
    images = [bytes([i % 251, i // 251]) for i in range(2000)] + [b"same"] * 3
    first, second = in_part(images, "1/2"), in_part(images, "2/2")
    assert not np.any(first & second) and np.all(first | second)
    assert 0.45 < first.mean() < 0.55
    assert len(set(first[-3:])) == 1  # identical images fall in the same part
    assert np.all(in_part(images, None))


def test_mixing_ratio_draws_rows_per_row_of_the_first_source_and_names_impossible_ratios(separable_parquet):
    from synfer_ray.config import TrainConfig, build_config
    from synfer_ray.train.fer import prepare_data

    def config(*sources):
        return build_config(TrainConfig, {"output": "unused", "data": {"train": list(sources)}})

    real = {"path": str(separable_parquet["train"]), "limit": 100}
    prepared = prepare_data(config(real, {"path": str(separable_parquet["test"]), "ratio": 0.5}),
                            taxonomy.AFFECTNET_7)
    # Rows are kept by a hash of their ids: 100 of the source's rows, 50 of the other's 70.
    rows = pq.ParquetFile(separable_parquet["train"]).metadata.num_rows
    assert [selection.keep for _, _, selection in prepared.train_sources] == pytest.approx([100 / rows, 50 / 70])
    assert [selection.split for _, _, selection in prepared.train_sources] == ["train", None]
    assert prepared.train_rows == int(100 * 0.9 + 50)  # validation comes from data.train[0] only
    assert sum(prepared.class_counts.values()) == pytest.approx(140)
    with pytest.raises(SynferError, match=r"^data\.train\[1\]\.ratio: .*at most 0\.7: this source has 70 rows"):
        prepare_data(config(real, {"path": str(separable_parquet["test"]), "ratio": 2}), taxonomy.AFFECTNET_7)
    with pytest.raises(ValueError, match="data.train\\[0\\] is what the other sources' ratio counts against"):
        config({"path": "a", "ratio": 1})
    with pytest.raises(ValueError, match="either limit .* or ratio"):
        config(real, {"path": "b", "ratio": 1, "limit": 5})


def test_row_selection_is_a_pure_function_of_each_rows_id():
    from synfer_ray.data.faces import RowSelection
    images = np.array([f"face-{i}".encode() for i in range(20_000)], dtype=object)
    batch = {"image": images, "accepted": np.arange(20_000) % 4 != 0}
    train = RowSelection(split="train", val_fraction=0.1, seed=3).mask(batch)
    validation = RowSelection(split="validation", val_fraction=0.1, seed=3).mask(batch)
    assert not np.any(train & validation) and np.all(train | validation)
    assert validation.mean() == pytest.approx(0.1, abs=0.01)
    kept = RowSelection(keep=0.25, seed=3).mask(batch)
    assert kept.mean() == pytest.approx(0.25, abs=0.01)
    # The same rows in any order, in any batch: a row's fate is its own.
    order = np.random.default_rng(0).permutation(20_000)
    assert np.array_equal(RowSelection(keep=0.25, seed=3).mask({"image": images[order]}), kept[order])
    assert not np.array_equal(RowSelection(keep=0.25, seed=4).mask(batch), kept)  # the seed matters
    accepted = RowSelection(accepted_only=True, part="1/2").mask(batch)
    assert np.all(batch["accepted"][accepted]) and accepted.mean() == pytest.approx(0.75 / 2, abs=0.02)


def test_class_counts_of_a_synfer_dataset_count_accepted_rows_only(tmp_path):
    """What balancing and ratios see: rejected rows are not training rows."""
    (tmp_path / "data").mkdir()
    (tmp_path / "dataset.json").write_text("{}")
    labels = ["happy"] * 6 + ["sad"] * 4
    accepted = [True, False, False, False, True, True, True, False, False, False]
    pq.write_table(pa.table({"image": [b"x%d" % i for i in range(10)], "label": labels, "accepted": accepted,
                             "soft_label": [[0.0] * 7] * 10}), tmp_path / "data" / "shard-00000-of-00001.parquet")
    source = resolve_source(str(tmp_path), "data.train[1].path")
    assert source.synthetic
    assert check_labels(source, taxonomy.AFFECTNET_7, "f") == {"happy": 3, "sad": 1}
    assert check_labels(source, taxonomy.AFFECTNET_7, "f", accepted_only=False) == {"happy": 6, "sad": 4}


def test_the_latent_scale_sample_spans_a_source_sorted_by_class(ray_cluster, tmp_path):
    """The generator's latent scale is measured on a sample chosen by row-id hash over the whole
    source (no shuffle of every row): from a class-sorted source it holds every class."""
    from conftest import separable_faces

    from synfer_ray.config import LabelledFacesConfig
    from synfer_ray.train.generator import read_faces
    path = tmp_path / "sorted.parquet"
    pq.write_table(separable_faces(300, seed=0), path, row_group_size=256)  # 2,100 rows, one class after another
    settings = LabelledFacesConfig(path=str(path), limit=140)
    labels = [row["label"] for row in read_faces(resolve_source(str(path), "data.path"), settings, 0).iter_rows()]
    assert 100 <= len(labels) <= 180
    counts = collections.Counter(labels)
    assert len(counts) == 7 and min(counts.values()) >= 8, counts


@pytest.mark.parametrize("shuffle", ["global", "blocks"])
def test_a_source_sorted_by_class_reaches_training_in_mixed_batches(ray_cluster, tmp_path, shuffle):
    """FER-2013's train.parquet (and any folder import) is written class by class, in a few row
    groups. A model fed such rows in class runs learns the last class it saw (it did: 11.6% on
    FER-2013 test, every face called surprise), so training rows are shuffled globally by default."""
    from conftest import separable_faces

    from synfer_ray.config import TrainConfig, build_config
    from synfer_ray.train.fer import build_datasets, prepare_data
    path = tmp_path / "sorted.parquet"
    pq.write_table(separable_faces(300, seed=0), path, row_group_size=256)  # 2,100 rows, one class after another
    config = build_config(TrainConfig, {"output": "unused", "data": {"train": [{"path": str(path)}],
                                                                     "shuffle": shuffle},
                                        "optim": {"batch_size": 64}})
    train, _ = build_datasets(config, prepare_data(config, taxonomy.AFFECTNET_7), taxonomy.AFFECTNET_7)
    # As a training worker reads its shard (fer.py's loop: a local buffer of 4 batches).
    classes_per_batch = [len(np.unique(batch["target"].argmax(dim=1).numpy())) for batch in train.iter_torch_batches(
        batch_size=64, local_shuffle_buffer_size=4 * 64, local_shuffle_seed=0, drop_last=True)]
    assert len(classes_per_batch) >= 25
    if shuffle == "global":  # 64 rows drawn from 7 even classes: all 7 in nearly every batch
        assert np.mean(classes_per_batch) > 6.5, classes_per_batch
    else:  # block order only: a batch holds the few classes of the rows the buffer spans (here 4-5)
        assert np.mean(classes_per_batch) < 5.5, classes_per_batch


def test_decoded_rows_are_kept_in_the_object_store_when_they_fit_it():
    from synfer_ray.config import TrainConfig, build_config
    from synfer_ray.train.fer import PreparedData, cache_decoded_rows

    def decide(rows: int, image_size: int, cache: str = "auto", store: float = 2 * 2**30) -> bool:
        config = build_config(TrainConfig, {"output": "unused", "data": {"train": [{"path": "x"}], "cache": cache,
                                                                         "image_size": image_size}})
        prepared = PreparedData([], None, None, train_rows=int(rows * 0.9), class_counts={},
                                validation_rows=int(rows * 0.1))
        return cache_decoded_rows(config, prepared, 7, store)
    assert decide(28_709, 48)  # FER-2013: 0.2 GB of a 2 GiB object store
    assert not decide(1_000_000, 512)  # an SD-scale synthetic set streams
    assert not decide(300, 48, cache="never") and decide(1_000_000, 512, cache="always")
    assert not decide(28_709, 48, store=0.5 * 2**30)  # more than a quarter of a small store


@pytest.mark.parametrize("balanced", [False, True])
def test_cached_training_rows_are_the_same_every_epoch_and_resampled_ones_are_not(ray_cluster, tmp_path,
                                                                                    balanced):
    """With the decoded rows kept (data.cache), an epoch reads the same rows in the same seeded order
    as before; class-balanced sampling still draws new copies every epoch."""
    import hashlib

    from ray.data.dataset import MaterializedDataset

    from conftest import separable_faces

    from synfer_ray.config import TrainConfig, build_config
    from synfer_ray.train.fer import build_datasets, prepare_data
    table = separable_faces(20, seed=0)
    pq.write_table(table.slice(0, 100), tmp_path / "uneven.parquet")  # classes sorted: the last ones short
    config = build_config(TrainConfig, {"output": "unused", "data": {
        "train": [{"path": str(tmp_path / "uneven.parquet")}], "class_balanced_sampling": balanced,
        "augment": {"crop_padding": 0, "flip": False, "color_jitter": 0.0}}})
    train, validation = build_datasets(config, prepare_data(config, taxonomy.AFFECTNET_7), taxonomy.AFFECTNET_7)
    assert isinstance(validation, MaterializedDataset)

    def epoch() -> list[str]:
        return [hashlib.sha1(pixels.tobytes()).hexdigest() for batch in train.iter_batches(batch_size=32)
                for pixels in batch["pixels"]]
    first, second = epoch(), epoch()
    if balanced:
        assert sorted(first) != sorted(second)  # resampled: other copies of the short classes
    else:
        assert first == second and len(first) == len(set(first)) > 80
    streamed = config.model_copy(update={"data": config.data.model_copy(update={"cache": "never"})})
    _, validation = build_datasets(streamed, prepare_data(streamed, taxonomy.AFFECTNET_7), taxonomy.AFFECTNET_7)
    assert not isinstance(validation, MaterializedDataset)


def test_the_vote_on_labelled_faces_is_the_mean_of_its_models_probabilities(tiny_bundle_path, second_voter,
                                                                              separable_parquet):
    """evaluate_ensemble scores a generate run's labeler vote on real faces: one model is its own
    report; two vote by the mean of their probabilities; tau decides which rows the vote accepts."""
    import math

    from synfer_ray.classifiers import predict_probabilities
    from synfer_ray.models import load_classifier
    from synfer_ray.evaluate import evaluate_ensemble, evaluate_model
    models, test = [tiny_bundle_path / "sg_classifier", second_voter], str(separable_parquet["test"])
    alone = evaluate_model(models[0], test)
    assert evaluate_ensemble(models[:1], test)["confusion_matrix"] == alone["confusion_matrix"]
    table = pq.read_table(test)
    decoded = decode_faces({"image": table["image"].to_pylist(), "label": table["label"].to_pylist()},
                           taxonomy.AFFECTNET_7, 48, soft=False, synthetic=False)
    mean = np.mean([predict_probabilities(load_classifier(m), decoded["pixels"]) for m in models], axis=0)
    truth = decoded["target"].argmax(axis=1)
    by_hand = confusion_matrix(truth, mean.argmax(axis=1), len(taxonomy.AFFECTNET_7))
    every = evaluate_ensemble(models, test, tau=0.0)
    assert every["confusion_matrix"] == by_hand.tolist()
    assert every["acceptance"] == 1.0 and every["accepted_accuracy"] == pytest.approx(every["accuracy"])
    half = evaluate_ensemble(models, test, tau=0.5)
    confident = mean.max(axis=1) >= 0.5
    assert half["acceptance"] == pytest.approx(confident.mean())
    if confident.any():
        assert half["accepted_accuracy"] == pytest.approx((mean.argmax(axis=1) == truth)[confident].mean())
    none = evaluate_ensemble(models, test, tau=1.0)
    assert none["acceptance"] == 0.0 and math.isnan(none["accepted_accuracy"])
    # labeling.mirror_average: each model reads a face and its mirror image; the vote is the mean of all.
    mirrored = np.mean([predict_probabilities(load_classifier(m), pixels) for m in models
                        for pixels in (decoded["pixels"], decoded["pixels"][:, :, ::-1].copy())], axis=0)
    averaged = evaluate_ensemble(models, test, tau=0.0, mirror_average=True)
    assert averaged["confusion_matrix"] == confusion_matrix(truth, mirrored.argmax(axis=1),
                                                            len(taxonomy.AFFECTNET_7)).tolist()
    assert averaged["mirror_average"] and not every["mirror_average"]
    # Several votes in one pass over the faces (the study's vote stage): each as if evaluated alone.
    from synfer_ray.evaluate import evaluate_votes
    together = evaluate_votes({"first": (models[:1], None), "both": (models, [3.0, 1.0])}, test, tau=0.5,
                              mirror_readings=(False, True))
    assert list(together) == [("first", False), ("both", False), ("first", True), ("both", True)]
    for (name, mirror), report in together.items():
        members, weights = {"first": (models[:1], None), "both": (models, [3.0, 1.0])}[name]
        alone = evaluate_ensemble(members, test, weights, tau=0.5, mirror_average=mirror)
        assert (report["confusion_matrix"], report["acceptance"]) == (alone["confusion_matrix"], alone["acceptance"])


def test_mirror_averaged_probabilities_are_the_mean_over_a_face_and_its_mirror(tiny_bundle_path):
    from synfer_ray.classifiers import predict_probabilities
    from synfer_ray.models import load_classifier
    from synfer_ray.labeler.ensemble import PseudoLabeler, load_voters
    from synfer_ray.config import VoterConfig
    model = load_classifier(tiny_bundle_path / "sg_classifier")
    faces = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    plain, flipped = predict_probabilities(model, faces), predict_probabilities(model, faces[:, :, ::-1].copy())
    assert not np.allclose(plain, flipped, atol=1e-4)  # the model reads these faces' mirrors otherwise
    averaged = predict_probabilities(model, faces, batch_size=2, mirror_average=True)
    np.testing.assert_allclose(averaged, (plain + flipped) / 2, atol=1e-6)
    symmetric = np.concatenate([faces[:, :, :24], faces[:, :, :24][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(predict_probabilities(model, symmetric, mirror_average=True),
                               predict_probabilities(model, symmetric), atol=1e-6)
    voters = load_voters([VoterConfig(path=str(tiny_bundle_path / "sg_classifier"))])
    votes = PseudoLabeler(voters, model.classes, mirror_average=True).probabilities(faces)
    np.testing.assert_allclose(votes[0], (plain + flipped) / 2, atol=1e-6)


@pytest.mark.parametrize("arch", ["small_cnn", "small_convnext", "feranno"])
def test_classifiers_train_on_deepspeeds_half_weights_beside_fp32_buffers(arch, tiny_bundle_path):
    """DeepSpeed >= 0.19's bf16/fp16 casts a model's parameters and, unless its config names a
    buffer dtype, keeps its buffers (batch-norm statistics, normalisation constants, FERAnno's text
    context) in fp32: the H200 check failed `synfer train` and `synfer study` in fp16 on this. With
    the config `synfer train` gives DeepSpeed, cast by DeepSpeed's own code, a half batch trains."""
    from types import SimpleNamespace

    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.engine import DeepSpeedEngine

    from synfer_ray.models import build_classifier
    from synfer_ray.train.fer import TrainJob, _deepspeed_config
    job = SimpleNamespace(**{field: None for field in TrainJob.__dataclass_fields__})
    job.precision = "bf16"
    buffer_dtype = DtypeEnum(_deepspeed_config(job)["data_types"]["buffer_dtype"]).value
    model = build_classifier(arch, taxonomy.AFFECTNET_7, 48, bundle=str(tiny_bundle_path),
                             labeler={"dim": 32, "heads": 2} if arch == "feranno" else None)
    DeepSpeedEngine._cast_module_mixed_precision(SimpleNamespace(module=model), torch.bfloat16, buffer_dtype,
                                                 False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model.train()(torch.rand(4, 3, 48, 48).to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and logits.shape == (4, 7)
    soft_cross_entropy(logits.float(), torch.eye(7)[:4]).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in trained)


_DEEPSPEED_START = """
import sys, torch, deepspeed
from synfer_ray.train.fer import without_shared_memory_collectives
if sys.argv[1] == "fixed":
    without_shared_memory_collectives()
elif not deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"):
    sys.exit("no shm op here")  # no compiler: plain DeepSpeed has no op to build, so nothing to wait for
model = torch.nn.Linear(4, 2)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                  config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}})
print("started", engine.device)
"""


@pytest.mark.parametrize("variant", ["fixed", "plain"])
def test_a_lock_left_by_a_killed_worker_does_not_stop_the_next_deepspeed_start(tmp_path, variant):
    """A worker killed inside DeepSpeed's JIT load of its shared-memory op leaves a lock file in the
    torch extensions cache; the next run's workers waited on it forever (the netns cluster, after a
    lost node). ``train_loop`` keeps DeepSpeed from loading that op on CPU workers; plain DeepSpeed,
    the control, still waits (cut off after 30 s)."""
    import os
    import subprocess
    import sys
    from conftest import free_port
    from torch.utils.cpp_extension import _get_build_directory
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
        stale = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    (stale / "lock").touch()  # as a SIGKILL inside torch's FileBaton leaves it
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    try:
        result = subprocess.run([sys.executable, "-c", _DEEPSPEED_START, variant], env=env, capture_output=True,
                                text=True, timeout=30 if variant == "plain" else 300)
    except subprocess.TimeoutExpired:
        assert variant == "plain", "DeepSpeed waited on the stale lock"
        return
    if "no shm op here" in result.stderr:
        pytest.skip("DeepSpeed cannot build its shared-memory op on this machine: the control has nothing to wait on")
    assert variant == "fixed", "plain DeepSpeed no longer waits on the lock: without_shared_memory_collectives " \
                               "may be dropped"
    assert result.returncode == 0 and "started cpu" in result.stdout, result.stderr[-3000:]
