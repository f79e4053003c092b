"""The composed mPLUG-Owl model: ViT -> abstractor -> 65 tokens spliced into LLaMA's input.

Param tree (mirrors the official state_dict top level, one module per official prefix):
  vision_model/...   query_tokens [1, Q, Dv]   abstractor/...   language_model/...
"""
from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp

from owl_jax.families.owl1.config import OwlConfig
from owl_jax.connectors.abstractor import Abstractor
from owl_jax.layers.core import LoraSpec, param_with_axes
from owl_jax.decoder.llama import Llama
from owl_jax.layers.masks import segment_mask, segment_positions
from owl_jax.layers.splice import splice_images
from owl_jax.encoders.vit import VisionTransformer


class Owl(nn.Module):
    cfg: OwlConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

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

    def embed(self, input_ids, image_embeds=None):
        """Token embeddings with image tokens spliced in. Negative ids never reach the table: they
        embed as id 0 (as the official `generate` does) until an image token overwrites them."""
        x = self.language_model.embed(jnp.maximum(input_ids, 0))
        if image_embeds is not None:
            x = splice_images(x, input_ids, image_embeds, self.cfg.image_tokens)
        return x

    def __call__(self, input_ids, pixel_values=None, segment_ids=None, positions=None,
                 deterministic: bool = True, return_hidden: bool = False):
        """Training / scoring forward over full sequences. Returns logits [B, L, V].

        segment_ids [B, L] (default: all ones) separates packed samples: attention and RoPE
        positions never cross a segment. Padding may use segment 0.
        """
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, deterministic)
        x = self.embed(input_ids, image_embeds)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
        logits, _ = self.language_model(x, positions, segment_mask(segment_ids),
                                        deterministic=deterministic, return_hidden=return_hidden)
        return logits

    def decode(self, embeds, positions, mask, cache, cache_index, return_hidden=False):
        """One cached LLM pass over a chunk of embeddings (prefill or generated tokens):
        (logits, or with return_hidden the final-normed hidden states; the new cache)."""
        return self.language_model(embeds, positions, mask, cache, cache_index, True,
                                   return_hidden)

    def head(self, hidden):
        return self.language_model.lm_head(hidden)

    def embed_tokens(self, ids):
        return self.language_model.embed(ids)


