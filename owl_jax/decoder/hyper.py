"""mPLUG-Owl3's hyper block: a Qwen2 layer whose attention also reads the images' keys / values.

Images never enter the token sequence. A hyper layer (chosen by 1-based index, `block_of`)
normalises the projected image features with its own `input_layernorm` (the text's norm,
shared weights) and projects them with `v_kv_proj` to per-kv-head keys and values (output laid
out (kv head, K|V, head_dim)). Every key of tile i is rotated with RoPE at one scalar position
(MI-Rope): where the tile's placeholder starts in the text. The queries are the text queries
after their RoPE, so a score depends on (text position - tile position).

Two fusions, one per released code version:
- "gate" (240728): text self-attention ctx_t and a separate cross-attention ctx_v over the
  visible tiles, mixed per head and channel by g = sigmoid(gate_proj(ctx_t)) (a [D, D] Linear
  shared by the heads): ctx_t + g * (ctx_v - ctx_t) written as ctx_t (1 - g) + ctx_v g. A token
  that sees no tile keeps ctx_t. A token at position t sees tile i iff start_i < t; the
  MI-Rope position of tile i is start_i + 1.
- "fused" (241101): one softmax over [visual keys; text keys]; token t sees tile i iff
  t >= start_i; the MI-Rope position is start_i.

Positions are the RoPE positions of the text (left padding does not shift them), so a padded
batch row computes what the row alone does. The official code compares sequence indices,
which are the same numbers for an unpadded row.

The visual keys / values are computed once per request (`HyperLayer.visual_kv`, from the
model's `visual_context`) and read at every step; `side` carries them with the query positions:
  side = {"positions": [B, L] int, "visual": None or {
            "starts": [B, T] int (tile i's placeholder position), "valid": [B, T] bool,
            "segments": [B, T] int (optional; with side["segment_ids"] [B, L]: packed rows),
            "layers_{i}": {"k": [B, Hkv, T * P, D], "v": [B, Hkv, T * P, D]}}}
(kv head before key: the attention reads them as stored, with no per-step transpose or copy
of every image's keys; batch first, so generation can pick rows of it).
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from owl_jax.decoder.llama import LlamaMLP, TextConfig, write_cache
from owl_jax.layers import blockwise
from owl_jax.layers.attention import apply_rope, attention, cached_attention, rope_cos_sin
from owl_jax.layers.core import Dense, LoraSpec, RMSNorm, constrain

FUSIONS = ("gate", "fused")


def block_of(hyper_layers, fusion: str):
    """Llama's `block_of` for 1-based `hyper_layers`."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown hyper fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    layers = frozenset(int(i) for i in hyper_layers)

    def pick(i: int):
        if i + 1 in layers:
            return HyperLayer, {"layer_index": i, "fusion": fusion}
        return None
    return pick


def mi_rope(k, tile_positions, theta: float):
    """MI-Rope: keys k [B, T, P, Hkv, D] of tile t rotated at tile_positions [B, T], in fp32
    (the official separate fp32 table), cast back to k's dtype."""
    d = k.shape[-1]
    cos, sin = rope_cos_sin(tile_positions, d, theta, jnp.float32)  # [B, T, D]
    b, t, p, g, _ = k.shape
    k32 = k.astype(jnp.float32).reshape(b, t, p * g, d)
    out = apply_rope(k32, cos, sin)
    return out.reshape(k.shape).astype(k.dtype)


def visual_mask(q_positions, visual, fusion: str, q_segments=None):
    """bool [B, L, T]: which tiles each query sees."""
    starts = visual["starts"][:, None, :]
    pos = q_positions[:, :, None]
    seen = (starts < pos) if fusion == "gate" else (starts <= pos)
    seen = seen & visual["valid"][:, None, :]
    if q_segments is not None and "segments" in visual:
        seen = seen & (visual["segments"][:, None, :] == q_segments[:, :, None])
    return seen


