"""Model bundles: a diffusers Stable Diffusion directory plus the AU adapter and a manifest.

Layout (every component loads on its own with ``from_pretrained``)::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/   (diffusers SD layout)
    au_adapter/       config.json + diffusion_pytorch_model.safetensors
    sg_classifier/    optional FER classifier for semantic guidance on decoded images (transformers, safetensors)
    sg_latent_guide/  optional FER classifier for semantic guidance on latents (generator/latent_guide.py)
    synfer_bundle.json  classes, AU names, resolution, versions, content hash, base_model

``base_model`` lets a bundle hold only the adapter and name the SD weights elsewhere (a hub id
such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or a path): the loading code is the same.
Weights are read only as safetensors; nothing is unpickled. ``make_random_bundle`` writes SD 1.5's
or 2.1's exact architecture and configs with random weights (no download), so tests and benchmarks
run the real networks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

import synfer_ray
from synfer_ray import taxonomy
from synfer_ray.config import GeneratorArchitecture
from synfer_ray.classifiers import FERClassifier, tiny_resnet
from synfer_ray.errors import SynferError
from synfer_ray.generator.au_adapter import AUAdapter, install_au_adapter
from synfer_ray.generator.latent_guide import LATENT_GUIDE_DIR, LatentGuide, is_latent_guide, vae_sha256

MANIFEST_NAME = "synfer_bundle.json"
FORMAT_VERSION = 1
_HINT = "a bundle directory made by `synfer bundle make-random`, `make-tiny` or `init`"


@dataclass(frozen=True)
class BundleManifest:
    classes: tuple[str, ...]
    au_names: tuple[str, ...]
    resolution: int
    content_hash: str = ""
    base_model: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # How the weights were made: data set hash, config, figures (None for random or imported weights).
    training: dict | None = None

    @classmethod
    def read(cls, path: Path) -> "BundleManifest":
        manifest_path = path / MANIFEST_NAME
        if not path.is_dir():
            raise SynferError("bundle", str(path), f"an existing directory: {_HINT}")
        if not manifest_path.is_file():
            raise SynferError("bundle", str(path), f"{_HINT} (no {MANIFEST_NAME} there)")
        try:
            raw = json.loads(manifest_path.read_text())
            manifest = cls(classes=tuple(raw["classes"]), au_names=tuple(raw["au_names"]),
                           resolution=int(raw["resolution"]), content_hash=str(raw["content_hash"]),
                           base_model=raw.get("base_model"), versions=dict(raw.get("versions", {})),
                           format_version=int(raw.get("format_version", FORMAT_VERSION)),
                           training=raw.get("training"))
        except (ValueError, KeyError, TypeError) as error:
            raise SynferError(f"bundle/{MANIFEST_NAME}", str(manifest_path),
                              f"JSON with classes, au_names, resolution and content_hash ({error!r})") from error
        if manifest.format_version > FORMAT_VERSION:
            raise SynferError(f"bundle/{MANIFEST_NAME}.format_version", manifest.format_version,
                              f"<= {FORMAT_VERSION}; upgrade synfer-ray to read this bundle")
        return manifest

    @property
    def caption_style(self) -> str:
        """The prompts this bundle expects (taxonomy.CAPTION_STYLES): "expression" where it was
        trained on expression-only captions, else "attributes" (SD bases, older bundles)."""
        return (self.training or {}).get("captions") or "attributes"

    def write(self, path: Path) -> None:
        (path / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")


def content_hash(path: Path, base_model: str | None = None) -> str:
    """sha256 over every file's relative path and bytes (the manifest excluded) and the base model id."""
    digest = hashlib.sha256()
    digest.update(f"base_model={base_model}\n".encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A loaded bundle: the SD components, the AU adapter (installed in the UNet) and the manifest."""

    path: Path
    manifest: BundleManifest
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    au_adapter: AUAdapter
    sg_classifier: FERClassifier | None = None
    sg_latent_guide: LatentGuide | None = None

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def au_names(self) -> tuple[str, ...]:
        return self.manifest.au_names

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "Bundle":
        for module in (self.unet, self.vae, self.text_encoder, self.au_adapter, self.sg_classifier,
                       self.sg_latent_guide):
            if module is not None:
                module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"synfer_ray": synfer_ray.__version__, "torch": torch.__version__.split("+")[0],
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _load_component(loader, source: str, subfolder: str, method: str = "from_pretrained", **kwargs):
    try:
        return getattr(loader, method)(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as error:
        raise SynferError(f"bundle/{subfolder}", source,
                          f"{_HINT}, or a diffusers SD path or hub id with a loadable '{subfolder}' "
                          f"({type(error).__name__}: {str(error)[:300]})") from error


def load_latent_guide(path: str | Path, bundle_path: Path | None, field: str = "sg_latent_guide") -> LatentGuide:
    """A saved :class:`LatentGuide`, refused unless it was trained in the latent space of the VAE of
    ``bundle_path`` (None: a bundle whose VAE lives in its base model, not checked here)."""
    if not is_latent_guide(path):
        raise SynferError(field, str(path), "a latent guide directory (config.json naming LatentGuide + "
                                            "safetensors), as `synfer train` with model.arch latent-guide saves")
    guide = LatentGuide.from_pretrained(str(path), use_safetensors=True)
    trained_on = guide.config.vae_sha256
    if bundle_path is not None and trained_on and trained_on != vae_sha256(bundle_path):
        raise SynferError(field, str(path), f"a latent guide trained on the VAE of {bundle_path}; this one was "
                                            f"trained on another VAE ({guide.config.bundle or 'unnamed bundle'})")
    return guide


def load_bundle(path: str | Path, verify: bool = True, sg_classifier: str | Path | None = None,
                dtype: torch.dtype = torch.float32, sg_latent_guide: str | Path | None = None) -> Bundle:
    """Load a bundle for inference: every component frozen and in eval mode, adapter installed.

    ``verify`` recomputes the content hash so a changed or truncated file is caught here, not as
    odd images later. ``sg_classifier`` overrides the bundle's own guiding classifier: a transformers
    image classifier (a FERAnno labeler cannot guide: it reads images without gradients);
    ``sg_latent_guide`` overrides its latent guide (``sg_latent_guide/``), which must fit its VAE.
    """
    transformers_logging.disable_progress_bar()
    path = Path(path)
    manifest = BundleManifest.read(path)
    if verify and content_hash(path, manifest.base_model) != manifest.content_hash:
        raise SynferError("bundle", str(path), "files matching the content hash in "
                          f"{MANIFEST_NAME}: some file changed or is corrupt; rebuild or re-copy the bundle")
    source = manifest.base_model or str(path)
    unet = _load_component(UNet2DConditionModel, source, "unet", use_safetensors=True, torch_dtype=dtype)
    vae = _load_component(AutoencoderKL, source, "vae", use_safetensors=True, torch_dtype=dtype)
    text_encoder = _load_component(CLIPTextModel, source, "text_encoder", use_safetensors=True, dtype=dtype)
    tokenizer = _load_component(CLIPTokenizer, source, "tokenizer")
    scheduler = _load_component(DDIMScheduler, source, "scheduler")
    adapter = _load_component(AUAdapter, str(path), "au_adapter", use_safetensors=True, torch_dtype=dtype)
    if tuple(adapter.config.au_names) != manifest.au_names:
        raise SynferError("bundle/au_adapter/config.json.au_names", adapter.config.au_names,
                          f"the AU names of {MANIFEST_NAME}: {list(manifest.au_names)}")
    install_au_adapter(unet, adapter)
    classifier_path = Path(sg_classifier) if sg_classifier else path / "sg_classifier"
    classifier = None
    if sg_classifier or classifier_path.is_dir():
        classifier = FERClassifier.from_pretrained(classifier_path, field="sg_classifier")
    latent_guide_path = Path(sg_latent_guide) if sg_latent_guide else path / LATENT_GUIDE_DIR
    latent_guide = None
    if sg_latent_guide or latent_guide_path.is_dir():
        # A base_model bundle keeps no VAE of its own to check the guide against.
        latent_guide = load_latent_guide(latent_guide_path, path if (path / "vae").is_dir() else None)
    for module in (unet, vae, text_encoder, adapter, classifier, latent_guide):
        if module is not None:
            # Shipped bundles may hold fp16 weights; compute in ``dtype`` (fp32 on CPU).
            if next(module.parameters()).dtype != dtype:
                module.to(dtype)
            module.eval().requires_grad_(False)
    return Bundle(path, manifest, unet, vae, text_encoder, tokenizer, scheduler, adapter, classifier, latent_guide)


def save_bundle(path: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler: DDIMScheduler,
                au_adapter: AUAdapter, classes: Sequence[str], resolution: int,
                sg_classifier: FERClassifier | None = None, training: dict | None = None) -> BundleManifest:
    """Write every component and then the manifest, whose hash seals the directory."""
    # Imported here: the pipeline module drags in image processors that warn about torchvision.
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return _seal(path, au_adapter, classes, resolution, sg_classifier, base_model=None, training=training)


def _seal(path: Path, au_adapter: AUAdapter, classes: Sequence[str], resolution: int,
          sg_classifier: FERClassifier | None, base_model: str | None,
          training: dict | None = None) -> BundleManifest:
    au_adapter.save_pretrained(path / "au_adapter", safe_serialization=True)
    return _write_manifest(path, au_adapter.config.au_names, classes, resolution, sg_classifier, base_model, training)


def drop_load_paths(path: Path) -> None:
    """Remove ``_name_or_path`` from the components' configs: diffusers writes there the directory a
    component was loaded from (a training run's staging folder), which would make the content hash,
    and every cache keyed by it, depend on where the bundle was made rather than on what it holds.
    Loading sets the field anew."""
    for config_file in sorted(path.glob("*/config.json")):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_manifest(path: Path, au_names: Sequence[str], classes: Sequence[str], resolution: int,
                    sg_classifier: FERClassifier | None, base_model: str | None,
                    training: dict | None) -> BundleManifest:
    if sg_classifier is not None:
        sg_classifier.save_pretrained(path / "sg_classifier")
    drop_load_paths(path)
    manifest = BundleManifest(classes=tuple(classes), au_names=tuple(au_names),
                              resolution=resolution, base_model=base_model, versions=_versions(),
                              training=training, content_hash=content_hash(path, base_model))
    manifest.write(path)
    return manifest


def seal_bundle(path: str | Path, classes: Sequence[str], resolution: int,
                sg_classifier: FERClassifier | None = None, training: dict | None = None,
                base_model: str | None = None) -> BundleManifest:
    """Write the manifest of a directory that already holds its components and ``au_adapter/``.

    The adapter's files are left as they are: loading and saving it again would store fp16 weights
    as fp32 and write the staging directory into its config as ``_name_or_path``."""
    path = Path(path)
    adapter_config = _load_component(AUAdapter, str(path), "au_adapter", method="load_config")
    return _write_manifest(path, adapter_config["au_names"], classes, resolution, sg_classifier, base_model, training)


def export_bundle(source: str | Path, target: str | Path, dtype: torch.dtype = torch.float16,
                  card: str | None = None) -> BundleManifest:
    """A copy of ``source`` with every floating-point weight stored as ``dtype`` (fp16 halves the size
    of a shipped bundle) and an optional model card (``README.md``); same manifest, new content hash.
    Loading upcasts again (``load_bundle``)."""
    import shutil

    from safetensors.torch import load_file, save_file
    source, target = Path(source), Path(target)
    manifest = BundleManifest.read(source)
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged)
    for file in staged.rglob("*.safetensors"):
        from safetensors import safe_open
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata()
        tensors = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(file).items()}
        save_file(tensors, file, metadata=metadata)
    if card is not None:
        (staged / "README.md").write_text(card)
    drop_load_paths(staged)
    exported = BundleManifest(classes=manifest.classes, au_names=manifest.au_names, resolution=manifest.resolution,
                              base_model=manifest.base_model, versions=manifest.versions, training=manifest.training,
                              content_hash=content_hash(staged, manifest.base_model))
    exported.write(staged)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    return exported


def new_bundle_version(source: str | Path, target: str | Path, replace: dict[str, Path],
                       training_step: dict) -> BundleManifest:
    """Copy bundle ``source`` to ``target`` with some sub-folders replaced (``{"au_adapter": dir}``),
    its training record extended by ``training_step``, and a new content hash."""
    import shutil
    source, target = Path(source), Path(target)
    manifest = BundleManifest.read(source)
    staged = target.with_name(target.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns(MANIFEST_NAME, *replace))
    for name, directory in replace.items():
        shutil.copytree(directory, staged / name)
    training = dict(manifest.training or {})
    training["steps"] = list(training.get("steps", [])) + [{**training_step, "from": manifest.content_hash}]
    sealed = seal_bundle(staged, manifest.classes, manifest.resolution, training=training,
                         base_model=manifest.base_model)
    shutil.rmtree(target, ignore_errors=True)
    staged.rename(target)
    return sealed


def init_bundle(path: str | Path, base_model: str, classes: Sequence[str] = taxonomy.AFFECTNET_7,
                au_names: Sequence[str] = taxonomy.FINEFACE_12, n_tokens: int = 4,
                resolution: int | None = None) -> BundleManifest:
    """A bundle over existing SD weights (hub id or path) with a fresh, untrained AU adapter.

    A local base is recorded by its absolute path (Ray workers do not share the caller's working
    directory). ``resolution`` defaults to what the base generates: its UNet's sample size times
    the VAE's downsampling (512 for SD 1.5, 768 for SD 2.1).
    """
    if Path(base_model).is_dir():
        base_model = str(Path(base_model).resolve())
    unet = _load_component(UNet2DConditionModel, base_model, "unet", use_safetensors=True)
    if resolution is None:
        vae_config = _load_component(AutoencoderKL, base_model, "vae", method="load_config")
        resolution = unet.config.sample_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapter = AUAdapter.for_unet(unet, list(au_names), n_tokens=n_tokens)
    return _seal(path, adapter, classes, resolution, None, base_model=base_model)


# --- the tiny bundle -------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge every occurrence of the best-ranked pair until none applies."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_tiny_tokenizer(words: Sequence[str], vocab_size: int | None = None,
                         pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer made offline: all bytes, plus merges that spell each word as one token.

    Each word gets merges appended after the existing ones, so earlier words keep their single
    token (BPE always tries lower-ranked merges first). With ``vocab_size`` (CLIP's 49408), filler
    merges of two characters, ranked after every word's, pad the vocabulary to that size, so that
    ``<|startoftext|>`` and ``<|endoftext|>`` get real CLIP's ids (49406, 49407) and an SD text
    encoder's embedding table fits it exactly.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = list(ranks)
    base = list(_bytes_to_unicode().values())
    tokens = list(dict.fromkeys(base + [b + "</w>" for b in base] + ["".join(m) for m in merges]))
    if vocab_size is not None:
        known = set(tokens)
        needed = vocab_size - 2 - len(tokens)
        if needed < 0:
            raise SynferError("vocab_size", vocab_size, f">= {len(tokens) + 2} (bytes, words and the two specials)")
        fillers = ((first, second + end) for first in base for second in base for end in ("", "</w>"))
        for pair in fillers:
            if needed == 0:
                break
            token = "".join(pair)
            if token not in known:
                merges.append(pair)
                tokens.append(token)
                known.add(token)
                needed -= 1
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def _prompt_words() -> list[str]:
    text = " ".join([taxonomy.PROMPT_TEMPLATE, *taxonomy.AFFECTNET_8]
                    + [p for phrases in taxonomy.EXPRESSION_PHRASES.values() for p in phrases]
                    + [o for options in taxonomy.PROMPT_ATTRIBUTES.values() for o in options])
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


TINY_ARCHITECTURE = dict(vae_channels=[16, 32, 32], vae_norm_groups=8, unet_channels=[32, 64],
                         unet_attention_levels=[True, False], attention_head_dim=4, norm_groups=8,
                         text_hidden=64, text_layers=2, text_heads=2, au_tokens=4, adapter_hidden=64)


@dataclass
class GeneratorComponents:
    """Freshly initialised generator parts, before any training."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    au_adapter: AUAdapter

    def save(self, path: str | Path, classes: Sequence[str], resolution: int,
             sg_classifier: FERClassifier | None = None, training: dict | None = None) -> BundleManifest:
        return save_bundle(path, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
                           tokenizer=self.tokenizer, scheduler=self.scheduler, au_adapter=self.au_adapter,
                           classes=classes, resolution=resolution, sg_classifier=sg_classifier,
                           training=training)


def new_generator(architecture: GeneratorArchitecture, seed: int = 0) -> GeneratorComponents:
    """Random-weight SD-layout components sized by ``architecture``; the same seed gives the same weights."""
    arch = architecture
    tokenizer = build_tiny_tokenizer(_prompt_words())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=2 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads, max_position_embeddings=77,
        projection_dim=arch.text_hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 1)
    levels = len(arch.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
                        block_out_channels=tuple(arch.vae_channels), down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                        norm_num_groups=arch.vae_norm_groups, sample_size=arch.resolution)
    torch.manual_seed(seed + 2)
    attention = arch.unet_attention_levels
    unet = UNet2DConditionModel(
        sample_size=arch.resolution // 2 ** (levels - 1), in_channels=arch.latent_channels,
        out_channels=arch.latent_channels, layers_per_block=arch.unet_layers_per_block,
        block_out_channels=tuple(arch.unet_channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_groups)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(seed + 3)
    adapter = AUAdapter.for_unet(unet, list(taxonomy.au_set(arch.au_set)), n_tokens=arch.au_tokens,
                                 hidden_dim=arch.adapter_hidden)
    return GeneratorComponents(unet, vae, text_encoder, tokenizer, scheduler, adapter)


def make_tiny_bundle(path: str | Path, seed: int = 0, resolution: int = 48,
                     classes: Sequence[str] = taxonomy.AFFECTNET_7,
                     au_names: Sequence[str] = taxonomy.FINEFACE_12,
                     dtype: torch.dtype = torch.float32) -> BundleManifest:
    """A small random-weight bundle in the real layout; the same arguments give the same bytes.
    ``dtype`` is how the weights are stored (``load_bundle`` computes in fp32 either way)."""
    if resolution % 4:
        raise SynferError("resolution", resolution, "a multiple of 4 (the tiny VAE downsamples by 4)")
    au_set = next((name for name, names in taxonomy.AU_SETS.items() if tuple(names) == tuple(au_names)), None)
    if au_set is None:
        raise SynferError("au_names", list(au_names), f"one of the AU sets {sorted(taxonomy.AU_SETS)}")
    parts = new_generator(GeneratorArchitecture(resolution=resolution, au_set=au_set, **TINY_ARCHITECTURE), seed)
    classifier = tiny_resnet(list(classes), image_size=resolution, seed=seed + 4)
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.au_adapter, classifier):
        module.to(dtype)
    return parts.save(path, classes, resolution, sg_classifier=classifier)


# --- Stable Diffusion architectures with random weights ------------------------------------------
# The component configs of the real checkpoints, as data, so that benchmarks and tests run the real
# architecture without downloading it: stable-diffusion-v1-5 (runwayml) and stabilityai's
# stable-diffusion-2-1. Fields left out take the diffusers/transformers defaults, as there.

_SD_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32)
_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu",
    norm_num_groups=32, scaling_factor=0.18215)
