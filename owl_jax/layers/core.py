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

from owl_jax.layers import ops

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
        if kernel.dtype == jnp.int8:  # int8 values and their per-column scale (the self-draft)
            y = ops.int8_matmul(x, kernel, self.get_variable("params", "kernel_scale"))
        else:
            kernel = kernel.astype(self.dtype)
            y = ops.matmul(x, kernel)
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
