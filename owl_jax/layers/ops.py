"""The ops a backend may run with its own kernels. Layers call these, never a backend.

Each is XLA's op by default. Inside `use(backend)`, what is traced asks the backend first
(`backend.matmul_applies(x, w)`, `backend.attention_applies(q, k, v)`) and runs its kernel
where it applies: `owl_jax.generate.cpu` routes a decode step's matmuls and attention to its
C++ kernels this way. Training never installs one (the kernels have no gradient).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax.numpy as jnp

_backend = contextvars.ContextVar("owl_jax_ops_backend", default=None)


@contextlib.contextmanager
def use(backend):
    """Routes the ops to `backend` (None: XLA's) for what is traced inside."""
    token = _backend.set(backend)
    try:
        yield
    finally:
        _backend.reset(token)


def matmul(x, w):
    """x [..., K] @ w [K, N]."""
    b = _backend.get()
    if b is not None and b.matmul_applies(x, w):
        return b.matmul(x, w)
    return jnp.dot(x, w)


def int8_matmul(x, w, scale):
    """x @ (w int8 [K, N] * scale [N]), approximately where a backend quantizes x too."""
    b = _backend.get()
    if b is not None and b.matmul_applies(x, w):
        return b.int8_matmul(x, w, scale)
    return jnp.dot(x, w.astype(x.dtype)) * scale.astype(x.dtype)


def materialize(x):
    """x computed once, where a backend can keep XLA from fusing it into every consumer."""
    b = _backend.get()
    return x if b is None else b.materialize(x)


def cached_attention(q, k, v, mask):
    """The backend's attention for q [N, R, D] against k, v [N, S, D], or None where none
    applies (the caller then runs XLA's)."""
    b = _backend.get()
    if b is not None and b.attention_applies(q, k, v):
        return b.attention(q, k, v, mask)
    return None
