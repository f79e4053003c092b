"""The mPLUG-Owl vision encoder: a CLIP-style ViT-L/14 with the official module names.

Pre-LN blocks with QuickGELU, a fused QKV projection laid out per head as [q|k|v] (so the output
reshapes to [..., heads, 3, head_dim]), and a final LayerNorm over all tokens, CLS included.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from owl_jax.config import VisionConfig
from owl_jax.models.layers import (Dense, LayerNorm, attention, constrain, param_with_axes,
                                   quick_gelu, scanned_layers)


class VisionEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [N, H, W, C] (NHWC) -> [N, 1 + patches, D]."""
        c = self.cfg
        d = c.hidden_size
        patches = nn.Conv(d, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                          use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), (None, None, None, "embed")),
                          name="patch_embed")(pixel_values.astype(self.dtype))
        n = patches.shape[0]
        patches = patches.reshape(n, -1, d)  # row-major over the grid, as torch flatten(2)
        cls = param_with_axes(self, "cls_token", nn.initializers.normal(0.02), (1, 1, d),
                              self.param_dtype, (None, None, "embed"))
        pos = param_with_axes(self, "position_embedding", nn.initializers.normal(0.02),
                              (1, c.num_positions, d), self.param_dtype, (None, None, "embed"))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, d)), patches], 1)
        x = x + pos[:, : x.shape[1]].astype(self.dtype)
        return LayerNorm(c.layer_norm_eps, self.param_dtype, name="pre_layernorm")(x)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        qkv = Dense(3 * c.hidden_size, ("embed", "heads"), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="query_key_value")(x)
        qkv = qkv.reshape(*x.shape[:2], h, 3, hd)
        o = attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], softmax_fp32=False,
                      scale_after="mul")
        o = o.reshape(*x.shape[:2], c.hidden_size)
        return Dense(c.hidden_size, ("heads", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="dense")(o)


class VisionMLP(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = Dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="fc1")(x)
        h = constrain(quick_gelu(h), ("act_batch", "act_len", "act_mlp"))
        return Dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="fc2")(h)


class VisionLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = self.cfg.layer_norm_eps
        x = x + VisionAttention(self.cfg, **kw, name="self_attn")(
            LayerNorm(eps, self.param_dtype, name="input_layernorm")(x))
        x = x + VisionMLP(self.cfg, **kw, name="mlp")(
            LayerNorm(eps, self.param_dtype, name="post_attention_layernorm")(x))
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class _ScanBody(nn.Module):
    """VisionLayer adapted to nn.scan's carry -> (carry, ys) signature."""
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        return VisionLayer(self.cfg, self.dtype, self.param_dtype, name="layer")(x), None


class VisionTransformer(nn.Module):
    """pixel_values [N, H, W, C] -> last_hidden_state [N, 257, D] (post-LN on every token).

    `scan_layers=True`: one scanned block with params stacked on a leading `layers` axis
    (`layers/layer/...`, see `owl_jax.models.owl.scan_params`), so that compile time does not
    grow with depth; otherwise `layers_{i}`, the layout of checkpoints and conversion."""
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, pixel_values):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(self.cfg, **kw, name="embeddings")(pixel_values)
        if self.scan_layers:
            x, _ = scanned_layers(_ScanBody, self.cfg.num_hidden_layers, remat=self.remat)(
                self.cfg, **kw, name="layers")(x)
        else:
            layer = nn.remat(VisionLayer) if self.remat else VisionLayer
            for i in range(self.cfg.num_hidden_layers):
                x = layer(self.cfg, **kw, name=f"layers_{i}")(x)
        return LayerNorm(self.cfg.layer_norm_eps, self.param_dtype, name="post_layernorm")(x)
