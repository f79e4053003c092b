"""Building blocks shared by the ViT, the abstractor and LLaMA.

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `norm`,
`layers`); `owl_jax.sharding` maps them onto mesh axes. Nothing here knows the mesh.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax import decode_kernels

Dtype = jnp.dtype
Axes = Sequence[str | None]


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: Axes):
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


def constrain(x, axes: Axes):
    """Activation sharding hint by logical names (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """LoRA on a Dense: y = x W + (alpha / rank) * dropout(x) A B."""
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Dense(nn.Module):
    """A Dense layer with logical axis names on its kernel and an optional LoRA adapter.

    `kernel` is [in, out] (the transpose of a PyTorch Linear weight).
    """
    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        d_in = x.shape[-1]
        kernel = param_with_axes(self, "kernel", self.kernel_init, (d_in, self.features),
                                 self.param_dtype, self.axes)
        x = x.astype(self.dtype)
        if kernel.dtype == jnp.int8:  # int8 values and their per-column scale (owl_jax.self_draft)
            y = decode_kernels.int8_matmul(x, kernel, self.get_variable("params", "kernel_scale"))
        else:
            kernel = kernel.astype(self.dtype)
            y = (decode_kernels.matmul(x, kernel) if decode_kernels.matmul_applies(x, kernel)
                 else jnp.dot(x, kernel))
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                                   self.param_dtype, self.axes[1:])
            y = y + bias.astype(self.dtype)
        if self.lora is not None:
            # PEFT's init: A Kaiming-uniform, B zero, so training starts at the base model.
            a = param_with_axes(self, "lora_a", nn.initializers.variance_scaling(
                1 / 3, "fan_in", "uniform", in_axis=0, out_axis=1),
                (d_in, self.lora.rank), self.param_dtype, (self.axes[0], None))
            b = param_with_axes(self, "lora_b", nn.initializers.zeros,
                                (self.lora.rank, self.features), self.param_dtype,
                                (None, self.axes[1]))
            h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
            y = y + (h @ a.astype(self.dtype) @ b.astype(self.dtype)) * self.lora.scale
        return y


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 and cast back to the input dtype (the official LayerNormFp32)."""
    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype,
                                ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype,
                               ("norm",))
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return h.astype(x.dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: fp32 statistics, cast to the input dtype, then times the weight."""
    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype,
                                ("norm",))
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * h.astype(x.dtype)


def scanned_layers(body, length: int, *, remat: bool = False, policy=None, in_axes=0,
                   static_argnums=()):
    """`body` (a module class, (carry, *args) -> (carry, None)) scanned `length` times: each
    layer has its own params, stacked on a leading `layers` axis, and its own dropout rng;
    rematerialised per layer when `remat`."""
    if remat:
        body = nn.remat(body, policy=policy, prevent_cse=False, static_argnums=static_argnums)
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# --------------------------------------------------------------------------------------------
# Rotary position embedding, HF "rotate_half" convention (q/k weights in HF layout).


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin [B, L, head_dim] for integer positions [B, L], computed in fp32 as HF does and
    rounded to the activation dtype."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    # computed once per forward: fused into every layer's q / k RoPE, XLA (CPU) evaluates each
    # cos and sin once per head and layer (1 ms of a batch-8 decode step; a no-op off the
    # decode kernels)
    return (decode_kernels.materialize(jnp.cos(emb).astype(dtype)),
            decode_kernels.materialize(jnp.sin(emb).astype(dtype)))


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
    see `owl_jax.models.llama.init_cache`); mask bool [B, Lq, S]. Both matmuls read the cache as
    stored, with no unit dimension to squeeze at batch 1: otherwise XLA (CPU) transposes or
    copies the whole cache of every layer at every decode step.
    """
    b, lq, h, d = q.shape
    hkv = k.shape[0] // b
    g = h // hkv
    q = q.reshape(b, lq, hkv, g, d).transpose(2, 0, 3, 1, 4).reshape(hkv * b, g * lq, d)
    mask = jnp.broadcast_to(mask[None, :, None], (hkv, b, g, lq, mask.shape[-1]))
    mask = mask.reshape(hkv * b, g * lq, -1)
    if decode_kernels.attention_applies(q, k, v):  # a decode step on CPU, see generate.py
        o = decode_kernels.attention(q, k, v, mask)
    else:
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
