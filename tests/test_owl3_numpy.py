"""mPLUG-Owl3's hyper layer and projector against a float64 numpy re-derivation of the fact
sheet's math (shared/reference/mplug_owl3.md §2-§3), written here from the sheet and not from
owl_jax's modules: 241101's one softmax over [visual keys; text keys] (MI-Rope at the
placeholder start, a token sees an image from its placeholder's first token on) and 240728's
gated cross-attention (MI-Rope at start + 1, strictly later tokens, no gate before the first
image), then o_proj, the residual and the SwiGLU MLP; 241101's Linear-GELU(erf)-Linear
projector. Random non-default sizes (GQA, biases, norm weights); both attention paths (dense
and blockwise)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.connectors.projector import Projector
from owl_jax.decoder.hyper import HyperLayer
from owl_jax.decoder.llama import TextConfig
from owl_jax.layers import blockwise
from owl_jax.layers.attention import rope_cos_sin

CFG = TextConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                 num_attention_heads=6, num_key_value_heads=2, rope_theta=30000.0,
                 rms_norm_eps=1e-6, qkv_bias=True, max_position_embeddings=256)
L, P = 21, 5
STARTS = [2, 9, 10]          # each image's placeholder start (text index)


# ---- numpy, float64, from the sheet ----------------------------------------------------------

def rms(x, w, eps=CFG.rms_norm_eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, theta=CFG.rope_theta):
    """x [..., n, D] rotated at integer positions pos [n] (HF rotate-half)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    f = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def softmax_rows(s, mask):
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)   # a row seeing nothing: 0


