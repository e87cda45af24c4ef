"""Diffusion features for the pseudo-label generator (METHOD.md section 3).

The bundle's frozen UNet runs once on an image's latent at a tiny timestep under a fixed,
label-free prompt. Forward hooks keep the multi-scale feature maps of the chosen blocks; a
wrapping attention processor keeps the cross-attention maps of the chosen layers (softmax over
the text tokens, mean over heads, the first ``attention_tokens`` word tokens). Both are resized
to one ``size`` x ``size`` grid and stacked along channels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synfer_ray.errors import SynferError

LABEL_FREE_PROMPT = "a close-up photo of the face of a person"


@dataclass(frozen=True)
class FeatureSettings:
    timestep: int = 1
    feature_blocks: tuple[str, ...] = ()  # empty: mid_block and every up block
    attention_layers: tuple[str, ...] = ()  # empty: every cross-attention layer of mid and up blocks
    attention_tokens: int = 8  # word tokens after <|startoftext|> whose maps are kept
    size: int = 0  # 0: the latent size, at most 16
    prompt: str = LABEL_FREE_PROMPT

    def as_config(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def default_feature_blocks(unet) -> list[str]:
    return ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def default_attention_layers(unet) -> list[str]:
    return [name.removesuffix(".processor") for name in unet.attn_processors
            if name.endswith("attn2.processor") and not name.startswith("down_blocks")]


class _CaptureAttention(nn.Module):
    """Computes and keeps the text cross-attention map, then defers to the installed processor."""

    def __init__(self, inner, store: dict, key: str, au_tokens: int, keep_tokens: int):
        super().__init__()
        self.inner, self.store, self.key = inner, store, key
        self.au_tokens, self.keep_tokens = au_tokens, keep_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 au_scale: float = 1.0):
        if encoder_hidden_states is not None:
            text = encoder_hidden_states[:, :-self.au_tokens] if self.au_tokens else encoder_hidden_states
            batch, heads = hidden_states.shape[0], attn.heads
            query = attn.to_q(hidden_states).view(batch, -1, heads, attn.inner_dim // heads).transpose(1, 2)
            key = attn.to_k(text).view(batch, -1, heads, attn.inner_dim // heads).transpose(1, 2)
            probabilities = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1).mean(dim=1)
            maps = probabilities[:, :, 1:1 + self.keep_tokens]  # (batch, HW, tokens), <|startoftext|> skipped
            side = int(math.isqrt(maps.shape[1]))
            self.store[self.key] = maps.transpose(1, 2).reshape(batch, -1, side, side)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, au_scale=au_scale)


class DiffusionFeatures(nn.Module):
    """Frozen: RGB images in [0, 1] (batch, 3, H, W) -> (features, attention maps), each (batch, C, S, S)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, au_tokens: int, au_dim: int,
                 settings: FeatureSettings, resolution: int):
        super().__init__()
        self.unet, self.vae = unet, vae
        self.settings, self.resolution, self.au_tokens = settings, resolution, au_tokens
        blocks = list(settings.feature_blocks) or default_feature_blocks(unet)
        layers = list(settings.attention_layers) or default_attention_layers(unet)
        modules = dict(unet.named_modules())
        for name in blocks + layers:
            if name not in modules:
                raise SynferError("labeler.feature_blocks/attention_layers", name,
                                  f"a module of this UNet, e.g. {default_feature_blocks(unet)[:3]}")
        self.blocks, self.layers = blocks, layers
        self._features: dict[str, torch.Tensor] = {}
        self._attention: dict[str, torch.Tensor] = {}
        for name in blocks:
            modules[name].register_forward_hook(self._keep(name))
        processors = dict(unet.attn_processors)
        for name in layers:
            key = f"{name}.processor"
            processors[key] = _CaptureAttention(processors[key], self._attention, name, au_tokens,
                                                settings.attention_tokens)
        unet.set_attn_processor(processors)
        alphas = scheduler.alphas_cumprod[settings.timestep]
        self.register_buffer("signal", alphas.sqrt().float(), persistent=False)
        tokens = tokenizer([settings.prompt], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            context = torch.cat([text_encoder(tokens)[0], torch.zeros(1, au_tokens, au_dim)], dim=1)
        self.register_buffer("context", context, persistent=False)
        latent = unet.config.sample_size
        self.size = settings.size or min(latent, 16)
        self.requires_grad_(False).eval()

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self._features[name] = output[0] if isinstance(output, tuple) else output
        return hook

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution,) * 2, mode="bilinear", align_corners=False,
                                   antialias=True)
        # The weights' dtype, not the buffers': DeepSpeed's mixed precision casts parameters only, so
        # under it `signal` and `context` stay fp32 beside half weights.
        dtype = self.unet.dtype
        images = images.to(dtype)
        latents = self.vae.encode(images * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor
        # On the latents' device: diffusers moves only 0-d timesteps itself.
        timestep = torch.full((images.shape[0],), self.settings.timestep, dtype=torch.long, device=latents.device)
        # x_t at a tiny t without noise: the image itself, as the UNet sees it at that step.
        context = self.context.to(dtype).expand(images.shape[0], -1, -1)
        self.unet((latents * self.signal).to(dtype), timestep, encoder_hidden_states=context,
                  cross_attention_kwargs={"au_scale": 0.0})
        grid = (self.size, self.size)
        features = torch.cat([F.interpolate(self._features[n].float(), size=grid, mode="bilinear",
                                            align_corners=False) for n in self.blocks], dim=1)
        attention = torch.cat([F.interpolate(self._attention[n].float(), size=grid, mode="bilinear",
                                             align_corners=False) for n in self.layers], dim=1)
        return features, attention

    def channels(self) -> tuple[int, int]:
        """(feature channels, attention channels), measured on one blank image."""
        features, attention = self.forward(torch.zeros(1, 3, self.resolution, self.resolution,
                                                       device=self.context.device, dtype=self.context.dtype))
        return features.shape[1], attention.shape[1]


def features_for_bundle(bundle, settings: FeatureSettings) -> DiffusionFeatures:
    adapter = bundle.au_adapter.config
    return DiffusionFeatures(bundle.unet, bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.scheduler,
                             adapter.n_tokens, adapter.cross_attention_dim, settings, bundle.manifest.resolution)


def settings_from_config(config: dict) -> FeatureSettings:
    return FeatureSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
