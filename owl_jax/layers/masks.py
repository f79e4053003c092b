"""Attention masks and RoPE positions for full sequences, packed rows and cached decoding.

All masks are bool [B, Lq, Lk], True where a query may attend a key. `CacheMask` is
`cache_mask`'s structured form: blockwise attention (`owl_jax.layers.blockwise`) reads it a
block at a time, without the whole table.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def segment_mask(segment_ids):
    """Causal mask that never crosses a segment boundary. segment_ids [B, L] (0 = padding).

    With no packing, pass ones (or 1 for tokens, 0 for padding): padding sits after the real
    tokens, so real tokens never see it, as in the official training forward.
    """
    l = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((l, l), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


def segment_positions(segment_ids):
    """RoPE positions that restart at 0 at the start of every segment. [B, L] int32."""
    l = segment_ids.shape[1]
    idx = jnp.arange(l, dtype=jnp.int32)[None]
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    seg_start = jnp.where(start, idx, 0)
    return idx - jax.lax.cummax(seg_start, axis=1)


def cache_mask(kv_valid, q_slots):
    """Mask for a chunk written into a KV cache.

    kv_valid: bool [B, S], False for left padding (and anything never written);
    q_slots: int [Lq], the cache slot each query was written to. A query sees valid keys at
    slots <= its own.
    """
    s = kv_valid.shape[1]
    causal = jnp.arange(s)[None, :] <= q_slots[:, None]  # [Lq, S]
    return causal[None] & kv_valid[:, None, :]


@flax.struct.dataclass
class CacheMask:
    """`cache_mask(kv_valid, q_slots)` without the [Lq, S] table (kv_valid bool [B, S], q_slots
    int [Lq])."""
    kv_valid: jax.Array
    q_slots: jax.Array

    def dense(self):
        return cache_mask(self.kv_valid, self.q_slots)

    def block(self, q_idx, k_idx):
        """bool [B, qb, kb] for queries q_idx [qb] and key slots k_idx [kb]."""
        seen = k_idx[None, :] <= self.q_slots[q_idx][:, None]
        return seen[None] & self.kv_valid[:, k_idx][:, None, :]
