"""Attention over one or more key sets with one softmax, computed densely or block by block.

`attend(q, parts)` is LLaMA's attention (fp32 softmax, scores divided by sqrt(D)) of queries
q [B, Lq, H, D] over every key set of `parts` at once (grouped-query: query head i reads kv
head i // (H // Hkv)). Each part is `Keys(k, v, mask, layout)`:
  - layout "bkhd": k, v [B, Lk, Hkv, D]; "bhkd": [B, Hkv, Lk, D] (kv head major);
    "hbkd": [Hkv, B, Lk, D] (the KV cache, `owl_jax.decoder.llama.init_cache`, viewed by head);
  - mask: bool [B, Lq, Lk], or a structured mask (an object with `dense()` -> that table and
    `block(q_idx [qb], k_idx [kb])` -> bool [B, qb, kb]) that never needs the whole table.

Where all masks are structured and there are at least `MIN_BLOCKWISE` scores per head, the
scores exist one [Q_BLOCK, K_BLOCK] tile at a time (flash attention's schedule in plain XLA:
a running max and sum per query, the values accumulated in fp32), so a prefill over a long
sequence or over many images' features needs memory linear in their length rather than the
[Lq, Lk] score table per head (it is differentiable: training's long visual attention takes it
too). Otherwise the dense path computes the whole table. On TPU / GPU a fused kernel (Pallas,
cuDNN) would do the same schedule faster; this is the portable path, measured on CPU only. The two agree
to rounding (the sums run in another order), except for a query that sees no key at all, which
callers ignore (left padding; text before any image): the dense path gives it the mean of the
values (every score is the same large negative number), the blockwise path zeros.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Q_BLOCK = 512
K_BLOCK = 1024
MIN_BLOCKWISE = 1 << 22   # scores per head (Lq x all keys) from which structured masks go blockwise

_MASKED = jnp.finfo(jnp.float32).min


class Keys(NamedTuple):
    k: jax.Array
    v: jax.Array
    mask: Any
    layout: str = "bkhd"


def _length(part: Keys) -> int:
    return part.k.shape[part.layout.index("k")]


def _dense_mask(mask):
    return mask.dense() if hasattr(mask, "dense") else mask


def _scores(q, part: Keys, mask):
    """fp32 scaled scores [B, Hkv, G, Lq, Lk], masked; q [B, Lq, Hkv, G, D]."""
    d = q.shape[-1]
    s = jnp.einsum(f"bqhgd,{part.layout}->bhgqk", q, part.k) / jnp.asarray(math.sqrt(d), q.dtype)
    return jnp.where(mask[:, None, None], s.astype(jnp.float32), _MASKED)


def _weighted(p, part: Keys, dtype):
    """p [B, Hkv, G, Lq, Lk] times the part's values -> [B, Lq, Hkv, G, D]."""
    return jnp.einsum(f"bhgqk,{part.layout}->bqhgd", p.astype(dtype), part.v)


def attend(q, parts, *, q_block: int | None = None, k_block: int | None = None,
           min_blockwise: int | None = None):
    """Attention of q [B, Lq, H, D] over all `parts` (a list of Keys) with one softmax;
    returns [B, Lq, H, D] in the values' dtype. Block sizes and the threshold default to the
    module's Q_BLOCK, K_BLOCK and MIN_BLOCKWISE."""
    q_block, k_block = q_block or Q_BLOCK, k_block or K_BLOCK
    min_blockwise = MIN_BLOCKWISE if min_blockwise is None else min_blockwise
    b, lq, h, d = q.shape
    hkv = parts[0].k.shape[parts[0].layout.index("h")]
    qg = q.reshape(b, lq, hkv, h // hkv, d)
    structured = all(hasattr(p.mask, "block") for p in parts)
    if structured and lq * sum(_length(p) for p in parts) >= min_blockwise:
        out = _blockwise(qg, parts, q_block, k_block)
    else:
        scores = [_scores(qg, p, _dense_mask(p.mask)) for p in parts]
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
        out, at = 0, 0
        for part, s in zip(parts, scores):
            n = s.shape[-1]
            out = out + _weighted(probs[..., at:at + n], part, part.v.dtype)
            at += n
    return out.reshape(b, lq, h, d).astype(parts[0].v.dtype)


def _blocks(length: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering `length`; the last block is moved back to end
    at `length` (it overlaps its neighbour instead of running past the end)."""
    block = min(block, length)
    return block, -(-length // block)


def _key_block(part: Keys, j, kb: int, lk: int):
    """Block j of the part's keys and values, and their key indices; keys a previous block
    already covered (the last block, moved back) are marked invalid."""
    axis = part.layout.index("k")
    start = jnp.minimum(j * kb, lk - kb)
    k = jax.lax.dynamic_slice_in_dim(part.k, start, kb, axis)
    v = jax.lax.dynamic_slice_in_dim(part.v, start, kb, axis)
    idx = start + jnp.arange(kb)
    return Keys(k, v, part.mask, part.layout), idx, idx >= j * kb


def _blockwise(qg, parts, q_block: int, k_block: int):
    b, lq, hkv, g, d = qg.shape
    qb, nq = _blocks(lq, q_block)
    acc_dtype = jnp.float32

    def query_block(i, out):
        start = jnp.minimum(i * qb, lq - qb)
        q = jax.lax.dynamic_slice_in_dim(qg, start, qb, 1)
        q_idx = start + jnp.arange(qb)
        m = jnp.full((b, hkv, g, qb), _MASKED, jnp.float32)
        total = jnp.zeros((b, hkv, g, qb), jnp.float32)
        acc = jnp.zeros((b, qb, hkv, g, d), acc_dtype)
        for part in parts:
            lk = _length(part)
            kb, nk = _blocks(lk, k_block)

            def key_block(j, carry, part=part, lk=lk, kb=kb):
                blk, k_idx, fresh = _key_block(part, j, kb, lk)
                mask = part.mask.block(q_idx, k_idx) & fresh   # not the previous block's keys

                def update(carry):
                    m, total, acc = carry
                    s = _scores(q, blk, mask)
                    m_new = jnp.maximum(m, s.max(-1))
                    scale = jnp.exp(m - m_new)
                    p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
                    total = total * scale + p.sum(-1)
                    acc = (acc * scale.transpose(0, 3, 1, 2)[..., None]
                           + _weighted(p, blk, acc_dtype))
                    return m_new, total, acc
                # a block no query of this block sees (above the causal diagonal, images
                # later in the text) costs nothing
                return jax.lax.cond(mask.any(), update, lambda c: c, carry)

            m, total, acc = jax.lax.fori_loop(0, nk, key_block, (m, total, acc))
        o = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny).transpose(0, 3, 1, 2)[..., None]
        return jax.lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), start, 1)

    out = jnp.zeros((b, lq, hkv, g, d), parts[0].v.dtype)
    return jax.lax.fori_loop(0, nq, query_block, out)
