"""Model bundles: a diffusers Stable Diffusion directory plus the AU adapter and a manifest.

Layout (every component loads on its own with ``from_pretrained``)::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/   (diffusers SD layout)
    au_adapter/       config.json + diffusion_pytorch_model.safetensors
    sg_classifier/    optional FER classifier for semantic guidance (transformers, safetensors)
    synfer_bundle.json  classes, AU names, resolution, versions, content hash, base_model

``base_model`` lets a bundle hold only the adapter and name the SD weights elsewhere (a hub id
such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or a path): the loading code is the same.
Weights are read only as safetensors; nothing is unpickled.
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

from synfer_ray import taxonomy
from synfer_ray.classifiers import FERClassifier, load_classifier, tiny_resnet
from synfer_ray.errors import SynferError
from synfer_ray.generator.au_adapter import AUAdapter, install_au_adapter

MANIFEST_NAME = "synfer_bundle.json"
FORMAT_VERSION = 1
_HINT = "a bundle directory made by `synfer bundle make-tiny` or `synfer bundle init`"


@dataclass(frozen=True)
class BundleManifest:
    classes: tuple[str, ...]
    au_names: tuple[str, ...]
    resolution: int
    content_hash: str = ""
    base_model: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

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
                           format_version=int(raw.get("format_version", FORMAT_VERSION)))
        except (ValueError, KeyError, TypeError) as error:
            raise SynferError(f"bundle/{MANIFEST_NAME}", str(manifest_path),
                              f"JSON with classes, au_names, resolution and content_hash ({error!r})") from error
        if manifest.format_version > FORMAT_VERSION:
            raise SynferError(f"bundle/{MANIFEST_NAME}.format_version", manifest.format_version,
                              f"<= {FORMAT_VERSION}; upgrade synfer-ray to read this bundle")
        return manifest

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
        for module in (self.unet, self.vae, self.text_encoder, self.au_adapter, self.sg_classifier):
            if module is not None:
                module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import synfer_ray
    return {"synfer_ray": synfer_ray.__version__, "torch": torch.__version__.split("+")[0],
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _load_component(loader, source: str, subfolder: str, **kwargs):
    try:
        return loader.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as error:
        raise SynferError(f"bundle/{subfolder}", source,
                          f"{_HINT}, or a diffusers SD path or hub id with a loadable '{subfolder}' "
                          f"({type(error).__name__}: {str(error)[:300]})") from error


def load_bundle(path: str | Path, verify: bool = True, sg_classifier: str | Path | None = None) -> Bundle:
    """Load a bundle for inference: every component frozen and in eval mode, adapter installed.

    ``verify`` recomputes the content hash so a changed or truncated file is caught here, not as
    odd images later. ``sg_classifier`` overrides the bundle's own guiding classifier.
    """
    transformers_logging.disable_progress_bar()
    path = Path(path)
    manifest = BundleManifest.read(path)
    if verify and content_hash(path, manifest.base_model) != manifest.content_hash:
        raise SynferError("bundle", str(path), "files matching the content hash in "
                          f"{MANIFEST_NAME}: some file changed or is corrupt; rebuild or re-copy the bundle")
    source = manifest.base_model or str(path)
    unet = _load_component(UNet2DConditionModel, source, "unet", use_safetensors=True)
    vae = _load_component(AutoencoderKL, source, "vae", use_safetensors=True)
    text_encoder = _load_component(CLIPTextModel, source, "text_encoder", use_safetensors=True)
    tokenizer = _load_component(CLIPTokenizer, source, "tokenizer")
    scheduler = _load_component(DDIMScheduler, source, "scheduler")
    adapter = _load_component(AUAdapter, str(path), "au_adapter", use_safetensors=True)
    if tuple(adapter.config.au_names) != manifest.au_names:
        raise SynferError("bundle/au_adapter/config.json.au_names", adapter.config.au_names,
                          f"the AU names of {MANIFEST_NAME}: {list(manifest.au_names)}")
    install_au_adapter(unet, adapter)
    classifier_path = Path(sg_classifier) if sg_classifier else path / "sg_classifier"
    classifier = None
    if sg_classifier or classifier_path.is_dir():
        classifier = load_classifier(classifier_path, field="sg_classifier")
    for module in (unet, vae, text_encoder, adapter, classifier):
        if module is not None:
            module.eval().requires_grad_(False)
    return Bundle(path, manifest, unet, vae, text_encoder, tokenizer, scheduler, adapter, classifier)


def save_bundle(path: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler: DDIMScheduler,
                au_adapter: AUAdapter, classes: Sequence[str], resolution: int,
                sg_classifier: FERClassifier | None = None) -> BundleManifest:
    """Write every component and then the manifest, whose hash seals the directory."""
    # Imported here: the pipeline module drags in image processors that warn about torchvision.
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(path, safe_serialization=True)
    return _seal(path, au_adapter, classes, resolution, sg_classifier, base_model=None)


def _seal(path: Path, au_adapter: AUAdapter, classes: Sequence[str], resolution: int,
          sg_classifier: FERClassifier | None, base_model: str | None) -> BundleManifest:
    au_adapter.save_pretrained(path / "au_adapter", safe_serialization=True)
    if sg_classifier is not None:
        sg_classifier.save_pretrained(path / "sg_classifier")
    manifest = BundleManifest(classes=tuple(classes), au_names=tuple(au_adapter.config.au_names),
                              resolution=resolution, base_model=base_model, versions=_versions(),
                              content_hash=content_hash(path, base_model))
    manifest.write(path)
    return manifest


def init_bundle(path: str | Path, base_model: str, classes: Sequence[str] = taxonomy.AFFECTNET_7,
                au_names: Sequence[str] = taxonomy.FINEFACE_12, n_tokens: int = 4,
                resolution: int = 512) -> BundleManifest:
    """A bundle over existing SD weights (hub id or path) with a fresh, untrained AU adapter."""
    unet = _load_component(UNet2DConditionModel, base_model, "unet", use_safetensors=True)
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


def build_tiny_tokenizer(words: Sequence[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer made offline: all bytes, plus merges that spell each word as one token.

    Each word gets merges appended after the existing ones, so earlier words keep their single
    token (BPE always tries lower-ranked merges first).
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = list(ranks)
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)


def _prompt_words() -> list[str]:
    text = " ".join([taxonomy.PROMPT_TEMPLATE, *taxonomy.AFFECTNET_8]
                    + [p for phrases in taxonomy.EXPRESSION_PHRASES.values() for p in phrases]
                    + [o for options in taxonomy.PROMPT_ATTRIBUTES.values() for o in options])
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def make_tiny_bundle(path: str | Path, seed: int = 0, resolution: int = 48,
                     classes: Sequence[str] = taxonomy.AFFECTNET_7,
                     au_names: Sequence[str] = taxonomy.FINEFACE_12) -> BundleManifest:
    """A small random-weight bundle in the real layout; the same arguments give the same bytes."""
    if resolution % 4:
        raise SynferError("resolution", resolution, "a multiple of 4 (the tiny VAE downsamples by 4)")
    tokenizer = build_tiny_tokenizer(_prompt_words())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(seed + 3)
    adapter = AUAdapter.for_unet(unet, list(au_names), n_tokens=4, hidden_dim=64)
    classifier = tiny_resnet(list(classes), image_size=resolution, seed=seed + 4)
    return save_bundle(path, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       scheduler=scheduler, au_adapter=adapter, classes=classes, resolution=resolution,
                       sg_classifier=classifier)
