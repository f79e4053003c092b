"""The visual abstractor: learned queries cross-attend to the ViT tokens, then project to the LLM.

Official quirks kept on purpose (they decide parity with the released weights):
- keys and values are `concat(norm1(queries), normk(image))`, queries first;
- the attention residual is added to the *normed* queries;
- the SwiGLU FFN has a LayerNorm (`ffn_ln`, eps from config) between the gating and `w2`;
- norm1 / normk / norm2 use eps 1e-5 (PyTorch's default), not the config eps;
- no final norm: output = [visual_fc(queries), vit_eos] -> num_queries + 1 tokens.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.layers.core import Dense, LayerNorm, constrain, param_with_axes, scanned_layers
from owl_jax.layers.attention import attention

@dataclasses.dataclass(frozen=True)
class AbstractorConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6  # used only by ffn_ln; the other LNs are built with 1e-5
    encoder_hidden_size: int = 1024
    attention_probs_dropout_prob: float = 0.1


_TORCH_LN_EPS = 1e-5


class AbstractorLayer(nn.Module):
    cfg: AbstractorConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, image, deterministic: bool = True):
        c = self.cfg
        d, h = c.hidden_size, c.num_attention_heads
        hd = d // h

        def dense(features, axes, name):
            return Dense(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        qn = LayerNorm(_TORCH_LN_EPS, self.param_dtype, name="norm1")(queries)
        xn = LayerNorm(_TORCH_LN_EPS, self.param_dtype, name="normk")(image)
        kv = jnp.concatenate([qn, xn], axis=1)
        split = lambda t: t.reshape(*t.shape[:2], h, hd)
        q = split(dense(d, ("embed", "heads"), "query")(qn))
        k = split(dense(d, ("embed", "heads"), "key")(kv))
        v = split(dense(d, ("embed", "heads"), "value")(kv))
        # Attention-prob dropout, as upstream (train only).
        if not deterministic and c.attention_probs_dropout_prob > 0:
            o = _attention_with_dropout(self, q, k, v, c.attention_probs_dropout_prob)
        else:
            o = attention(q, k, v, softmax_fp32=False)
        x = qn + dense(d, ("heads", "embed"), "out_proj")(o.reshape(*o.shape[:2], d))

        y = LayerNorm(_TORCH_LN_EPS, self.param_dtype, name="norm2")(x)
        g = jax.nn.silu(dense(c.intermediate_size, ("embed", "mlp"), "w1")(y))
        g = g * dense(c.intermediate_size, ("embed", "mlp"), "w3")(y)
        g = constrain(g, ("act_batch", "act_len", "act_mlp"))
        g = LayerNorm(c.layer_norm_eps, self.param_dtype, name="ffn_ln")(g)
        return constrain(x + dense(d, ("mlp", "embed"), "w2")(g),
                         ("act_batch", "act_len", "act_embed"))


def _attention_with_dropout(module, q, k, v, rate):
    d = q.shape[-1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.asarray(d ** 0.5, q.dtype)
    p = jax.nn.softmax(s, axis=-1)
    p = nn.Dropout(rate)(p, deterministic=False)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v)


class _ScanBody(nn.Module):
    """AbstractorLayer adapted to nn.scan's (carry, broadcast image) -> (carry, ys) signature."""
    cfg: AbstractorConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    deterministic: bool

    @nn.compact
    def __call__(self, q, image):
        layer = AbstractorLayer(self.cfg, self.dtype, self.param_dtype, name="layer")
        return layer(q, image, self.deterministic), None


class Abstractor(nn.Module):
    """queries [N, Q, D], image [N, P, D] -> [N, Q + 1, text_hidden].

    `scan_layers=True` stacks the layers' params under `layers/layer/...`, as the ViT and the
    LLM do (see `owl_jax.families.owl1.model.scan_params`)."""
    cfg: AbstractorConfig
    text_hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, queries, image, deterministic: bool = True):
        q = queries.astype(self.dtype)
        image = image.astype(self.dtype)
        if self.scan_layers:
            q, _ = scanned_layers(_ScanBody, self.cfg.num_hidden_layers, remat=self.remat,
                                  in_axes=(nn.broadcast,))(
                self.cfg, self.dtype, self.param_dtype, deterministic, name="layers")(q, image)
        else:
            layer = (nn.remat(AbstractorLayer, static_argnums=(3,)) if self.remat
                     else AbstractorLayer)
            for i in range(self.cfg.num_hidden_layers):
                q = layer(self.cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(
                    q, image, deterministic)
        out = Dense(self.text_hidden_size, ("embed", "text_embed"), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="visual_fc")(q)
        eos = param_with_axes(self, "vit_eos", nn.initializers.normal(0.02),
                              (1, 1, self.text_hidden_size), self.param_dtype,
                              (None, None, "text_embed"))
        eos = jnp.broadcast_to(eos.astype(self.dtype), (out.shape[0], 1, out.shape[-1]))
        return jnp.concatenate([out, eos], axis=1)
