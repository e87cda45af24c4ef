"""The AU adapter: AU vector -> conditioning tokens, attended by decoupled cross-attention.

IP-Adapter-style (METHOD.md section 1): every cross-attention layer of the UNet gets its own K/V
projections for the AU tokens, and ``out = Attn(Q, K_txt, V_txt) + au_scale * Attn(Q, K_au, V_au)``.
The AU tokens ride at the end of ``encoder_hidden_states``; the processor splits them off, so the
UNet's call signature is unchanged and ``au_scale`` travels in ``cross_attention_kwargs``.

The unconditional AU input (for CFG, and what condition dropout trains) is a row of zero tokens
(``null_unconditional``): the AU attention then adds nothing. Neutral, whose AU vector is all zeros,
is encoded like any other class and so stays a condition of its own. Adapters made before this
(no ``null_unconditional`` in their config) used the encoded zero AU vector as the unconditional
input, which made neutral rows unguidable; they keep that behaviour, since their weights learnt it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


def _layer_key(processor_name: str) -> str:
    # ModuleDict keys may not contain dots.
    return processor_name.removesuffix(".processor").replace(".", "__")


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The UNet's cross-attention modules by processor name (``...attn2.processor``)."""
    modules = dict(unet.named_modules())
    return {name: modules[name.removesuffix(".processor")]
            for name in unet.attn_processors if name.endswith("attn2.processor")}


class AUAdapter(ModelMixin, ConfigMixin):
    """AU encoder plus per-layer AU key/value projections; the only trainable part of the generator."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, au_names: list[str], cross_attention_dim: int, layer_dims: dict[str, int],
                 n_tokens: int = 4, hidden_dim: int = 256, null_unconditional: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(len(au_names), hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n_tokens * cross_attention_dim))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.to_k = nn.ModuleDict({key: nn.Linear(cross_attention_dim, dim, bias=False)
                                   for key, dim in layer_dims.items()})
        self.to_v = nn.ModuleDict({key: nn.Linear(cross_attention_dim, dim, bias=False)
                                   for key, dim in layer_dims.items()})

    @classmethod
    def for_unet(cls, unet: UNet2DConditionModel, au_names: list[str], n_tokens: int = 4,
                 hidden_dim: int = 256) -> "AUAdapter":
        """A fresh adapter whose AU K/V start as copies of the text K/V (as IP-Adapter does)."""
        layers = cross_attention_layers(unet)
        adapter = cls(au_names=list(au_names), cross_attention_dim=unet.config.cross_attention_dim,
                      layer_dims={_layer_key(n): m.to_k.out_features for n, m in layers.items()},
                      n_tokens=n_tokens, hidden_dim=hidden_dim, null_unconditional=True)
        with torch.no_grad():
            for name, module in layers.items():
                adapter.to_k[_layer_key(name)].weight.copy_(module.to_k.weight)
                adapter.to_v[_layer_key(name)].weight.copy_(module.to_v.weight)
        return adapter

    def encode(self, aus: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, n_aus) intensities in [0, 1] -> (batch, n_tokens, cross_attention_dim) tokens; rows
        whose ``keep`` is False get the unconditional tokens instead."""
        null = self.config.null_unconditional  # False in the config of an adapter saved before it existed
        if keep is not None and not null:
            aus = aus * keep[:, None].to(aus.dtype)  # an older adapter: zero AUs are its unconditional input
        tokens = self.encoder(aus).view(aus.shape[0], self.config.n_tokens, self.config.cross_attention_dim)
        tokens = self.norm(tokens)
        if keep is not None and null:
            tokens = tokens * keep[:, None, None].to(tokens.dtype)
        return tokens

    def unconditional(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        """The unconditional AU tokens for ``batch`` rows (classifier-free guidance's other branch)."""
        parameter = self.encoder[0].weight
        aus = torch.zeros(batch, len(self.config.au_names), device=device or parameter.device,
                          dtype=dtype or parameter.dtype)
        return self.encode(aus, keep=torch.zeros(batch, dtype=torch.bool, device=aus.device))


class DecoupledAUAttnProcessor(nn.Module):
    """Stock SDPA attention on the text tokens plus a scaled attention on the AU tokens.

    Installed on self-attention layers too (with no projections), so that ``au_scale`` is a known
    keyword everywhere and diffusers does not warn about it on every call.
    """

    def __init__(self, n_tokens: int, to_k: nn.Linear | None = None, to_v: nn.Linear | None = None):
        super().__init__()
        self.n_tokens = n_tokens
        self.to_k = to_k
        self.to_v = to_v
        self.text_attention = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 au_scale: float = 1.0) -> torch.Tensor:
        if self.to_k is None or encoder_hidden_states is None:
            return self.text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        text_tokens = encoder_hidden_states[:, :-self.n_tokens]
        au_tokens = encoder_hidden_states[:, -self.n_tokens:]
        out = self.text_attention(attn, hidden_states, text_tokens, attention_mask, temb)
        if au_scale == 0:
            return out
        return out + au_scale * self._au_attention(attn, hidden_states, au_tokens)

    def _au_attention(self, attn: Attention, hidden_states: torch.Tensor,
                      au_tokens: torch.Tensor) -> torch.Tensor:
        # SD's cross-attention layers have no spatial/group norm and see 3-d hidden states.
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = self.to_k(au_tokens), self.to_v(au_tokens)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        attended = attended.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        # to_out is linear: W(a + s*b) + bias = stock output + s * W b, so the AU term has no bias.
        # Called as a module (not through its .weight) so that a LoRA on to_out (peft) applies here too.
        projection = attn.to_out[0]
        projected = projection(attended)
        if projection.bias is not None:
            projected = projected - projection.bias
        return attn.to_out[1](projected) / attn.rescale_output_factor


def install_au_adapter(unet: UNet2DConditionModel, adapter: AUAdapter) -> None:
    """Route every attention layer of ``unet`` through :class:`DecoupledAUAttnProcessor`."""
    n_tokens = adapter.config.n_tokens
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            key = _layer_key(name)
            processors[name] = DecoupledAUAttnProcessor(n_tokens, adapter.to_k[key], adapter.to_v[key])
        else:
            processors[name] = DecoupledAUAttnProcessor(n_tokens)
    unet.set_attn_processor(processors)


@contextlib.contextmanager
def stock_attention(unet: UNet2DConditionModel):
    """The UNet with diffusers' own processors for the duration (to save it without adapter weights)."""
    installed = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield unet
    finally:
        unet.set_attn_processor(installed)
