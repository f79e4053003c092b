"""The composed mPLUG-Owl3 model: SigLIP (hidden_states[-2]) -> projector -> Qwen2 whose hyper
layers cross-attend to the image features. Images never enter the token sequence.

Param tree (the official module names): vision_model/...  vision2text_model/linear_1
(, linear_2)  language_model/... (hyper layers add self_attn/v_kv_proj, and for 240728
self_attn/gate_proj).

Media in the ids: the first token of each image's placeholder (`<|image|>`, one per tile) is
stored as -1 - token (`media_id`), so that the ids carry both the token and where each image
starts; `embed` reads the token back. Images are matched to those slots in order: across the
batch for image features [N, P, D] (the engine's order), or per row for [B, N, P, D]
(training batches).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.connectors.projector import Projector
from owl_jax.decoder import hyper
from owl_jax.decoder.llama import Llama
from owl_jax.encoders.siglip import SiglipVisionTransformer
from owl_jax.layers.core import LoraSpec
from owl_jax.layers.masks import segment_mask, segment_positions

IMAGE_CHUNK = 8   # images encoded at once at inference (SigLIP's activations scale with it)


def media_id(token):
    """The id that marks `token` as the start of an image placeholder."""
    return -1 - token


def token_of(ids):
    return jnp.where(ids < 0, -1 - ids, ids)


def dummy_inputs(cfg):
    """A placeholder start then one token, and one image (creates every parameter)."""
    ids = jnp.array([[media_id(1), 1]], jnp.int32)
    s = cfg.vision.image_size
    return ids, jnp.zeros((1, 1, s, s, cfg.vision.num_channels), jnp.float32)


def media_layout(ids, positions, n_tiles: int, per_row: bool, segment_ids=None):
    """Where each row's images start. Returns (tile index into the image features [B, T],
    starts: their placeholder positions [B, T], valid [B, T], segments [B, T] or None), with
    T = n_tiles: row b's j-th media slot takes image j of the row (per_row) or the next image
    of the batch."""
    is_media = ids < 0
    count = is_media.sum(1)
    slots = jax.vmap(lambda m: jnp.nonzero(m, size=n_tiles, fill_value=0)[0])(is_media)
    j = jnp.arange(n_tiles)[None]
    valid = j < count[:, None]
    first = 0 if per_row else (jnp.cumsum(count) - count)[:, None]
    tile = jnp.clip(first + j, 0, n_tiles - 1)
    starts = jnp.take_along_axis(positions, slots, axis=1)
    segments = None if segment_ids is None else jnp.take_along_axis(segment_ids, slots, axis=1)
    return tile, starts, valid, segments


class Owl3(nn.Module):
    cfg: object                   # Owl3Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = SiglipVisionTransformer(c.vision, **kw,
                                                    remat=self.remat_policy != "none",
                                                    feature_layer=c.vision_feature_layer)
        self.vision2text_model = Projector(c.projector, c.text.hidden_size, **kw)
        self.language_model = Llama(c.text, **kw, scan_layers=self.scan_layers,
                                    remat_policy=self.remat_policy, lora=self.lora,
                                    lora_targets=self.lora_targets,
                                    block_of=hyper.block_of(c.hyper_layers, c.fusion))

    def encode_images(self, pixel_values, deterministic: bool = True):
        """pixel_values [..., H, W, 3] (normalized, NHWC) -> [..., P, D_text]. At inference,
        IMAGE_CHUNK images at a time (one chunk's activations live at once)."""
        lead = pixel_values.shape[:-3]
        px = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        n = px.shape[0]
        if n <= IMAGE_CHUNK or not deterministic or self.is_initializing():
            out = self._encode(px, deterministic)
        else:
            out = jnp.zeros((n, self.cfg.tokens_per_image, self.cfg.text.hidden_size),
                            self.dtype)

            def chunk(i, out):  # the last chunk moves back to end at n (overlap recomputed)
                start = jnp.minimum(i * IMAGE_CHUNK, n - IMAGE_CHUNK)
                feats = self._encode(jax.lax.dynamic_slice_in_dim(px, start, IMAGE_CHUNK))
                return jax.lax.dynamic_update_slice_in_dim(out, feats.astype(out.dtype), start, 0)
            out = jax.lax.fori_loop(0, -(-n // IMAGE_CHUNK), chunk, out)
        return out.reshape(*lead, *out.shape[1:])

    def _encode(self, px, deterministic: bool = True):
        return self.vision2text_model(self.vision_model(px))

    def embed(self, input_ids, image_embeds=None):
        """Token embeddings; images stay out of the sequence (media slots keep their token)."""
        return self.language_model.embed(token_of(input_ids))

    def embed_tokens(self, ids):
        return self.language_model.embed(ids)

    def visual_context(self, input_ids, image_embeds, positions, segment_ids=None):
        """Every hyper layer's visual keys (MI-Rope applied) and values, computed once, and
        where each row's images start (see owl_jax.decoder.hyper). None without images.
        image_embeds: [N, P, D] (matched to the media slots in batch order) or [B, N, P, D]
        (per row)."""
        if image_embeds is None:
            return None
        per_row = image_embeds.ndim == 4
        n = image_embeds.shape[-3]
        tile, starts, valid, segments = media_layout(input_ids, positions, n, per_row,
                                                     segment_ids)
        if per_row:
            feats = jnp.take_along_axis(image_embeds, tile[:, :, None, None], axis=1)
        else:
            feats = image_embeds[tile]                       # [B, T, P, D]
        out = {"starts": starts, "valid": valid, **self._hyper_kv(feats, starts)}
        if segments is not None:
            out["segments"] = segments
        return out

    def _hyper_layers(self):
        return [(i, layer) for i, layer in enumerate(self.language_model.layers)
                if i + 1 in self.cfg.hyper_layers]

    def _hyper_kv(self, feats, starts):
        """{layers_i: {k, v}} of every hyper layer for tiles feats [B, T, P, D] whose
        placeholders start at `starts` [B, T]."""
        offset = 1 if self.cfg.fusion == "gate" else 0       # MI-Rope: start (+1 in 240728)
        out = {}
        for i, layer in self._hyper_layers():
            k, v = layer.visual_kv(feats, starts + offset)
            out[f"layers_{i}"] = {"k": k, "v": v}
        return out

    def prompt_inputs(self, input_ids, pixel_values, positions):
        """What a prefill feeds the decoder: (token embeddings, the visual context), as
        `visual_context(input_ids, encode_images(pixel_values), positions)` computes it but
        IMAGE_CHUNK tiles at a time, from pixels to each hyper layer's keys / values, so the
        images' features never exist all at once: what grows with the images is their pixels
        and the hyper layers' K/V. pixel_values [N, H, W, 3] in batch order, or None."""
        x = self.embed(input_ids)
        if pixel_values is None:
            return x, None
        if self.is_initializing():
            return x, self.visual_context(input_ids, self.encode_images(pixel_values), positions)
        n = pixel_values.shape[0]
        tile, starts, valid, _ = media_layout(input_ids, positions, n, per_row=False)
        b, t = tile.shape
        c = min(IMAGE_CHUNK, t)
        per_row = -(-t // c)
        p, tc = self.cfg.tokens_per_image, self.cfg.text
        shape = (b, tc.kv_heads, t * p, tc.head_dim)
        kv = {f"layers_{i}": {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
              for i, _ in self._hyper_layers()}

        def chunk(j, kv):
            row, at = j // per_row, jnp.minimum((j % per_row) * c, t - c)

            def compute(kv):
                images = jax.lax.dynamic_slice_in_dim(tile[row], at, c)
                feats = self.encode_images(pixel_values[images])[None]       # [1, c, P, D]
                new = self._hyper_kv(feats, jax.lax.dynamic_slice_in_dim(starts[row], at, c)[None])
                return jax.tree.map(
                    lambda buf, x: jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype),
                                                                (row, 0, at * p, 0)), kv, new)
            # a row's slots past its own images hold nothing: skip them
            seen = jax.lax.dynamic_slice_in_dim(valid[row], at, c).any()
            return jax.lax.cond(seen, compute, lambda kv: kv, kv)

        kv = jax.lax.fori_loop(0, b * per_row, chunk, kv)
        return x, {"starts": starts, "valid": valid, **kv}

    def __call__(self, input_ids, pixel_values=None, segment_ids=None, positions=None,
                 deterministic: bool = True, return_hidden: bool = False):
        """Training / scoring forward: logits [B, L, V] (or final-normed hidden states).
        pixel_values [B, N, H, W, 3] (row b's j-th media slot reads image [b, j]) or
        [N, H, W, 3] (in batch order). segment_ids keep packed samples apart (text and
        images)."""
        x = self.embed(input_ids)
        packed = segment_ids is not None
        if segment_ids is None:
            segment_ids = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
        visual = None
        if pixel_values is not None:
            visual = self.visual_context(input_ids,
                                         self.encode_images(pixel_values, deterministic),
                                         positions, segment_ids if packed else None)
        side = {"positions": positions, "visual": visual}
        if packed:
            side["segment_ids"] = segment_ids
        out, _ = self.language_model(x, positions, segment_mask(segment_ids),
                                     deterministic=deterministic, return_hidden=return_hidden,
                                     side=side)
        return out

    def decode(self, embeds, positions, mask, cache, cache_index, return_hidden=False,
               visual=None):
        """One cached LLM pass (prefill or generated tokens); `visual` is what
        `visual_context` returned for these rows, reused at every step."""
        return self.language_model(embeds, positions, mask, cache, cache_index, True,
                                   return_hidden, side={"positions": positions,
                                                        "visual": visual})

    def head(self, hidden):
        return self.language_model.logits(hidden)
