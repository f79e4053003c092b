"""SigLIP vision tower (transformers' SiglipVisionTransformer numerics and module names).

Patch conv with bias (no CLS token, no pre-LayerNorm), learned position table of
(image_size // patch_size)^2 rows, pre-LN blocks with separate q/k/v/out projections (all with
biases) and tanh-approximated GELU, then `post_layernorm`. The attention-pool head of the HF
class is not built (mPLUG-Owl3 never reads it; converters drop its keys).

`feature_layer` k returns HF's `hidden_states[k]` (0: the embeddings, k: the output of layer k,
negative counts from the end) without the post-LayerNorm; None returns the last layer after
`post_layernorm` (HF's `last_hidden_state`). mPLUG-Owl3 reads `hidden_states[-2]`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.layers.attention import attention
from owl_jax.layers.core import Dense, LayerNorm, constrain, param_with_axes

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Defaults: transformers' SiglipVisionConfig class defaults."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid ** 2


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class SiglipEmbeddings(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [N, H, W, C] (NHWC) -> [N, grid^2, D]. A side that is not a multiple of
        the patch loses its last pixels (a VALID conv), as torch's stride-p Conv2d does."""
        c = self.cfg
        d = c.hidden_size
        patches = nn.Conv(d, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), (None, None, None, "embed")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ("embed",)),
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        n = patches.shape[0]
        patches = patches.reshape(n, -1, d)  # row-major over the grid, as torch flatten(2)
        if patches.shape[1] != c.num_positions:
            raise ValueError(f"images of {pixel_values.shape[1]}x{pixel_values.shape[2]} px make "
                             f"{patches.shape[1]} patches; the position table has "
                             f"{c.num_positions} ({c.image_size} px, patch {c.patch_size})")
        pos = param_with_axes(self, "position_embedding", nn.initializers.normal(0.02),
                              (c.num_positions, d), self.param_dtype, (None, "embed"))
        return patches + pos[None].astype(self.dtype)


class SiglipAttention(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, l, _ = x.shape
        q, k, v = (Dense(c.hidden_size, ("embed", "heads"), **kw, name=name)(x).reshape(n, l, h, hd)
                   for name in ("q_proj", "k_proj", "v_proj"))
        o = attention(q, k, v, softmax_fp32=True, scale_after="mul").reshape(n, l, c.hidden_size)
        return Dense(c.hidden_size, ("heads", "embed"), **kw, name="out_proj")(o)


class SiglipMLP(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(c.intermediate_size, ("embed", "mlp"), **kw, name="fc1")(x)
        h = constrain(gelu_tanh(h), ("act_batch", "act_len", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), **kw, name="fc2")(h)


class SiglipLayer(nn.Module):
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.cfg.layer_norm_eps
        x = x + SiglipAttention(self.cfg, **kw, name="self_attn")(
            LayerNorm(eps, self.param_dtype, name="layer_norm1")(x))
        x = x + SiglipMLP(self.cfg, **kw, name="mlp")(
            LayerNorm(eps, self.param_dtype, name="layer_norm2")(x))
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class SiglipVisionTransformer(nn.Module):
    """pixel_values [N, H, W, C] -> [N, grid^2, D] (see the module docstring for
    `feature_layer`). Every layer's params and post_layernorm are created (checkpoints hold
    them); layers after the tapped one are not run."""
    cfg: SiglipConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    feature_layer: int | None = None

    def layers_used(self) -> int:
        n, k = self.cfg.num_hidden_layers, self.feature_layer
        if k is None:
            return n
        if not -(n + 1) <= k <= n:
            raise ValueError(f"feature layer {k} is out of range for a {n}-layer SigLIP tower "
                             f"(hidden states {-(n + 1)} .. {n})")
        return k % (n + 1)

    @nn.compact
    def __call__(self, pixel_values):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, used = self.cfg.num_hidden_layers, self.layers_used()
        x = SiglipEmbeddings(self.cfg, **kw, name="embeddings")(pixel_values)
        layer = nn.remat(SiglipLayer) if self.remat else SiglipLayer
        tapped = x
        for i in range(n if self.is_initializing() else used):
            x = layer(self.cfg, **kw, name=f"layers_{i}")(x)
            if i + 1 == used:
                tapped = x
        post = LayerNorm(self.cfg.layer_norm_eps, self.param_dtype, name="post_layernorm")
        if self.feature_layer is None:
            return post(x)
        if self.is_initializing():
            post(x)  # checkpoints hold it: create its params
        return tapped
