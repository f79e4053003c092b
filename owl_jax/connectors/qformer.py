"""The BLIP-2 Q-Former (arXiv 2301.12597) as MiniGPT-4 runs it: learned query tokens read the
image through a post-LN BERT, queries only.

  x = LayerNorm(query_tokens)                          (no position embeddings on queries)
  per layer i:
    a = LN(x + Wo SelfAttn(x))                         (queries attend to each other, no mask)
    if i % cross_attention_frequency == 0:
      a = LN(a + Wo' CrossAttn(q=a, k=v=image))        (keys / values from the image width)
    x = LN(a + W2 GELU(W1 a))                          (the query feed-forward, exact GELU)
  output: x [..., num_query_tokens, hidden], no final norm

Attention scores are divided by sqrt(head_dim), the softmax runs in fp32. Dropout (training
only): `hidden_dropout_prob` after the embedding norm and on each residual branch, as BERT;
attention-probability dropout is not modelled.

Params (per layer `layer_{i}`, named after BERT's modules; `layer_` rather than `layers_`, as
the layers differ in kind and are never stacked):
  query_tokens [1, Q, D]   layernorm
  layer_{i}/attention/{query,key,value,dense,norm}   layer_{i}/crossattention/... (even i)
  layer_{i}/ffn/{fc1,fc2,norm}   (BERT's intermediate_query.dense, output_query.dense / .LayerNorm)
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.layers.attention import attention
from owl_jax.layers.core import Dense, LayerNorm, constrain, param_with_axes


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Defaults: BLIP-2's Q-Former (bert-base-uncased) reading EVA ViT-g."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    hidden_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Q-Former hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"Q-Former cross_attention_frequency "
                             f"{self.cross_attention_frequency} must be >= 1")

    def has_cross_attention(self, i: int) -> bool:
        return i % self.cross_attention_frequency == 0


class QFormerAttention(nn.Module):
    """BERT attention + its output block: LN(x + dropout(dense(attn(x, kv))))."""
    cfg: QFormerConfig
    cross: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv, deterministic: bool = True):
        c = self.cfg
        h, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda t: t.reshape(*t.shape[:2], h, hd)  # noqa: E731
        q = split(Dense(c.hidden_size, ("embed", "heads"), **kw, name="query")(x))
        k = split(Dense(c.hidden_size, ("embed", "heads"), **kw, name="key")(kv))
        v = split(Dense(c.hidden_size, ("embed", "heads"), **kw, name="value")(kv))
        o = attention(q, k, v, softmax_fp32=True).reshape(*x.shape[:2], c.hidden_size)
        o = Dense(c.hidden_size, ("heads", "embed"), **kw, name="dense")(o)
        o = nn.Dropout(c.hidden_dropout_prob)(o, deterministic=deterministic)
        return LayerNorm(c.layer_norm_eps, self.param_dtype, name="norm")(o + x)


class QFormerFFN(nn.Module):
    cfg: QFormerConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Dense(c.intermediate_size, ("embed", "mlp"), **kw, name="fc1")(x)
        y = constrain(jax.nn.gelu(y, approximate=False), ("act_batch", "act_len", "act_mlp"))
        y = Dense(c.hidden_size, ("mlp", "embed"), **kw, name="fc2")(y)
        y = nn.Dropout(c.hidden_dropout_prob)(y, deterministic=deterministic)
        return LayerNorm(c.layer_norm_eps, self.param_dtype, name="norm")(y + x)


class QFormer(nn.Module):
    """image [N, T, encoder_hidden_size] -> query outputs [N, num_query_tokens, hidden_size]."""
    cfg: QFormerConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, image, deterministic: bool = True):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        queries = param_with_axes(self, "query_tokens", nn.initializers.normal(0.02),
                                  (1, c.num_query_tokens, c.hidden_size), self.param_dtype,
                                  (None, None, "embed"))
        x = jnp.broadcast_to(queries.astype(self.dtype),
                             (image.shape[0], c.num_query_tokens, c.hidden_size))
        x = LayerNorm(c.layer_norm_eps, self.param_dtype, name="layernorm")(x)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        image = image.astype(self.dtype)
        layer = nn.remat(QFormerLayer, static_argnums=(3,)) if self.remat else QFormerLayer
        for i in range(c.num_hidden_layers):
            x = layer(c, c.has_cross_attention(i), **kw, name=f"layer_{i}")(x, image,
                                                                            deterministic)
        return x


class QFormerLayer(nn.Module):
    cfg: QFormerConfig
    cross: bool
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = QFormerAttention(self.cfg, **kw, name="attention")(x, x, deterministic)
        if self.cross:
            x = QFormerAttention(self.cfg, True, **kw, name="crossattention")(
                x, image, deterministic)
        x = QFormerFFN(self.cfg, **kw, name="ffn")(x, deterministic)
        return constrain(x, ("act_batch", "act_len", "act_embed"))