_SD_TEXT = dict(vocab_size=49408, max_position_embeddings=77, attention_dropout=0.0, dropout=0.0,
                initializer_factor=1.0, initializer_range=0.02, layer_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as the real configs say (legacy ids)
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    trained_betas=None, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
                    steps_offset=1)

SD_ARCHITECTURES: dict[str, dict] = {
    "sd15": dict(
        resolution=512,
        unet={**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae={**_SD_VAE, "sample_size": 512},
        text_encoder={**_SD_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768},
        scheduler=("PNDMScheduler", {**_SD_SCHEDULE, "prediction_type": "epsilon"}),
        pad_token="<|endoftext|>"),
    "sd21": dict(
        resolution=768,
        unet={**_SD_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
              "use_linear_projection": True, "upcast_attention": True, "dual_cross_attention": False,
              "only_cross_attention": False, "num_class_embeds": None},
        vae={**_SD_VAE, "sample_size": 768},
        text_encoder={**_SD_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                      "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512},
        scheduler=("DDIMScheduler", {**_SD_SCHEDULE, "prediction_type": "v_prediction"}),
        pad_token="!"),  # OpenCLIP pads with "!" (id 0)
}
ARCHITECTURES = ("sd15", "sd21", "tiny")


def make_random_bundle(path: str | Path, arch: str, resolution: int | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float16, classes: Sequence[str] = taxonomy.AFFECTNET_7,
                       au_names: Sequence[str] = taxonomy.FINEFACE_12) -> BundleManifest:
    """A bundle with the exact layout and component configs of ``arch`` (sd15, sd21, or our tiny one)
    and random weights (PyTorch's own initialisation, seeded), stored as ``dtype``.

    ``resolution`` sets the manifest's resolution and the UNet's ``sample_size`` (resolution / 8);
    the weights do not depend on it. The tokenizer is made offline with CLIP's 49408 entries.
    """
    import diffusers

    if arch == "tiny":
        return make_tiny_bundle(path, seed=seed, resolution=resolution or 48, classes=classes,
                                au_names=au_names, dtype=dtype)
    if arch not in SD_ARCHITECTURES:
        raise SynferError("arch", arch, f"one of {list(ARCHITECTURES)}")
    spec = SD_ARCHITECTURES[arch]
    resolution = resolution or spec["resolution"]
    if resolution % 64:
        raise SynferError("resolution", resolution, f"a multiple of 64 for {arch} (the VAE and the UNet "
                                                    "each downsample by 8)")
    tokenizer = build_tiny_tokenizer(_prompt_words(), vocab_size=spec["text_encoder"]["vocab_size"],
                                     pad_token=spec["pad_token"])
    scheduler_class, scheduler_config = spec["scheduler"]
    scheduler = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    # Initialised in ``dtype`` itself: casting SD's 860M-parameter UNet afterwards takes longer on
    # CPU than initialising it, and fp32 copies of everything would double the memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(spec["vae"])
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel.from_config({**spec["unet"], "sample_size": resolution // 8})
        torch.manual_seed(seed + 3)
        adapter = AUAdapter.for_unet(unet, list(au_names))
        classifier = tiny_resnet(list(classes), image_size=resolution, seed=seed + 4)
    finally:
        torch.set_default_dtype(previous)
    return save_bundle(path, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       scheduler=scheduler, au_adapter=adapter, classes=classes, resolution=resolution,
                       sg_classifier=classifier)
