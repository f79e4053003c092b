"""LLaMA decoder with HF LlamaForCausalLM numerics and names.

Rotate-half RoPE (q/k kernels in HF layout), fp32 RMSNorm statistics, fp32 softmax, untied head.

Qwen2 is the same decoder with knobs of `TextConfig`: `qkv_bias` (biases on q/k/v, none on
o_proj), `rope_theta`, grouped-query attention (`num_key_value_heads`) and
`tie_word_embeddings` (no `lm_head` param: the head reads the embedding table). The defaults
are LLaMA's. `block_of(i)` picks another block class for layer i (mPLUG-Owl3's hyper layers);
such a block also receives the `side` inputs given to `__call__`.

Two ways to run the layers:
- unrolled (`layers_{i}` params): supports a KV cache for decoding;
- `scan_layers=True`: one scanned (and optionally rematerialised) block with params stacked on a
  leading `layers` axis, for training at scale. `owl_jax.families.owl1.model.scan_params` /
  `unscan_params` convert between the two layouts.

The attention mask is passed in ready-made (bool [B, Lq, Lk]) so that callers decide causality,
padding and packing (segment ids); see `owl_jax.layers.masks`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from owl_jax.layers.core import Dense, LoraSpec, RMSNorm, constrain, scanned_layers
from owl_jax.layers.attention import apply_rope, attention, cached_attention, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    stop_token_ids: tuple[int, ...] = ()  # ids besides eos_token_id that end generation
    qkv_bias: bool = False              # Qwen2: biases on q/k/v projections (none on o_proj)
    tie_word_embeddings: bool = False   # the head reads embed_tokens (no lm_head param)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LlamaAttention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, deterministic=True):
        c = self.cfg
        h, hkv, hd = c.num_attention_heads, c.kv_heads, c.head_dim

        def proj(name, features, axes):
            lora = self.lora if name in self.lora_targets else None
            return Dense(features, axes, use_bias=c.qkv_bias and name != "o_proj",
                         dtype=self.dtype, param_dtype=self.param_dtype, lora=lora, name=name)

        b, l, _ = x.shape
        q = proj("q_proj", h * hd, ("embed", "heads"))(x, deterministic).reshape(b, l, h, hd)
        k = proj("k_proj", hkv * hd, ("embed", "kv"))(x, deterministic).reshape(b, l, hkv, hd)
        v = proj("v_proj", hkv * hd, ("embed", "kv"))(x, deterministic).reshape(b, l, hkv, hd)
        q = constrain(apply_rope(q, cos, sin), ("act_batch", "act_len", "act_heads", None))
        k = apply_rope(k, cos, sin)
        if cache is None:
            o, new_cache = attention(q, k, v, mask=mask, softmax_fp32=True), None
        else:
            # Write this chunk at cache_index and attend over the whole preallocated buffer; the
            # mask hides slots that are not written yet.
            k_new = k.transpose(2, 0, 1, 3).reshape(hkv * b, l, hd)   # [Hkv * B, L, D]
            v_new = v.transpose(2, 0, 1, 3).reshape(hkv * b, l, hd)   # [Hkv * B, L, D]
            new_cache = {"k": write_cache(cache["k"], k_new, cache_index, hkv),
                         "v": write_cache(cache["v"], v_new, cache_index, hkv)}
            o = cached_attention(q, new_cache["k"].astype(self.dtype),
                                 new_cache["v"].astype(self.dtype), mask)
        o = proj("o_proj", c.hidden_size, ("heads", "embed"))(o.reshape(b, l, h * hd),
                                                              deterministic)
        return o, new_cache


def write_cache(cache, new, index, hkv: int):
    """Writes `new` [Hkv * B, L, D] into `cache` [Hkv * B, S, D] at slot `index`: a scalar
    (every row at the same slot) or int [B], one slot per batch row (continuous batching,
    where each row is a request of its own length)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index, 0))
    rows = jnp.tile(jnp.asarray(index, jnp.int32), hkv)  # row h * B + b writes at index[b]
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (i, 0)))(cache, new, rows)


class LlamaMLP(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, deterministic=True):
        c = self.cfg

        def proj(name, features, axes):
            lora = self.lora if name in self.lora_targets else None
            return Dense(features, axes, use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, lora=lora, name=name)

        g = proj("gate_proj", c.intermediate_size, ("embed", "mlp"))(x, deterministic)
        u = proj("up_proj", c.intermediate_size, ("embed", "mlp"))(x, deterministic)
        hmid = constrain(jax.nn.silu(g) * u, ("act_batch", "act_len", "act_mlp"))
        return proj("down_proj", c.hidden_size, ("mlp", "embed"))(hmid, deterministic)


class LlamaLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                  lora_targets=self.lora_targets)
        eps = self.cfg.rms_norm_eps
        a, new_cache = LlamaAttention(self.cfg, **kw, name="self_attn")(
            RMSNorm(eps, self.param_dtype, name="input_layernorm")(x), cos, sin, mask, cache,
            cache_index, deterministic)
        x = x + a
        x = x + LlamaMLP(self.cfg, **kw, name="mlp")(
            RMSNorm(eps, self.param_dtype, name="post_attention_layernorm")(x), deterministic)
        return constrain(x, ("act_batch", "act_len", "act_embed")), new_cache