@flax.struct.dataclass
class TileMask:
    """The visual keys' mask from the tiles each query sees (tiles bool [B, L, T], P keys per
    tile), structured for `owl_jax.layers.blockwise`."""
    tiles: jax.Array
    per_tile: int = flax.struct.field(pytree_node=False)

    def dense(self):
        return jnp.repeat(self.tiles, self.per_tile, axis=-1)

    def block(self, q_idx, k_idx):
        return self.tiles[:, q_idx][:, :, k_idx // self.per_tile]


class HyperAttention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()
    fusion: str = "gate"

    def setup(self):
        c = self.cfg
        h, hkv, hd = c.num_attention_heads, c.kv_heads, c.head_dim

        def proj(name, features, axes, bias):
            lora = self.lora if name in self.lora_targets else None
            return Dense(features, axes, use_bias=bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, lora=lora, name=name)

        self.q_proj = proj("q_proj", h * hd, ("embed", "heads"), c.qkv_bias)
        self.k_proj = proj("k_proj", hkv * hd, ("embed", "kv"), c.qkv_bias)
        self.v_proj = proj("v_proj", hkv * hd, ("embed", "kv"), c.qkv_bias)
        self.o_proj = proj("o_proj", c.hidden_size, ("heads", "embed"), False)
        self.v_kv_proj = proj("v_kv_proj", 2 * hkv * hd, ("embed", "kv"), True)
        if self.fusion == "gate":
            self.gate_proj = proj("gate_proj", hd, (None, None), True)

    def visual_kv(self, xv, tile_positions):
        """xv: normed image features [B, T, P, D_model]; tile_positions [B, T] (MI-Rope).
        Returns k, v [B, Hkv, T * P, D]."""
        c = self.cfg
        b, t, p, _ = xv.shape
        kv = self.v_kv_proj(xv).reshape(b, t, p, c.kv_heads, 2, c.head_dim)
        k = mi_rope(kv[..., 0, :], tile_positions, c.rope_theta)

        def kv_major(x):  # [B, T, P, Hkv, D] -> [B, Hkv, T * P, D]
            return x.transpose(0, 3, 1, 2, 4).reshape(b, c.kv_heads, t * p, c.head_dim)
        return kv_major(k), kv_major(kv[..., 1, :])

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, deterministic=True,
                 side=None, layer_key=None):
        c = self.cfg
        h, hkv, hd = c.num_attention_heads, c.kv_heads, c.head_dim
        b, l, _ = x.shape
        q = self.q_proj(x, deterministic).reshape(b, l, h, hd)
        k = self.k_proj(x, deterministic).reshape(b, l, hkv, hd)
        v = self.v_proj(x, deterministic).reshape(b, l, hkv, hd)
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_len", "act_heads", None))
        k = apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_new = k.transpose(2, 0, 1, 3).reshape(hkv * b, l, hd)
            v_new = v.transpose(2, 0, 1, 3).reshape(hkv * b, l, hd)
            new_cache = {"k": write_cache(cache["k"], k_new, cache_index, hkv),
                         "v": write_cache(cache["v"], v_new, cache_index, hkv)}
        visual = None if side is None else side.get("visual")
        if visual is None:
            o = self._text_attention(q, k, v, mask, new_cache)
        else:
            kv = visual[layer_key]
            vk = kv["k"].astype(self.dtype)                       # [B, Hkv, T * P, D]
            vv = kv["v"].astype(self.dtype)
            tiles = visual_mask(side["positions"], visual, self.fusion, side.get("segment_ids"))
            seen = blockwise.Keys(vk, vv, TileMask(tiles, vk.shape[2] // tiles.shape[-1]),
                                  "bhkd")
            if self.fusion == "gate":
                ctx_t = self._text_attention(q, k, v, mask, new_cache)
                ctx_v = blockwise.attend(q, [seen])
                g = jax.nn.sigmoid(self.gate_proj(ctx_t, deterministic))
                mixed = ctx_t * (1 - g) + ctx_v * g
                o = jnp.where(tiles.any(-1)[:, :, None, None], mixed, ctx_t)
            else:
                if new_cache is None:
                    text = blockwise.Keys(k, v, mask)
                else:  # [Hkv * B, S, D] viewed as [Hkv, B, S, D]
                    view = (hkv, b, new_cache["k"].shape[1], hd)
                    text = blockwise.Keys(new_cache["k"].astype(self.dtype).reshape(view),
                                          new_cache["v"].astype(self.dtype).reshape(view),
                                          mask, "hbkd")
                o = blockwise.attend(q, [seen, text])
        o = self.o_proj(o.reshape(b, l, h * hd), deterministic)
        return o, new_cache

    def _text_attention(self, q, k, v, mask, new_cache):
        if new_cache is None:
            return attention(q, k, v, mask=mask, softmax_fp32=True)
        return cached_attention(q, new_cache["k"].astype(self.dtype),
                                new_cache["v"].astype(self.dtype), mask)


class HyperLayer(nn.Module):
    """A Qwen2 layer (LlamaLayer's params and names) with HyperAttention; `side` as the
    module docstring says."""
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()
    layer_index: int = 0
    fusion: str = "gate"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                  lora_targets=self.lora_targets)
        eps = self.cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(eps, self.param_dtype)
        self.self_attn = HyperAttention(self.cfg, **kw, fusion=self.fusion)
        self.post_attention_layernorm = RMSNorm(eps, self.param_dtype)
        self.mlp = LlamaMLP(self.cfg, **kw)

    @property
    def key(self) -> str:
        return f"layers_{self.layer_index}"

    def visual_kv(self, image_embeds, tile_positions):
        """image_embeds [B, T, P, D_model] (projected features) -> this layer's k, v
        [B, Hkv, T * P, D]."""
        return self.self_attn.visual_kv(self.input_layernorm(image_embeds.astype(self.dtype)),
                                        tile_positions)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, deterministic=True,
                 side=None):
        if self.is_initializing():  # create v_kv_proj (and the gate) whatever the inputs
            probe = jnp.zeros((1, 1, 1, x.shape[-1]), self.dtype)
            k, _ = self.visual_kv(probe, jnp.zeros((1, 1), jnp.int32))
            if self.fusion == "gate":
                self.self_attn.gate_proj(k[..., 0, :])
        a, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                                      cache_index, deterministic, side, self.key)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x), deterministic)
        return constrain(x, ("act_batch", "act_len", "act_embed")), new_cache
