"""LLaVA's connector: vision features [..., Dv] -> LLM input embeddings [..., D].

  linear       one Linear (LLaVA v1)
  mlp2x_gelu   Linear -> GELU (exact, erf form) -> Linear (LLaVA-1.5)

Params `linear_1` (and `linear_2`), each with a bias: the llava-hf module names.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.layers.core import Dense, constrain

KINDS = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    kind: str
    out_features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "linear":
            return Dense(self.out_features, ("embed", "text_embed"), **kw, name="linear_1")(x)
        if self.kind != "mlp2x_gelu":
            raise ValueError(f"unknown projector kind {self.kind!r}; known: {', '.join(KINDS)}")
        h = Dense(self.out_features, ("embed", "mlp"), **kw, name="linear_1")(x)
        h = constrain(jax.nn.gelu(h, approximate=False), ("act_batch", "act_len", "act_mlp"))
        return Dense(self.out_features, ("mlp", "embed"), **kw, name="linear_2")(h)
