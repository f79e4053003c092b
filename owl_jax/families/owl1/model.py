"""The composed mPLUG-Owl model: ViT -> abstractor -> 65 tokens spliced into LLaMA's input.

Param tree (mirrors the official state_dict top level, one module per official prefix):
  vision_model/...   query_tokens [1, Q, Dv]   abstractor/...   language_model/...
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from owl_jax.connectors.abstractor import Abstractor
from owl_jax.layers.core import param_with_axes
from owl_jax.decoder.llama import Llama
from owl_jax.decoder.spliced import SplicedVLM
from owl_jax.encoders.vit import VisionTransformer


class Owl(SplicedVLM):
    """cfg: OwlConfig. The official module names: `vision_model`, `query_tokens`, `abstractor`,
    `language_model`."""

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        remat = self.remat_policy != "none"
        self.vision_model = VisionTransformer(c.vision, **kw, remat=remat,
                                              scan_layers=self.scan_layers)
        self.query_tokens = param_with_axes(
            self, "query_tokens", nn.initializers.normal(0.02),
            (1, c.num_query_tokens, c.abstractor.hidden_size), self.param_dtype,
            (None, None, "embed"))
        self.abstractor = Abstractor(c.abstractor, c.text.hidden_size, **kw, remat=remat,
                                     scan_layers=self.scan_layers)
        self.language_model = Llama(c.text, **kw, scan_layers=self.scan_layers,
                                    remat_policy=self.remat_policy, lora=self.lora,
                                    lora_targets=self.lora_targets)

    def encode_images(self, pixel_values, deterministic: bool = True):
        """pixel_values [..., H, W, 3] (normalized, NHWC) -> [..., Q + 1, D_text]."""
        lead = pixel_values.shape[:-3]
        feats = self.vision_model(pixel_values.reshape(-1, *pixel_values.shape[-3:]))
        q = jnp.broadcast_to(self.query_tokens, (feats.shape[0],) + self.query_tokens.shape[1:])
        out = self.abstractor(q, feats, deterministic)
        return out.reshape(*lead, *out.shape[1:])