def hyper_layer(p, x, img, fusion):
    """x [L, hidden], img [N, P, hidden] -> the layer's output [L, hidden]."""
    a = p["self_attn"]
    lin = lambda v, name: v @ a[name]["kernel"] + a[name].get("bias", 0)  # noqa: E731
    h, g, d = CFG.num_attention_heads, CFG.kv_heads, CFG.head_dim
    xt = rms(x, p["input_layernorm"]["scale"])
    pos = np.arange(L)
    q = rope(lin(xt, "q_proj").reshape(L, h, d).transpose(1, 0, 2), pos)       # [H, L, D]
    k = rope(lin(xt, "k_proj").reshape(L, g, d).transpose(1, 0, 2), pos)       # [G, L, D]
    v = lin(xt, "v_proj").reshape(L, g, d).transpose(1, 0, 2)
    k, v = np.repeat(k, h // g, 0), np.repeat(v, h // g, 0)                    # head i: kv i//r
    causal = np.tril(np.ones((L, L), bool))
    # visual K/V: the layer's own input norm, v_kv_proj split (G, 2, D), MI-Rope per tile
    xv = rms(img, p["input_layernorm"]["scale"])
    kv = lin(xv, "v_kv_proj").reshape(len(img), P, g, 2, d)
    shift = 1 if fusion == "gate" else 0
    vk = np.stack([rope(kv[i, :, :, 0].transpose(1, 0, 2), np.full(P, s + shift))
                   for i, s in enumerate(STARTS)], 1).reshape(g, -1, d)        # [G, N*P, D]
    vv = kv[..., 1, :].transpose(2, 0, 1, 3).reshape(g, -1, d)
    vk, vv = np.repeat(vk, h // g, 0), np.repeat(vv, h // g, 0)
    starts = np.repeat(np.array(STARTS), P)
    scale = 1 / math.sqrt(d)
    if fusion == "fused":   # 241101: one softmax, visual keys first
        vis = pos[:, None] >= starts[None]
        keys, vals = np.concatenate([vk, k], 1), np.concatenate([vv, v], 1)
        mask = np.concatenate([vis, causal], 1)
        ctx = softmax_rows(q @ keys.transpose(0, 2, 1) * scale, mask[None]) @ vals
    else:                   # 240728: text attention, cross-attention, per-channel gate
        ctx_t = softmax_rows(q @ k.transpose(0, 2, 1) * scale, causal[None]) @ v
        vis = pos[:, None] > starts[None]
        seen = vis.any(-1)
        ctx_v = softmax_rows(q @ vk.transpose(0, 2, 1) * scale, vis[None]) @ vv
        ctx_v = np.where(seen[None, :, None], ctx_v, 0.0)
        gate = 1 / (1 + np.exp(-(ctx_t @ a["gate_proj"]["kernel"] + a["gate_proj"]["bias"])))
        ctx = np.where(seen[None, :, None], ctx_t * (1 - gate) + ctx_v * gate, ctx_t)
    o = ctx.transpose(1, 0, 2).reshape(L, h * d) @ a["o_proj"]["kernel"]
    x = x + o
    m = p["mlp"]
    y = rms(x, p["post_attention_layernorm"]["scale"])
    up = y @ m["gate_proj"]["kernel"]
    return x + ((up / (1 + np.exp(-up))) * (y @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]


def mlp_projector(p, x):
    """241101: Linear, exact (erf) GELU, Linear."""
    from math import erf
    h = x @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
    h = 0.5 * h * (1 + np.vectorize(erf)(h / math.sqrt(2)))
    return h @ p["linear_2"]["kernel"] + p["linear_2"]["bias"]


# ---- the modules -----------------------------------------------------------------------------

def _randomize(params, seed):
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(jax.tree.map(np.asarray, params))
    out = [(1 + 0.1 * rng.standard_normal(x.shape)) if x.ndim == 1 and x.shape[0] == 48
           else 0.3 * rng.standard_normal(x.shape) for x in leaves]
    return jax.tree.unflatten(tree, out)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("fusion", ["fused", "gate"])
def test_hyper_layer_matches_numpy(fusion, blocks, monkeypatch):
    if blocks:   # every visual / joint attention block by block, blocks of uneven sizes
        for name, value in (("MIN_BLOCKWISE", 0), ("Q_BLOCK", 4), ("K_BLOCK", 6)):
            monkeypatch.setattr(blockwise, name, value)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, L, CFG.hidden_size)).astype(np.float32)
    img = rng.standard_normal((1, len(STARTS), P, CFG.hidden_size)).astype(np.float32)
    layer = HyperLayer(CFG, layer_index=0, fusion=fusion)
    pos = jnp.arange(L)[None]
    cos, sin = rope_cos_sin(pos, CFG.head_dim, CFG.rope_theta, jnp.float32)
    mask = jnp.tril(jnp.ones((L, L), bool))[None]
    params = layer.init(jax.random.key(0), x, cos, sin, mask)["params"]
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), _randomize(
        jax.tree.map(lambda a: getattr(a, "value", a), params,
                     is_leaf=lambda a: hasattr(a, "value")), 1))
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    starts = jnp.array([STARTS])
    k, v = layer.apply({"params": p32}, jnp.asarray(img), starts + (fusion == "gate"),
                       method="visual_kv")
    side = {"positions": pos, "visual": {"starts": starts, "valid": jnp.ones_like(starts, bool),
                                         "layers_0": {"k": k, "v": v}}}
    got, _ = layer.apply({"params": p32}, jnp.asarray(x), cos, sin, mask, side=side)
    want = hyper_layer(params, x[0].astype(np.float64), img[0].astype(np.float64), fusion)
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-5 * np.abs(want).max())
    # not vacuous: without the images the layer computes something else
    plain, _ = layer.apply({"params": p32}, jnp.asarray(x), cos, sin, mask,
                           side={"positions": pos, "visual": None})
    assert np.abs(np.asarray(plain[0]) - want).max() > 1e-2 * np.abs(want).max()


def test_241101_projector_matches_numpy():
    proj = Projector("mlp2x_gelu", 48)   # the 241101 projector (Owl3Config.projector)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7, 40)).astype(np.float32)
    params = proj.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda a: np.asarray(getattr(a, "value", a), np.float64), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    params = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape), params)
    got = proj.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)},
                     jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), mlp_projector(params, x.astype(np.float64)),
                               atol=1e-5)
