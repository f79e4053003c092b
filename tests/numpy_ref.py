"""An independent float64 numpy re-derivation of the official mPLUG-Owl forward math.

Written from the fact sheet (`shared/reference/mplug_owl.md` §1-§3, §10), not from owl_jax's
Flax code, so the model tests compare two derivations of the same spec. Params use the OFFICIAL
PyTorch state_dict names and layouts: Linear weight [out, in], Conv2d weight [out, in, kh, kw],
pixel values NCHW.

Random weights in that layout, and their mapping onto owl_jax's params, are in
`official_layout.py`.
"""
from __future__ import annotations

import numpy as np

from official_layout import ABS, LM, VIT  # official state_dict key prefixes


# --------------------------------------------------------------------------------------------
# Primitives (float64)


def layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def linear(x, sd, name, bias=True):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if bias else y


def softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def quick_gelu(x):
    return x * sigmoid(1.702 * x)


def silu(x):
    return x * sigmoid(x)


def _heads(x, n):  # [B, S, n*d] -> [B, n, S, d], heads contiguous (torch .view(B, S, n, d))
    b, s, e = x.shape
    return x.reshape(b, s, n, e // n).transpose(0, 2, 1, 3)


def _merge(x):  # [B, n, S, d] -> [B, S, n*d]
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


# --------------------------------------------------------------------------------------------
# Vision encoder (§3.1, §3.2)


def vision_forward(sd, cfg, pixels_nchw):
    """pixels [N, 3, H, W] -> last_hidden_state [N, 1 + grid**2, Dv] (post-LN on all tokens)."""
    v = cfg.vision
    x = np.asarray(pixels_nchw, np.float64)
    n, c, hgt, wid = x.shape
    p = v.patch_size
    gh, gw = hgt // p, wid // p
    # Conv2d(kernel = stride = p, no bias) as a sum over each p x p patch.
    w = sd[VIT + "embeddings.patch_embed.weight"]  # [D, C, p, p]
    tiles = x[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
    fmap = np.einsum("ncyixj,dcij->ndyx", tiles, w)  # [N, D, gh, gw]
    tokens = fmap.reshape(n, w.shape[0], gh * gw).transpose(0, 2, 1)  # flatten(2).transpose(1, 2)
    cls = np.broadcast_to(sd[VIT + "embeddings.cls_token"], (n, 1, w.shape[0]))
    h = np.concatenate([cls, tokens], axis=1)
    h = h + sd[VIT + "embeddings.position_embedding"][:, : h.shape[1]]
    eps = v.layer_norm_eps
    h = layer_norm(h, sd[VIT + "embeddings.pre_layernorm.weight"],
                   sd[VIT + "embeddings.pre_layernorm.bias"], eps)
    nh = v.num_attention_heads
    hd = v.hidden_size // nh
    for i in range(v.num_hidden_layers):
        pre = f"{VIT}encoder.layers.{i}."
        a = layer_norm(h, sd[pre + "input_layernorm.weight"], sd[pre + "input_layernorm.bias"],
                       eps)
        qkv = linear(a, sd, pre + "self_attn.query_key_value")
        b, s, _ = qkv.shape
        qkv = qkv.reshape(b, s, nh, 3, hd)  # per head: [q | k | v]
        q, k, vv = (qkv[:, :, :, j].transpose(0, 2, 1, 3) for j in range(3))
        scores = (q @ k.transpose(0, 1, 3, 2)) * hd ** -0.5
        o = _merge(softmax(scores) @ vv)
        h = h + linear(o, sd, pre + "self_attn.dense")
        m = layer_norm(h, sd[pre + "post_attention_layernorm.weight"],
                       sd[pre + "post_attention_layernorm.bias"], eps)
        h = h + linear(quick_gelu(linear(m, sd, pre + "mlp.fc1")), sd, pre + "mlp.fc2")
    return layer_norm(h, sd[VIT + "post_layernorm.weight"], sd[VIT + "post_layernorm.bias"], eps)


# --------------------------------------------------------------------------------------------
# Visual abstractor (§3.3)

TORCH_LN_EPS = 1e-5


def abstractor_forward(sd, cfg, image_embeds):
    """image_embeds [N, P, Dv] -> [N, Q + 1, D_text]: visual_fc(queries) then vit_eos."""
    a = cfg.abstractor
    n = image_embeds.shape[0]
    q = np.broadcast_to(sd["query_tokens"], (n,) + sd["query_tokens"].shape[1:])
    nh = a.num_attention_heads
    hd = a.hidden_size // nh
    for i in range(a.num_hidden_layers):
        pre = f"{ABS}encoder.layers.{i}.crossattention."
        qn = layer_norm(q, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], TORCH_LN_EPS)
        xn = layer_norm(image_embeds, sd[pre + "normk.weight"], sd[pre + "normk.bias"],
                        TORCH_LN_EPS)
        kv = np.concatenate([qn, xn], axis=1)
        qh = _heads(linear(qn, sd, pre + "attention.query"), nh)
        kh = _heads(linear(kv, sd, pre + "attention.key"), nh)
        vh = _heads(linear(kv, sd, pre + "attention.value"), nh)
        ctx = _merge(softmax((qh @ kh.transpose(0, 1, 3, 2)) / np.sqrt(hd)) @ vh)
        x = qn + linear(ctx, sd, pre + "output.out_proj")  # residual on the NORMED queries
        y = layer_norm(x, sd[pre + "output.norm2.weight"], sd[pre + "output.norm2.bias"],
                       TORCH_LN_EPS)
        g = silu(linear(y, sd, pre + "output.mlp.w1")) * linear(y, sd, pre + "output.mlp.w3")
        g = layer_norm(g, sd[pre + "output.mlp.ffn_ln.weight"], sd[pre + "output.mlp.ffn_ln.bias"],
                       a.layer_norm_eps)
        q = x + linear(g, sd, pre + "output.mlp.w2")
    out = linear(q, sd, ABS + "visual_fc")
    eos = np.broadcast_to(sd[ABS + "vit_eos"], (n, 1, out.shape[-1]))
    return np.concatenate([out, eos], axis=1)


def encode_images(sd, cfg, pixels_nchw):
    return abstractor_forward(sd, cfg, vision_forward(sd, cfg, pixels_nchw))


# --------------------------------------------------------------------------------------------
# Splice (§3.4): as the official loop, image runs in order of appearance across the batch.


def media_run_starts(ids):
    """Start index of each run of negative ids (`get_media_indices`)."""
    return [i for i in range(len(ids)) if ids[i] < 0 and (i == 0 or ids[i] != ids[i - 1])]


def splice(sd, input_ids, image_feats):
    """input_ids [B, L] (image slots -1), image_feats [N, T, D] flat -> embeddings [B, L, D]."""
    table = sd[LM + "model.embed_tokens.weight"]
    ids = np.asarray(input_ids)
    rows = []
    img_idx = 0
    for b in range(ids.shape[0]):
        text = table[np.where(ids[b] < 0, 1, ids[b])]  # dummy id 1, as official forward
        parts, start = [], 0
        for pos in media_run_starts(ids[b]):
            parts += [text[start:pos], image_feats[img_idx]]
            start = pos + image_feats.shape[1]
            img_idx += 1
        parts.append(text[start:])
        rows.append(np.concatenate(parts, axis=0))
    assert img_idx == (0 if image_feats is None else len(image_feats)), "unused images"
    return np.stack(rows)


# --------------------------------------------------------------------------------------------
# LLaMA (§3.5): RMSNorm, rotate-half RoPE, softmax, untied head


def rope(x, positions, theta):
    """x [B, H, L, d]; positions [B, L]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = positions[:, None, :, None].astype(np.float64) * inv_freq  # [B, 1, L, d/2]
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def llama_forward(sd, cfg, embeds, positions=None, mask=None):
    """embeds [B, L, D] -> logits [B, L, V]. mask bool [B, L, L] (default causal);
    positions [B, L] (default arange)."""
    t = cfg.text
    b, l, _ = embeds.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(l), (b, l))
    if mask is None:
        mask = np.broadcast_to(np.tril(np.ones((l, l), bool)), (b, l, l))
    nh, nkv = t.num_attention_heads, t.kv_heads
    hd = t.hidden_size // nh
    h = np.asarray(embeds, np.float64)
    for i in range(t.num_hidden_layers):
        pre = f"{LM}model.layers.{i}."
        a = rms_norm(h, sd[pre + "input_layernorm.weight"], t.rms_norm_eps)
        q = rope(_heads(linear(a, sd, pre + "self_attn.q_proj", False), nh), positions,
                 t.rope_theta)
        k = rope(_heads(linear(a, sd, pre + "self_attn.k_proj", False), nkv), positions,
                 t.rope_theta)
        v = _heads(linear(a, sd, pre + "self_attn.v_proj", False), nkv)
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        s = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(hd)
        s = np.where(mask[:, None], s, -np.inf)
        p = softmax(s)
        p = np.nan_to_num(p)  # rows with no visible key (never read by tests)
        h = h + linear(_merge(p @ v), sd, pre + "self_attn.o_proj", False)
        m = rms_norm(h, sd[pre + "post_attention_layernorm.weight"], t.rms_norm_eps)
        h = h + linear(silu(linear(m, sd, pre + "mlp.gate_proj", False))
                       * linear(m, sd, pre + "mlp.up_proj", False), sd, pre + "mlp.down_proj",
                       False)
    h = rms_norm(h, sd[LM + "model.norm.weight"], t.rms_norm_eps)
    return h @ sd[LM + "lm_head.weight"].T


def owl_logits(sd, cfg, input_ids, pixels_nchw=None, positions=None, mask=None):
    feats = None if pixels_nchw is None or len(pixels_nchw) == 0 else encode_images(
        sd, cfg, pixels_nchw)
    if feats is None:
        assert not (np.asarray(input_ids) < 0).any(), "image slots but no images"
        e = sd[LM + "model.embed_tokens.weight"][np.asarray(input_ids)]
    else:
        e = splice(sd, input_ids, feats)
    return llama_forward(sd, cfg, e, positions, mask)
