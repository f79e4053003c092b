"""The composed mPLUG-Owl model: ViT -> abstractor -> 65 tokens spliced into LLaMA's input.

Param tree (mirrors the official state_dict top level, one module per official prefix):
  vision_model/...   query_tokens [1, Q, Dv]   abstractor/...   language_model/...
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.config import OwlConfig
from owl_jax.models.abstractor import Abstractor
from owl_jax.models.layers import LoraSpec, param_with_axes
from owl_jax.models.llama import Llama
from owl_jax.models.masks import segment_mask, segment_positions
from owl_jax.models.vit import VisionTransformer


def splice_images(text_embeds, input_ids, image_embeds, slots: int | None = None):
    """Writes image tokens into the slots the prompt reserves (ids < 0).

    text_embeds [B, L, D]; input_ids [B, L] with one run of `slots` negative ids per image
    (default: T, the image token count). image_embeds either
      [N, T, D]: a flat list ordered by appearance across the batch, row-major, as the
        official `pixel_values`; slot k of the batch belongs to image k // slots; or
      [B, M, T, D]: M images per row (unused ones are padding); slot k of row b belongs to image
        (b, k // slots). This form shards with the batch, so training uses it.
    Slot j of an image's run takes its token j; runs longer than T (the official processor's
    fixed 65 slots with fewer queries) keep the text embedding after token T - 1, as the official
    model leaves them. Rows may hold any number of images, including none.
    """
    b, l, d = text_embeds.shape
    t = image_embeds.shape[-2]
    slots = slots or t
    is_slot = input_ids < 0
    if image_embeds.ndim == 3:
        k = jnp.cumsum(is_slot.reshape(-1)).reshape(b, l) - 1
        img = jnp.clip(k // slots, 0, image_embeds.shape[0] - 1)
        tok = k % slots
        picked = image_embeds[img, jnp.minimum(tok, t - 1)]
    else:
        k = jnp.cumsum(is_slot, axis=1) - 1
        img = jnp.clip(k // slots, 0, image_embeds.shape[1] - 1)
        tok = k % slots
        # vmapped over rows, the gather keeps the batch as a batching dim, so it partitions with
        # the batch; indexing with arange(b) made XLA all-gather every row's images (fsdp).
        picked = jax.vmap(lambda e, i, j: e[i, j])(image_embeds, img, jnp.minimum(tok, t - 1))
    fill = is_slot & (tok < t)
    return jnp.where(fill[..., None], picked.astype(text_embeds.dtype), text_embeds)


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

    def decode(self, embeds, positions, mask, cache, cache_index):
        """One cached LLM step over a chunk of embeddings (prefill or a generated token)."""
        return self.language_model(embeds, positions, mask, cache, cache_index)

    def embed_tokens(self, ids):
        return self.language_model.embed(ids)


# --------------------------------------------------------------------------------------------
# Param layout helpers


_LAYER = re.compile(r"^layers_(\d+)$")
_SCANNED = ("vision_model", "abstractor", "language_model")  # what scan_layers stacks


def scan_params(params):
    """Unrolled layers (`layers_{i}`) of the ViT, the abstractor and the LLM -> one stacked
    `layers/layer` subtree each (for scan_layers=True)."""
    out = dict(params)
    for tower in _SCANNED:
        if tower not in out:
            continue
        sub = dict(out[tower])
        idx = sorted(int(_LAYER.match(k).group(1)) for k in sub if _LAYER.match(k))
        if idx:
            layers = [sub.pop(f"layers_{i}") for i in idx]
            sub["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
            out[tower] = sub
    return out


def unscan_params(params):
    """Inverse of `scan_params`."""
    out = dict(params)
    for tower in _SCANNED:
        if tower not in out or "layers" not in out[tower]:
            continue
        sub = dict(out[tower])
        stacked = sub.pop("layers")["layer"]
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            sub[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        out[tower] = sub
    return out
