"""The composed LLaVA model: CLIP ViT -> one hidden layer's patch tokens -> projector -> spliced
into LLaMA's input, one LLM position per patch.

Param tree (the llava-hf module names):
  vision_tower/...   multi_modal_projector/linear_1 (, linear_2)   language_model/...
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from owl_jax.connectors.projector import Projector
from owl_jax.decoder.llama import Llama
from owl_jax.encoders.vit import VisionTransformer
from owl_jax.families.llava.config import LlavaConfig
from owl_jax.layers.core import LoraSpec
from owl_jax.layers.masks import segment_mask, segment_positions
from owl_jax.layers.splice import splice_images


class Llava(nn.Module):
    cfg: LlavaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = VisionTransformer(c.vision, **kw,
                                              remat=self.remat_policy != "none",
                                              scan_layers=self.scan_layers,
                                              feature_layer=c.vision_feature_layer)
        self.multi_modal_projector = Projector(c.projector, c.text.hidden_size, **kw)
        self.language_model = Llama(c.text, **kw, scan_layers=self.scan_layers,
                                    remat_policy=self.remat_policy, lora=self.lora,
                                    lora_targets=self.lora_targets)

    def encode_images(self, pixel_values, deterministic: bool = True):
        """pixel_values [..., H, W, 3] (normalized, NHWC) -> [..., image_tokens, D_text]: the
        tower's hidden state `vision_feature_layer` (HF `hidden_states` indexing, no final
        LayerNorm), without CLS under the "default" strategy, through the projector."""
        lead = pixel_values.shape[:-3]
        feats = self.vision_tower(pixel_values.reshape(-1, *pixel_values.shape[-3:]))
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        out = self.multi_modal_projector(feats)
        return out.reshape(*lead, *out.shape[1:])

    def embed(self, input_ids, image_embeds=None):
        """Token embeddings with image tokens written into the -1 slots (which embed as id 0
        until then: negative ids never reach the table)."""
        x = self.language_model.embed(jnp.maximum(input_ids, 0))
        if image_embeds is not None:
            x = splice_images(x, input_ids, image_embeds, self.cfg.image_tokens)
        return x

    def __call__(self, input_ids, pixel_values=None, segment_ids=None, positions=None,
                 deterministic: bool = True, return_hidden: bool = False):
        """Training / scoring forward over full sequences: logits [B, L, V] (or, with
        return_hidden, the final-normed hidden states). segment_ids [B, L] (default all ones)
        keep packed samples apart; padding may use segment 0."""
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.encode_images(pixel_values, deterministic)
        x = self.embed(input_ids, image_embeds)
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
        out, _ = self.language_model(x, positions, segment_mask(segment_ids),
                                     deterministic=deterministic, return_hidden=return_hidden)
        return out

    def decode(self, embeds, positions, mask, cache, cache_index, return_hidden=False):
        """One cached LLM pass over a chunk of embeddings (prefill or generated tokens):
        (logits, or with return_hidden the final-normed hidden states; the new cache)."""
        return self.language_model(embeds, positions, mask, cache, cache_index, True,
                                   return_hidden)

    def head(self, hidden):
        return self.language_model.lm_head(hidden)

    def embed_tokens(self, ids):
        return self.language_model.embed(ids)
