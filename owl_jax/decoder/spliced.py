"""The decoder side every splice family shares (mPLUG-Owl, LLaVA): a prompt whose image slots
(-1 ids) are filled with image embeddings, then the one decoder.

A family's model subclasses `SplicedVLM`, builds its image path and `language_model`
(owl_jax.decoder.llama.Llama over cfg.text) in `setup`, and defines `encode_images`; the
forward pass and the generation engine's methods (`prompt_inputs`, `decode`, `head`,
`embed_tokens`) are these.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from owl_jax.layers.core import LoraSpec
from owl_jax.layers.masks import segment_mask, segment_positions
from owl_jax.layers.splice import splice_images


def dummy_inputs(cfg):
    """One image's slots then one token, and one image: inputs that create every parameter of
    a splice family's model (`Family.dummy_inputs`)."""
    ids = jnp.concatenate([jnp.full((1, cfg.image_tokens), -1, jnp.int32),
                           jnp.ones((1, 1), jnp.int32)], axis=1)
    s = cfg.vision.image_size
    return ids, jnp.zeros((1, 1, s, s, cfg.vision.num_channels), jnp.float32)


class SplicedVLM(nn.Module):
    cfg: Any                      # the family's config (.text, .image_tokens)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

    def encode_images(self, pixel_values, deterministic: bool = True):
        """pixel_values [..., H, W, 3] (normalized, NHWC) -> [..., T, D_text]."""
        raise NotImplementedError

    def embed(self, input_ids, image_embeds=None):
        """Token embeddings with image tokens written into the -1 slots. Negative ids never
        reach the table: they embed as id 0 (as the official `generate` does) until an image
        token overwrites them."""
        x = self.language_model.embed(jnp.maximum(input_ids, 0))
        if image_embeds is not None:
            x = splice_images(x, input_ids, image_embeds, self.cfg.image_tokens)
        return x

    def __call__(self, input_ids, pixel_values=None, segment_ids=None, positions=None,
                 deterministic: bool = True, return_hidden: bool = False):
        """Training / scoring forward over full sequences: logits [B, L, V] (or, with
        return_hidden, the final-normed hidden states). segment_ids [B, L] (default all ones)
        keep packed samples apart: attention and RoPE positions never cross a segment; padding
        may use segment 0."""
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

    def prompt_inputs(self, input_ids, pixel_values, positions):
        """What a prefill feeds the decoder: (the embeddings [B, L, D], the visual context).
        pixel_values [N, H, W, 3] in batch order, or None."""
        image_embeds = None if pixel_values is None else self.encode_images(pixel_values)
        return (self.embed(input_ids, image_embeds),
                self.visual_context(input_ids, image_embeds, positions))

    def visual_context(self, input_ids, image_embeds, positions):
        """What every decode step needs of the images, per row (a pytree whose leaves lead
        with the batch, or None). A splice family has written them into the sequence already:
        None. A family whose images stay outside the sequence (cross-attention) returns their
        keys / values here, computed once per request; the engine hands it to every `decode`."""
        return None

    def decode(self, embeds, positions, mask, cache, cache_index, return_hidden=False,
               visual=None):
        """One cached LLM pass over a chunk of embeddings (prefill or generated tokens):
        (logits, or with return_hidden the final-normed hidden states; the new cache).
        `visual`: what `visual_context` returned (unused here)."""
        return self.language_model(embeds, positions, mask, cache, cache_index, True,
                                   return_hidden)

    def head(self, hidden):
        return self.language_model.lm_head(hidden)

    def embed_tokens(self, ids):
        return self.language_model.embed(ids)
