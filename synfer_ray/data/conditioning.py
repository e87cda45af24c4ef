"""Labelled faces -> what the denoiser trains on: VAE latents, caption tokens and AU vectors.

Rows with a ``caption`` keep it; others get one built from their label (``captions``:
"expression" says only the expression, in varied wording; "attributes" adds random attributes that
say nothing true of the image, as bundles trained before did). Rows with an ``aus`` vector keep
it; others get their class's prototype AUs with jitter, which is label conditioning, not AU
control, and reports say so. Each row's choices are seeded by
a hash of its image bytes, so a re-run encodes the same rows the same way.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch

from synfer_ray import taxonomy
from synfer_ray.data.faces import decode_faces


def row_seed(image: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(bytes(image), digest_size=4).digest(), "big")


def conditions(labels: Sequence[str], seeds: Sequence[int], au_names: Sequence[str], au_jitter: float,
               captions: Sequence[str | None] | None = None,
               aus: Sequence[Sequence[float] | None] | None = None,
               caption_style: str = "expression") -> tuple[list[str], np.ndarray]:
    """Each row's caption and AU vector: its own where given, else from its label."""
    texts, vectors = [], []
    for row, (label, seed) in enumerate(zip(labels, seeds)):
        caption = captions[row] if captions is not None else None
        texts.append(caption if caption else taxonomy.build_prompt(seed, label, style=caption_style))
        given = aus[row] if aus is not None else None
        vectors.append(np.asarray(given, np.float32) if given is not None
                       else taxonomy.sample_target_aus(seed, label, au_names, jitter=au_jitter,
                                                       extra_au_probability=0.0))
    return texts, np.stack(vectors) if vectors else np.zeros((0, len(au_names)), np.float32)


class EncodeForDenoiser:
    """A Ray Data callable class: image bytes + label (+ caption, AUs) -> latents, tokens, AUs.

    Faces are decoded at ``image_size`` (the bundle's resolution; smaller faces are resized up).
    Latents are the VAE posterior's mean and std of the image and of its mirror image, so the
    training loop can flip and sample without running the encoder again. The VAE runs in fp32 on
    the actor's device (a GPU when it asked Ray for one), ``chunk`` images at a time.
    """

    def __init__(self, components: str, classes: Sequence[str], au_names: Sequence[str], au_jitter: float,
                 image_size: int, torch_threads: int = 1, num_gpus: float = 0, chunk: int = 16,
                 caption_style: str = "expression"):
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        from synfer_ray.precision import device_for
        torch.set_num_threads(torch_threads)
        self.device = device_for(num_gpus)
        self.chunk = chunk
        self.vae = AutoencoderKL.from_pretrained(components, subfolder="vae", use_safetensors=True,
                                                 torch_dtype=torch.float32).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(components, subfolder="tokenizer")
        self.classes, self.au_names = tuple(classes), tuple(au_names)
        self.au_jitter, self.image_size, self.caption_style = au_jitter, image_size, caption_style
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labelled = "label" in batch
        if not labelled:  # caption + AU rows (FEText style): every row must bring its own conditions
            batch = {**batch, "label": np.full(len(batch["image"]), self.classes[0], dtype=object)}
        decoded = decode_faces(batch, self.classes, self.image_size, soft=False, synthetic=False)
        valid = decoded["valid"]
        if not valid.any():
            return self._empty()
        labels = [self.classes[i] for i in decoded["target"][valid].argmax(axis=1)]
        seeds = [row_seed(image) for image, ok in zip(batch["image"], valid) if ok]
        captions = list(batch["caption"][valid]) if "caption" in batch else None
        given_aus = list(batch["aus"][valid]) if "aus" in batch else None
        if not labelled:
            captions = [c or "" for c in captions]
            given_aus = [a if a is not None else np.zeros(len(self.au_names), np.float32) for a in given_aus]
        texts, aus = conditions(labels, seeds, self.au_names, self.au_jitter, captions, given_aus,
                                self.caption_style)
        pixels = torch.from_numpy(decoded["pixels"][valid]).permute(0, 3, 1, 2).float() / 127.5 - 1
        both = torch.cat([pixels, pixels.flip(-1)])
        means, stds = [], []
        for part in both.split(self.chunk):
            posterior = self.vae.encode(part.to(self.device)).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
        n = pixels.shape[0]
        stack = lambda x: torch.stack([x[:n], x[n:]], dim=1).numpy()  # noqa: E731  (B, 2, C, h, w)
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="np").input_ids
        return {"latent_mean": stack(torch.cat(means)), "latent_std": stack(torch.cat(stds)),
                "input_ids": tokens.astype(np.int32), "aus": aus.astype(np.float32),
                "label": np.asarray([self.classes.index(label) for label in labels], np.int16)}

    def _empty(self) -> dict[str, np.ndarray]:
        size = self.image_size // self.vae_factor
        channels = self.vae.config.latent_channels
        return {"latent_mean": np.zeros((0, 2, channels, size, size), np.float32),
                "latent_std": np.zeros((0, 2, channels, size, size), np.float32),
                "input_ids": np.zeros((0, self.tokenizer.model_max_length), np.int32),
                "aus": np.zeros((0, len(self.au_names)), np.float32), "label": np.zeros(0, np.int16)}
