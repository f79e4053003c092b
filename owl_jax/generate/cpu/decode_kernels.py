"""CPU kernels for a decode step, and the switch that routes to them.

At batch 1 to 8 a decode step is a stream over the LLM's weights and its KV cache, with little
arithmetic per byte. XLA's CPU library calls are built for larger work: its dot packs the weights
into panels first (at M <= 8 rows that costs more memory traffic than the product), and its
cached attention runs one tiny GEMM per head. `decode_kernels.cc` has two XLA FFI targets
that stream the weights and the cache once, in place, on as many threads as XLA's intra-op
pool has:
- `matmul(x, w)`: x [..., K] @ w [K, N] for up to `MAX_ROWS` rows;
- `attention(q, k, v, mask)`: the decode step's attention against the KV cache; it reads only
  the cache slots up to the last unmasked one.
Measured on 2 cores in docs/inference.md (Speed).

The kernels are compiled on first use for this machine's CPU (they need AVX-512; see
`owl_jax.native`). Where they cannot be built, or with `OWL_JAX_DECODE_KERNELS=0`, the XLA path
runs instead, after one warning saying why.

Only code that opts in uses them: inside `enabled()` this module is the backend of
`owl_jax.layers.ops`, whose `matmul` / `cached_attention` (called by `Dense` and the decoder's
attention) ask `matmul_applies` / `attention_applies`. The generation
engine does for its single-device CPU runs; training never does (the kernels have no gradient).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import platform
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax import native
from owl_jax.layers import ops

log = logging.getLogger(__name__)

MATMUL = "owl_small_m_matmul"
MATMUL_BF16W = "owl_small_m_matmul_bf16w"  # fp32 x, bf16 w (greedy_screen's head copy)
MATMUL_S8W = "owl_small_m_matmul_s8w"  # fp32 x, int8 w (its int8 copy)
_MATMUL_TARGETS = {jnp.dtype(jnp.float32): MATMUL, jnp.dtype(jnp.bfloat16): MATMUL_BF16W,
                   jnp.dtype(jnp.int8): MATMUL_S8W}  # by the weights' dtype
INT8_MATMUL = "owl_int8_matmul"  # x quantized to int8 too (generate.cpu.self_draft's draft model)
ATTENTION = "owl_cached_attention"
GREEDY_SCREEN = "owl_greedy_screen"
MATERIALIZE = "owl_materialize"
MAX_ROWS = 16  # above this XLA's GEMM is the better matmul
ROW_SPLIT_BELOW_N = 4096  # narrower w: the matmul kernel splits K between threads
MAX_QUERIES = 16  # query rows per kv head (grouped heads x new tokens) for the attention kernel
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.cc")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17"]

# With the decode kernels doing a step's matmuls and attention, what XLA runs around them is
# small: the RMSNorm sums over [B, D], the greedy screen fallback's max. XLA's default sends
# such reductions (and dots) to YNNPACK, one library call each, which costs more than the sum:
# with YNNPACK off, the decode step ran 4% (batch 1) and 6.5% (batch 8) faster in an interleaved
# A/B on benchmarks/decode.py's model, with the same tokens (Eigen takes the prefill's dots, at
# the same speed).
COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

_enabled = contextvars.ContextVar("owl_decode_kernels", default=False)
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str (set once)


def available() -> bool:
    """Whether the kernels are built and registered (builds them on the first call)."""
    with _lock:
        if "ok" not in _state:
            why = ""
            if os.environ.get("OWL_JAX_DECODE_KERNELS", "1") == "0":
                why = "OWL_JAX_DECODE_KERNELS=0"
            elif (platform.machine() not in ("x86_64", "AMD64")
                  or "avx512f" not in native.cpu_flags()):
                why = "the CPU has no AVX-512"
            else:
                try:
                    lib = ctypes.cdll.LoadLibrary(native.build(
                        SOURCE, [*FLAGS, f"-I{jax.ffi.include_dir()}"], jax.__version__))
                    for name in (MATMUL, MATMUL_BF16W, MATMUL_S8W, INT8_MATMUL, ATTENTION,
                                 GREEDY_SCREEN, MATERIALIZE):
                        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                                    platform="cpu")
                except (OSError, RuntimeError) as e:
                    why = str(e)
            _state.update(ok=not why, why=why)
            if why:
                log.warning("decode kernels off, XLA's ops are used instead: %s", why)
        return _state["ok"]


@contextlib.contextmanager
def enabled(on: bool = True):
    """Within this context, `matmul_applies` / `attention_applies` can say yes, and the layers'
    ops (`owl_jax.layers.ops`) ask them."""
    on = on and available()
    token = _enabled.set(on)
    try:
        with ops.use(sys.modules[__name__] if on else None):
            yield
    finally:
        _enabled.reset(token)


def matmul_applies(x, w) -> bool:
    """fp32 x [..., K] with at most MAX_ROWS rows, fp32, bf16 or int8 w [K, N]."""
    rows = int(np.prod(x.shape[:-1]))
    return (_enabled.get() and x.dtype == jnp.float32 and w.dtype in _MATMUL_TARGETS
            and w.ndim == 2 and 0 < rows <= MAX_ROWS and x.shape[-1] == w.shape[0] > 0
            and w.shape[1] > 0)


def matmul(x, w):
    """x [..., K] @ w [K, N] in fp32 (see `matmul_applies`); bf16 and int8 w are widened
    exactly."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[1],), jnp.float32)
    return jax.ffi.ffi_call(_MATMUL_TARGETS[jnp.dtype(w.dtype)], out)(x, w)


