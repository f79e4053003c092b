"""Exact greedy tokens that read an int8 (or bf16) copy of the lm_head instead of the fp32 one.

A decode step at batch 1-8 streams every weight once, and the lm_head is the largest matrix
(a fifth of the bytes of the benchmark's 12-layer 768-wide model). Greedy decoding needs only
the argmax of the logits, so a step:
1. computes approximate logits a = h @ Q from the copy Q (int8 values times a per-column scale,
   a quarter of the head's bytes; or bf16, half);
2. bounds every fp32 logit: L_v <= a_v + ||h||_2 * bound_v, where bound_v covers column v's
   quantization error and the fp32 rounding of both sums (`prepare`);
3. the columns whose upper bound reaches the largest lower bound are the candidates: the argmax
   is among them and every other logit is strictly below it. Their logits are computed
   exactly as the fp32 kernel computes them (the same fused multiply-adds in the same order,
   so the same bits), and the first index of the largest is the token `sampling.greedy`
   would pick from the full fp32 logits (`decode_kernels.greedy_screen`, one pass in C++);
4. rows with more than 64 candidates (near-ties), inf or NaN get the full fp32 logits,
   computed only in a step where some row needs them.
So the tokens are those of the plain fp32 path, bit for bit; tests/test_greedy_screen.py checks
that, the bound, and the fallback. The generation engine uses it for plain greedy decoding
(no sampling, penalties, n-gram bans or beams) where the decode kernels run and the vocabulary
is at least `decode_kernels.ROW_SPLIT_BELOW_N` wide (narrower heads sum in another order). It
keeps the copy next to the fp32 head (a quarter of the head's size in memory for int8).

int8 against bf16: the int8 bound is ~8x looser, so a row has more candidates (a median of 4
against 1-2 on the benchmark model's own hidden states), each re-scored from a strided column
of the fp32 head. At batch 1 the bytes saved win (decode step 3-11% faster in interleaved A/Bs);
at batch 8 the two are even (docs/inference.md, "Greedy screen").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from owl_jax.generate.cpu import decode_kernels
from owl_jax.generate import sampling

_EPS = 2.0 ** -24  # fp32 unit roundoff


def applies(w) -> bool:
    """For an fp32 head kernel [D, V] inside `decode_kernels.enabled()`."""
    return (w.dtype == jnp.float32 and w.ndim == 2
            and w.shape[1] >= decode_kernels.ROW_SPLIT_BELOW_N
            and decode_kernels.matmul_applies(jax.ShapeDtypeStruct((1, w.shape[0]), w.dtype), w))


def int8_columns(w):
    """w fp32 [K, N] -> (int8 values [K, N], fp32 scale [N]) with w ~ values * scale: each
    column's largest magnitude maps to 127, the rest round to nearest."""
    w = np.asarray(w, np.float32)
    blocks = range(0, w.shape[0], 256)  # a block of rows at a time: a 7B head is 0.5 GB
    top = np.full(w.shape[1], np.finfo(np.float32).tiny, np.float32)
    for r in blocks:
        np.maximum(top, np.abs(w[r:r + 256]).max(0), out=top)
    scale = top / np.float32(127)
    wq = np.empty(w.shape, np.int8)
    for r in blocks:
        wq[r:r + 256] = np.clip(np.rint(w[r:r + 256] / scale), -127, 127)
    return wq, scale


def prepare(w, kind: str = "int8") -> dict:
    """The bf16 or int8 copy of head kernel w [D, V] and the per-column bound: |L_v - a_v| <=
    ||h|| * bound_v, with e_v = ||W_v - Q_v|| (Cauchy-Schwarz; Q is the copy as it is read) and
    gamma_D (||W_v|| + ||Q_v||) for the two fp32 sums of D fused multiply-adds (Higham's gamma_n
    bound), computed in float64 and padded by 0.1%. int8: Q_v = scale_v * int8 values, with
    scale_v = max_k |W_kv| / 127 (a quarter of the head's bytes; the bound is ~8x looser)."""
    w = np.asarray(w, np.float32)
    d = w.shape[0]
    blocks = range(0, d, 256)
    if kind == "bf16":
        wq, scale = w.astype(ml_dtypes.bfloat16), np.ones(w.shape[1], np.float32)
    elif kind == "int8":
        wq, scale = int8_columns(w)
    else:
        raise ValueError(f"greedy screen kind {kind!r}: 'bf16' or 'int8'")
    scale64 = scale.astype(np.float64)
    err2 = np.zeros(w.shape[1])
    norm2 = np.zeros(w.shape[1])
    normb2 = np.zeros(w.shape[1])
    for r in blocks:  # in float64
        a = w[r:r + 256].astype(np.float64)
        b = wq[r:r + 256].astype(np.float64) * scale64
        err2 += ((a - b) ** 2).sum(0)
        norm2 += (a * a).sum(0)
        normb2 += (b * b).sum(0)
    gamma = d * _EPS / (1 - d * _EPS)
    bound = 1.001 * (np.sqrt(err2) + gamma * (np.sqrt(norm2) + np.sqrt(normb2))) + 1e-30
    screen = {"w": jnp.asarray(wq), "bound": jnp.asarray(bound.astype(np.float32) * (1 + 2 ** -20))}
    if kind == "int8":
        screen["scale"] = jnp.asarray(scale)
    return screen


def approx_logits(h, screen):
    """h fp32 [B, D] @ the screen's copy of the head (its int8 values times their scale)."""
    approx = decode_kernels.matmul(h, screen["w"])
    if "scale" in screen:  # one more rounding, covered by the check's margin of |approx|
        approx = approx * screen["scale"]
    return approx


def tokens(h, w, screen):
    """Greedy tokens int32 [B] for final hidden states h fp32 [B, D] and head kernel w fp32
    [D, V]: `sampling.greedy(h @ w)` with the fp32 decode kernel, exactly."""
    tok, safe = decode_kernels.greedy_screen(h, w, approx_logits(h, screen), screen["bound"])

    def full():
        return jnp.where(safe, tok, sampling.greedy(decode_kernels.matmul(h, w)))

    return jax.lax.cond(jnp.all(safe), lambda: tok, full)
