"""Rotary position embedding (HF "rotate_half" convention, q / k weights in HF layout) and
the attention core: full-sequence attention with a mask, and attention against a KV cache."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from owl_jax.layers import blockwise, ops


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin [B, L, head_dim] for integer positions [B, L], computed in fp32 as HF does and
    rounded to the activation dtype."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    # computed once per forward: fused into every layer's q / k RoPE, XLA (CPU) evaluates each
    # cos and sin once per head and layer (1 ms of a batch-8 decode step; a no-op off the
    # decode kernels)
    return (ops.materialize(jnp.cos(emb).astype(dtype)),
            ops.materialize(jnp.sin(emb).astype(dtype)))


def apply_rope(x, cos, sin):
    """x: [B, L, H, D]; cos/sin: [B, L, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --------------------------------------------------------------------------------------------
# Attention core


def attention(q, k, v, *, mask=None, softmax_fp32: bool, scale_after: str = "div"):
    """Multi-head attention. q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask bool [B, Lq, Lk].

    `scale_after` mirrors the reference op order: "div" is `(q.k) / sqrt(D)` (LLaMA, abstractor),
    "mul" is `(q.k) * D**-0.5` (the ViT). Softmax runs in fp32 for LLaMA and in the activation
    dtype for the ViT and the abstractor, as the official model does.

    Grouped-query attention groups the query heads by kv head (query head i reads kv head
    i // (H // Hkv)) instead of repeating k and v.
    """
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, lq, hkv, h // hkv, d)
    s = _scale(jnp.einsum("bqhgd,bkhd->bhgqk", q, k), d, scale_after)
    if softmax_fp32:
        s = s.astype(jnp.float32)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, jnp.finfo(s.dtype).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(b, lq, h, d)


def cached_attention(q, k, v, mask):
    """LLaMA attention (fp32 softmax, "div" scaling) against a KV cache.

    q [B, Lq, H, D]; k and v [Hkv * B, S, D] (kv head major, then batch row:
    see `owl_jax.decoder.llama.init_cache`); mask bool [B, Lq, S]. Both matmuls read the cache as
    stored, with no unit dimension to squeeze at batch 1: otherwise XLA (CPU) transposes or
    copies the whole cache of every layer at every decode step. A structured mask
    (`CacheMask`) over many keys takes the blockwise path (`owl_jax.layers.blockwise`).
    """
    b, lq, h, d = q.shape
    hkv = k.shape[0] // b
    if hasattr(mask, "block"):  # a structured mask (layers.masks.CacheMask)
        if lq * k.shape[1] >= blockwise.MIN_BLOCKWISE:
            view = (hkv, b, k.shape[1], d)
            return blockwise.attend(q, [blockwise.Keys(k.reshape(view), v.reshape(view), mask,
                                                       "hbkd")])
        mask = mask.dense()
    g = h // hkv
    q = q.reshape(b, lq, hkv, g, d).transpose(2, 0, 3, 1, 4).reshape(hkv * b, g * lq, d)
    mask = jnp.broadcast_to(mask[None, :, None], (hkv, b, g, lq, mask.shape[-1]))
    mask = mask.reshape(hkv * b, g * lq, -1)
    o = ops.cached_attention(q, k, v, mask)  # a backend's kernel (a decode step on CPU)
    if o is None:
        s = _scale(jnp.einsum("nqd,nkd->nqk", q, k), d, "div").astype(jnp.float32)
        s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("nqk,nkd->nqd", p, v)
    o = o.reshape(hkv, b, g, lq, d)
    return o.transpose(1, 3, 0, 2, 4).reshape(b, lq, h, d)


def _scale(s, d, scale_after):
    if scale_after == "div":
        return s / jnp.asarray(math.sqrt(d), s.dtype)
    return s * jnp.asarray(d ** -0.5, s.dtype)
