import json
import shutil
import time

import pytest

from synfer_ray import taxonomy
from synfer_ray.bundle import MANIFEST_NAME, BundleManifest, content_hash, load_bundle, make_tiny_bundle
from synfer_ray.errors import SynferError

SD_LAYOUT = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
             "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
             "scheduler/scheduler_config.json", "au_adapter/config.json",
             "au_adapter/diffusion_pytorch_model.safetensors", MANIFEST_NAME]


def test_tiny_bundle_has_the_diffusers_layout_and_no_pickles(tiny_bundle_path):
    for relative in SD_LAYOUT:
        assert (tiny_bundle_path / relative).is_file(), relative
    suffixes = {p.suffix for p in tiny_bundle_path.rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def test_manifest_describes_the_bundle(tiny_bundle_path):
    manifest = BundleManifest.read(tiny_bundle_path)
    assert manifest.classes == taxonomy.AFFECTNET_7
    assert manifest.au_names == taxonomy.FINEFACE_12
    assert manifest.resolution == 48
    assert {"torch", "diffusers", "transformers", "synfer_ray"} <= set(manifest.versions)
    assert manifest.content_hash == content_hash(tiny_bundle_path)


def test_make_tiny_is_deterministic(tmp_path, tiny_bundle_path):
    manifest = make_tiny_bundle(tmp_path / "again", seed=0)
    assert manifest.content_hash == BundleManifest.read(tiny_bundle_path).content_hash
    assert make_tiny_bundle(tmp_path / "other", seed=1).content_hash != manifest.content_hash


def test_loads_fast_with_real_from_pretrained(tiny_bundle_path):
    start = time.perf_counter()
    bundle = load_bundle(tiny_bundle_path)
    assert time.perf_counter() - start < 10  # "a second or two"; generous for a loaded CI machine
    assert bundle.unet.config.sample_size * 4 == bundle.manifest.resolution
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert bundle.sg_classifier is not None and bundle.sg_classifier.classes == list(taxonomy.AFFECTNET_7)


def test_diffusers_pipeline_loads_the_bundle_unchanged(tiny_bundle_path):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_bundle_path, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_tokenizer_spells_vocabulary_words_whole(tiny_bundle):
    prompt = taxonomy.build_prompt(3, "happy")
    tokens = tiny_bundle.tokenizer.tokenize(prompt)
    assert len(tokens) == len(prompt.replace(",", " ,").replace("-", " - ").split())


def test_missing_bundle_is_named(tmp_path):
    with pytest.raises(SynferError, match=r"^bundle: .*nowhere.*existing directory"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynferError, match=rf"bundle: .*no {MANIFEST_NAME}"):
        load_bundle(tmp_path / "empty")


def test_corrupt_weights_are_caught_by_the_hash(tmp_path, tiny_bundle_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle_path, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SynferError, match="content hash.*corrupt"):
        load_bundle(copy)
    # Without the hash check the loader itself still names the broken component.
    with pytest.raises(SynferError, match=r"^bundle/unet"):
        load_bundle(copy, verify=False)


def test_bad_manifest_is_named(tmp_path, tiny_bundle_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle_path, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    del raw["au_names"]
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(SynferError, match=rf"bundle/{MANIFEST_NAME}.*au_names"):
        load_bundle(copy)


def test_fp16_export_halves_the_weights_loads_in_fp32_and_samples_alike(tiny_bundle_path, tmp_path):
    import numpy as np
    import torch

    from synfer_ray.bundle import export_bundle, load_bundle
    from synfer_ray.generator.sampler import GuidedSampler, SampleRequest, SamplerSettings
    manifest = export_bundle(tiny_bundle_path, tmp_path / "fp16", card="# tiny\n")
    size = lambda root: sum(f.stat().st_size for f in root.rglob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "fp16") < 0.6 * size(tiny_bundle_path)
    assert (tmp_path / "fp16" / "README.md").read_text() == "# tiny\n"
    half, full = load_bundle(tmp_path / "fp16"), load_bundle(tiny_bundle_path)  # the hash verifies
    assert half.content_hash == manifest.content_hash != full.content_hash
    assert half.unet.dtype == torch.float32 and half.sg_classifier.model.dtype == torch.float32
    request = [SampleRequest(seed=3, prompt="a happy smile", aus=[0.5] * 12)]
    settings = SamplerSettings(steps=4)
    a = GuidedSampler(half).generate(request, settings).astype(int)
    b = GuidedSampler(full).generate(request, settings).astype(int)
    assert np.abs(a - b).max() <= 8  # fp16 rounding of the weights only


def test_clip_sized_tokenizer_has_clips_size_special_ids_and_whole_prompt_words():
    from synfer_ray.bundle import _prompt_words, build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(_prompt_words(), vocab_size=49408)
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    prompt = taxonomy.build_prompt(3, "happy")
    assert len(tokenizer.tokenize(prompt)) == len(prompt.replace(",", " ,").replace("-", " - ").split())
    assert tokenizer("a happy smile").input_ids[0] == 49406 and tokenizer("a happy smile").input_ids[-1] == 49407
    assert len(tokenizer("a happy smile").input_ids) == 5
    assert build_tiny_tokenizer(_prompt_words(), vocab_size=49408, pad_token="!").pad_token_id == 0  # SD 2.x
    with pytest.raises(SynferError, match="vocab_size"):
        build_tiny_tokenizer(_prompt_words(), vocab_size=600)


def test_make_random_tiny_is_make_tiny_stored_in_fp16_by_default(tmp_path, tiny_bundle_path):
    import torch
    from safetensors.torch import load_file

    from synfer_ray.bundle import make_random_bundle
    same = make_random_bundle(tmp_path / "fp32", "tiny", dtype=torch.float32)
    assert same.content_hash == BundleManifest.read(tiny_bundle_path).content_hash
    half = make_random_bundle(tmp_path / "fp16", "tiny")
    weights = load_file(tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.safetensors")
    assert half.content_hash != same.content_hash and {t.dtype for t in weights.values()} == {torch.float16}
    load_bundle(tmp_path / "fp16")  # the hash verifies and the weights load into fp32


def test_a_new_bundle_version_keeps_the_other_files_and_hashes_alike_wherever_it_is_made(tiny_bundle_path, tmp_path):
    from synfer_ray.bundle import export_bundle, new_bundle_version
    export_bundle(tiny_bundle_path, tmp_path / "fp16")  # fp16 weights, as models/faces-48 ships them
    hashes = []
    for place in ("a", "b"):
        source, labeler = tmp_path / place / "source", tmp_path / place / "labeler"
        shutil.copytree(tmp_path / "fp16", source)
        labeler.mkdir()
        # what diffusers writes when it saves a component it loaded: the directory it came from
        (labeler / "config.json").write_text(json.dumps({"_name_or_path": str(labeler), "dim": 8}))
        manifest = new_bundle_version(source, tmp_path / place / "bundle", {"labeler": labeler}, {"job": "test"})
        hashes.append(manifest.content_hash)
        made = tmp_path / place / "bundle"
        adapter = "au_adapter/diffusion_pytorch_model.safetensors"
        assert (made / adapter).read_bytes() == (tmp_path / "fp16" / adapter).read_bytes()  # not re-saved as fp32
        assert all("_name_or_path" not in json.loads(f.read_text()) for f in made.glob("*/config.json"))
        assert json.loads((made / "labeler" / "config.json").read_text()) == {"dim": 8}
        load_bundle(made)  # the hash verifies
    assert hashes[0] == hashes[1]