class _ScanBody(nn.Module):
    """LlamaLayer adapted to nn.scan's (carry, xs) -> (carry, ys) signature."""
    cfg: TextConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    lora: LoraSpec | None
    lora_targets: tuple[str, ...]

    @nn.compact
    def __call__(self, x, cos, sin, mask, deterministic):
        x, _ = LlamaLayer(self.cfg, self.dtype, self.param_dtype, self.lora, self.lora_targets,
                          name="layer")(x, cos, sin, mask, deterministic=deterministic)
        return x, None


class Llama(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"
    lora: LoraSpec | None = None
    lora_targets: tuple[str, ...] = ()
    # layer index -> (block class, extra constructor kwargs) for a layer that is not a
    # LlamaLayer, or None; such blocks take the `side` inputs of __call__ as a last argument
    block_of: Callable[[int], tuple[type, dict] | None] | None = None

    def _block(self, i: int):
        return None if self.block_of is None else self.block_of(i)

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("embed_vocab", "embed")))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                  lora_targets=self.lora_targets)
        policy = REMAT_POLICIES[self.remat_policy]
        if self.scan_layers:
            if any(self._block(i) for i in range(c.num_hidden_layers)):
                raise ValueError("scan_layers=True needs one block kind for every layer; this "
                                 "decoder mixes block kinds (block_of): use scan_layers=False")
            self.layers = scanned_layers(
                _ScanBody, c.num_hidden_layers, remat=self.remat_policy != "none",
                policy=policy, in_axes=(nn.broadcast,) * 4, static_argnums=(5,),
            )(**kw, cfg=c, name="layers")
        else:
            layers = []
            for i in range(c.num_hidden_layers):
                cls, extra = self._block(i) or (LlamaLayer, {})
                if self.remat_policy != "none":
                    cls = nn.remat(cls, policy=policy, static_argnums=(7,))
                layers.append(cls(c, **kw, **extra, name=f"layers_{i}"))
            self.layers = layers
        self.norm = RMSNorm(c.rms_norm_eps, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, ids):
        return self.embed_tokens(ids)

    def __call__(self, x, positions, mask, cache=None, cache_index=None, deterministic=True,
                 return_hidden=False, side=None):
        """x: input embeddings [B, L, D]; positions [B, L]; mask bool [B, L, Lk].

        With `cache` (a list of {"k", "v"} per layer, see `init_cache`), the chunk is written at
        `cache_index` (a scalar, or int [B]: one slot per row) and Lk == S. Returns (logits
        [B, L, V], new cache or None). `side`: what blocks chosen by `block_of` read besides the
        hidden states (LlamaLayers never see it).
        """
        c = self.cfg
        x = constrain(x.astype(self.dtype), ("act_batch", "act_len", "act_embed"))
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, self.dtype)
        new_cache = None
        if self.scan_layers:
            if cache is not None:
                raise ValueError("decoding with a KV cache needs scan_layers=False")
            x, _ = self.layers(x, cos, sin, mask, deterministic)
        else:
            new_cache = [] if cache is not None else None
            for i, layer in enumerate(self.layers):
                extra = (side,) if self._block(i) else ()
                x, lc = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index,
                              deterministic, *extra)
                if cache is not None:
                    new_cache.append(lc)
        x = self.norm(x)
        if return_hidden:
            return x, new_cache
        logits = self.logits(x)
        return constrain(logits, ("act_batch", "act_len", "act_vocab")), new_cache

    def logits(self, x):
        """lm_head on final-normed hidden states (the embedding table when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(x.astype(self.dtype))
        return self.lm_head(x)

    def head(self, x):
        """Final norm + lm_head on hidden states (for callers that slice before the head)."""
        return self.logits(self.norm(x))


def init_cache(cfg: TextConfig, batch: int, length: int, dtype=jnp.float32):
    """Zeroed KV cache, per layer k and v [kv_heads * batch, length, head_dim]: kv head major (a
    `tensor` mesh axis splits it by head), then batch row, then slot, so that a step writes
    whole rows and the attention reads the written slots as one contiguous block per head.
    Both attention paths read it as stored (`cached_attention`)."""
    n = cfg.kv_heads * batch
    return [{"k": jnp.zeros((n, length, cfg.head_dim), dtype),
             "v": jnp.zeros((n, length, cfg.head_dim), dtype)}
            for _ in range(cfg.num_hidden_layers)]


def select_cache_rows(cache, rows, batch: int):
    """The cache of batch rows `rows` (int [B']) out of a cache of `batch` rows (beam search
    reorders and repeats rows with this)."""
    def pick(x):
        x = x.reshape(x.shape[0] // batch, batch, *x.shape[1:])[:, rows]
        return x.reshape(-1, *x.shape[2:])
    return jax.tree.map(pick, cache)
