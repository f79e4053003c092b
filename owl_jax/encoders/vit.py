"""The mPLUG-Owl vision encoder: a CLIP-style ViT-L/14 with the official module names.

Pre-LN blocks with QuickGELU, a fused QKV projection laid out per head as [q|k|v] (so the output
reshapes to [..., heads, 3, head_dim]), and a final LayerNorm over all tokens, CLS included.

The same tower serves LLaVA (HF CLIP weights, eps 1e-5): with `feature_layer` it returns one
intermediate hidden state instead (HF CLIP's `hidden_states[k]`), without the final LayerNorm.

EVA ViT-g (BLIP-2, MiniGPT-4) is the same tower with the knobs of `VisionConfig` turned: exact
GELU, a bias on the patch projection, no pre- or post-LayerNorm, and query / value biases with
no key bias (`qkv_bias="qv"`: params `q_bias`, `v_bias` beside a bias-free fused kernel).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.layers.core import (Dense, LayerNorm, constrain, param_with_axes, quick_gelu,
                                 scanned_layers)
from owl_jax.layers.attention import attention


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The VisionConfig fields that pick a ViT variant (not a size): a family whose tower is always
# CLIP's leaves them out of its config files.
VARIANT_FIELDS = ("hidden_act", "qkv_bias", "patch_bias", "pre_layernorm", "post_layernorm")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    # Variant knobs (defaults: the CLIP tower of mPLUG-Owl and LLaVA).
    hidden_act: str = "quick_gelu"     # or "gelu" (exact, erf form: EVA)
    qkv_bias: str = "qkv"              # "qkv": one fused bias; "qv": q / v biases, no k bias
    patch_bias: bool = False           # a bias on the patch projection (EVA)
    pre_layernorm: bool = True         # LayerNorm after the embeddings (CLIP)
    post_layernorm: bool = True        # LayerNorm after the last layer (CLIP; EVA has none)

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported "
                             f"(quick_gelu or gelu)")
        if self.qkv_bias not in ("qkv", "qv"):
            raise ValueError(f"vision qkv_bias {self.qkv_bias!r} is not supported (qkv or qv)")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


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
                          use_bias=c.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype,
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
        if not c.pre_layernorm:
            return x
        return LayerNorm(c.layer_norm_eps, self.param_dtype, name="pre_layernorm")(x)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        qkv = Dense(3 * c.hidden_size, ("embed", "heads"), use_bias=c.qkv_bias == "qkv",
                    dtype=self.dtype, param_dtype=self.param_dtype, name="query_key_value")(x)
        qkv = qkv.reshape(*x.shape[:2], h, 3, hd)
        if c.qkv_bias == "qv":  # EVA: the key gets no bias
            qb, vb = (param_with_axes(self, n, nn.initializers.zeros, (c.hidden_size,),
                                      self.param_dtype, ("heads",)).astype(self.dtype)
                      .reshape(h, hd) for n in ("q_bias", "v_bias"))
            qkv = qkv + jnp.stack([qb, jnp.zeros_like(qb), vb], axis=1)
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
        act = quick_gelu if c.hidden_act == "quick_gelu" else \
            (lambda t: jax.nn.gelu(t, approximate=False))
        h = constrain(act(h), ("act_batch", "act_len", "act_mlp"))
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
    """VisionLayer i as nn.scan's (carry, i) -> (carry, None) body. With a `tap` (1-based), the
    carry also holds the hidden state after layer `tap` (LLaVA's feature layer)."""
    cfg: VisionConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    tap: int = 0

    @nn.compact
    def __call__(self, carry, i):
        x, kept = carry if self.tap else (carry, None)
        x = VisionLayer(self.cfg, self.dtype, self.param_dtype, name="layer")(x)
        return ((x, jnp.where(i + 1 == self.tap, x, kept)) if self.tap else x), None


class VisionTransformer(nn.Module):
    """pixel_values [N, H, W, C] -> hidden states [N, 1 + patches, D].

    feature_layer None (mPLUG-Owl): every layer, then post_layernorm on every token.
    feature_layer k (LLaVA's select layer, indexed as HF CLIP's `hidden_states`: 0 is the
    embeddings after the pre-LayerNorm, k the output of layer k, negative counts from the end,
    -1 the last layer): that hidden state, with no post_layernorm. Every layer's params and
    post_layernorm are still created (checkpoints hold them). Unrolled, the layers after the
    tap are not run; scanned, every layer runs and the tapped state is carried out.

    `scan_layers=True`: one scanned block with params stacked on a leading `layers` axis
    (`layers/layer/...`, see `owl_jax.layers.scan.scan_params`), so that compile time does not
    grow with depth; otherwise `layers_{i}`, the layout of checkpoints and conversion."""
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    feature_layer: int | None = None

    def layers_used(self) -> int:
        """How many layers the output depends on."""
        n, k = self.cfg.num_hidden_layers, self.feature_layer
        if k is None:
            return n
        if not -(n + 1) <= k <= n:
            raise ValueError(f"feature layer {k} is out of range for a {n}-layer vision tower "
                             f"(hidden states {-(n + 1)} .. {n})")
        return k % (n + 1)

    @nn.compact
    def __call__(self, pixel_values):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, used = self.cfg.num_hidden_layers, self.layers_used()
        x = VisionEmbeddings(self.cfg, **kw, name="embeddings")(pixel_values)
        if self.scan_layers:
            tap = used if used < n else 0
            out, _ = scanned_layers(_ScanBody, n, remat=self.remat)(
                self.cfg, **kw, tap=tap, name="layers")((x, x) if tap else x, jnp.arange(n))
            x, tapped = out if tap else (out, out)
        else:
            layer = nn.remat(VisionLayer) if self.remat else VisionLayer
            tapped = x
            for i in range(n if self.is_initializing() else used):
                x = layer(self.cfg, **kw, name=f"layers_{i}")(x)
                if i + 1 == used:
                    tapped = x
        if not self.cfg.post_layernorm:
            return x if self.feature_layer is None else tapped
        post = LayerNorm(self.cfg.layer_norm_eps, self.param_dtype, name="post_layernorm")
        if self.feature_layer is None:
            return post(x)
        if self.is_initializing():
            post(x)  # HF CLIP keeps it (for the pooled CLS output): create its params
        return tapped
