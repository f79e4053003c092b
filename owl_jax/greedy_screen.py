"""Exact greedy tokens that read a bf16 copy of the lm_head: half the head's bytes per step.

A decode step at batch 1-8 streams every weight once, and the lm_head is the largest matrix
(a fifth of the bytes of the benchmark's 12-layer 768-wide model). Greedy decoding needs only
the argmax of the logits, so a step:
1. computes approximate logits a = h @ bf16(W), reading 2 bytes per weight instead of 4;
2. bounds every fp32 logit: L_v <= a_v + ||h||_2 * bound_v, where bound_v covers column v's
   bf16 rounding and the fp32 rounding of both sums (`prepare`);
3. the columns whose upper bound reaches the largest lower bound are the candidates: the argmax
   is among them and every other logit is strictly below it. Their logits are computed
   exactly as the fp32 kernel computes them (the same fused multiply-adds in the same order,
   so the same bits), and the first index of the largest is the token `sampling.greedy`
   would pick from the full fp32 logits (`decode_kernels.greedy_screen`, one pass in C++);
4. rows with more than a few candidates (near-ties), inf or NaN get the full fp32 logits,
   computed only in a step where some row needs them.
So the tokens are those of the plain fp32 path, bit for bit; tests/test_greedy_screen.py checks
that, the bound, and the fallback. The generation engine uses it for plain greedy decoding
(no sampling, penalties, n-gram bans or beams) where the decode kernels run and the vocabulary
is at least `decode_kernels.ROW_SPLIT_BELOW_N` wide (narrower heads sum in another order). It
keeps the bf16 copy next to the fp32 head: half the head's size in memory again.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from owl_jax import decode_kernels, sampling

_EPS = 2.0 ** -24  # fp32 unit roundoff


def applies(w) -> bool:
    """For an fp32 head kernel [D, V] inside `decode_kernels.enabled()`."""
    return (w.dtype == jnp.float32 and w.ndim == 2
            and w.shape[1] >= decode_kernels.ROW_SPLIT_BELOW_N
            and decode_kernels.matmul_applies(jax.ShapeDtypeStruct((1, w.shape[0]), w.dtype), w))


def prepare(w) -> dict:
    """The bf16 copy of head kernel w [D, V] and the per-column bound: |L_v - a_v| <= ||h|| *
    bound_v, with e_v = ||W_v - bf16(W_v)|| (Cauchy-Schwarz) and gamma_D (||W_v|| +
    ||bf16(W_v)||) for the two fp32 sums of D fused multiply-adds (Higham's gamma_n bound),
    computed in float64 and padded by 0.1%."""
    w = np.asarray(w, np.float32)
    d = w.shape[0]
    wb = w.astype(ml_dtypes.bfloat16)
    err2 = np.zeros(w.shape[1])
    norm2 = np.zeros(w.shape[1])
    normb2 = np.zeros(w.shape[1])
    for r in range(0, d, 256):  # float64 a block of rows at a time (a 7B head is 0.5 GB)
        a = w[r:r + 256].astype(np.float64)
        b = wb[r:r + 256].astype(np.float64)
        err2 += ((a - b) ** 2).sum(0)
        norm2 += (a * a).sum(0)
        normb2 += (b * b).sum(0)
    gamma = d * _EPS / (1 - d * _EPS)
    bound = 1.001 * (np.sqrt(err2) + gamma * (np.sqrt(norm2) + np.sqrt(normb2))) + 1e-30
    return {"w": jnp.asarray(wb), "bound": jnp.asarray(bound.astype(np.float32) * (1 + 2 ** -20))}


def tokens(h, w, screen):
    """Greedy tokens int32 [B] for final hidden states h fp32 [B, D] and head kernel w fp32
    [D, V]: `sampling.greedy(h @ w)` with the fp32 decode kernel, exactly."""
    approx = decode_kernels.matmul(h, screen["w"])
    tok, safe = decode_kernels.greedy_screen(h, w, approx, screen["bound"])

    def full():
        return jnp.where(safe, tok, sampling.greedy(decode_kernels.matmul(h, w)))

    return jax.lax.cond(jnp.all(safe), lambda: tok, full)