def int8_matmul(x, w, scale):
    """x fp32 [..., K] @ (w int8 [K, N] * scale fp32 [N]), approximately: inside `enabled()`
    for at most MAX_ROWS rows, the int8 kernel (x quantized per row to int8 as well: sx =
    max |x| / 127, y = float(sum_k round(x_k / sx) w_kn) * sx * scale_n); elsewhere x times the
    widened weights in XLA."""
    if matmul_applies(x, w):
        out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[1],), jnp.float32)
        return jax.ffi.ffi_call(INT8_MATMUL, out)(x, w, scale)
    return jnp.dot(x, w.astype(x.dtype)) * scale.astype(x.dtype)


def greedy_screen(h, w, approx, bound):
    """(token int32 [M], safe bool [M]) for fp32 h [M, K], w [K, N], approx [M, N] and bound
    [N]: see `owl_jax.generate.cpu.greedy_screen` and decode_kernels.cc (GreedyScreen)."""
    m = h.shape[0]
    return jax.ffi.ffi_call(GREEDY_SCREEN, (jax.ShapeDtypeStruct((m,), jnp.int32),
                                            jax.ShapeDtypeStruct((m,), jnp.bool_)))(
        h, w, approx, bound)


def materialize(x):
    """x, computed once: an identity XLA cannot fuse into consumers (inside `enabled()`; else
    x itself). For values that many fusions read, like the decode step's RoPE cos and sin."""
    if not _enabled.get():
        return x
    return jax.ffi.ffi_call(MATERIALIZE, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def attention_applies(q, k, v) -> bool:
    """q [N, R, D], k and v [N, S, D] in fp32 with few query rows R."""
    return (_enabled.get() and all(a.dtype == jnp.float32 for a in (q, k, v))
            and 0 < q.shape[1] <= MAX_QUERIES and q.shape[2] > 0 and k.shape[1] > 0)


def attention(q, k, v, mask):
    """softmax(where(mask, q k^T / sqrt(D), min)) v for q [N, R, D], k and v [N, S, D],
    mask bool [N, R, S] -> [N, R, D] (see `attention_applies`)."""
    return jax.ffi.ffi_call(ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))(q, k, v, mask)
