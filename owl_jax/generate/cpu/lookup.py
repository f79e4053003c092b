"""Prompt lookup: draft tokens for greedy decoding from the sequence itself (traced, jit-safe).

As HF's `prompt_lookup_num_tokens` (PromptLookupCandidateGenerator): take the sequence's last n
tokens (n = max_ngram, then smaller), find their first earlier occurrence, and propose the up to
k tokens that followed it. The generation engine checks the draft in one pass
(`speculative`). It pays where the output repeats the prompt or itself (quoting, lists,
loops); a rejected draft costs the pass with k more rows.
"""
from __future__ import annotations

import jax.numpy as jnp


def draft(seq, cur, k: int, max_ngram: int):
    """seq int32 [B, L]: the tokens so far (-1 for padding, image slots and not yet made; the
    first `cur` columns are known). Returns (tokens int32 [B, k], n int32 [B]): the draft, of
    which the first n are real (n = 0: no match; the rest are 0)."""
    b, length = seq.shape
    idx = jnp.arange(length)
    start = jnp.full((b,), -1, jnp.int32)   # where the draft starts in seq, -1: not found yet
    for n in range(max_ngram, 0, -1):
        tail = jnp.stack([seq[jnp.arange(b), cur - n + j] for j in range(n)], 1)   # [B, n]
        # windows [i, i + n) followed by at least one known token (i + n < cur), of a tail
        # that exists and holds no padding or image slot
        match = ((idx[None, :] + n < cur) & (cur >= n)
                 & jnp.all(tail >= 0, 1, keepdims=True))
        for j in range(n):
            match &= jnp.roll(seq, -j, axis=1) == tail[:, j:j + 1]
        first = jnp.argmax(match, axis=1).astype(jnp.int32)
        start = jnp.where((start < 0) & match.any(1), first + n, start)
    at = start[:, None] + jnp.arange(k)[None, :]
    real = (start[:, None] >= 0) & (at < cur)
    tokens = jnp.take_along_axis(seq, jnp.clip(at, 0, length - 1), axis=1)
    real &= tokens >= 0  # an image slot or padding ends the draft
    n_real = jnp.sum(jnp.cumprod(real, axis=1), axis=1).astype(jnp.int32)
    return jnp.where(jnp.arange(k)[None, :] < n_real[:, None], tokens, 0), n_real
