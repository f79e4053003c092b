"""The official mPLUG-Owl weight layout, written from the fact sheet (`shared/reference/
mplug_owl.md` §1), independently of convert/keymap.py, so the tests have a second derivation of
the converter's key table:
- `official_shapes(cfg)`: every official state_dict key and its shape;
- `random_official_state_dict(cfg, seed)`: random official-layout weights with norm scales away
  from 1, non-zero biases, non-zero query_tokens / vit_eos (for numpy_ref.py's forward);
- `official_to_flax(sd, cfg)`: maps that state_dict onto owl_jax's unrolled param tree;
- `nchw_to_nhwc(x)`: official pixel layout to owl_jax's.
"""
from __future__ import annotations

import numpy as np

VIT = "vision_model."
ABS = "abstractor."
LM = "language_model."


# --------------------------------------------------------------------------------------------
# Random official-layout weights (shapes from §1 of the fact sheet)


def official_shapes(cfg):
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    dv, da, dt = v.hidden_size, a.hidden_size, t.hidden_size
    hd_t = t.hidden_size // t.num_attention_heads
    s = {
        "query_tokens": (1, cfg.num_query_tokens, da),
        VIT + "embeddings.cls_token": (1, 1, dv),
        VIT + "embeddings.position_embedding": (1, v.num_positions, dv),
        VIT + "embeddings.patch_embed.weight": (dv, v.num_channels, v.patch_size, v.patch_size),
        VIT + "embeddings.pre_layernorm.weight": (dv,),
        VIT + "embeddings.pre_layernorm.bias": (dv,),
        VIT + "post_layernorm.weight": (dv,),
        VIT + "post_layernorm.bias": (dv,),
        ABS + "visual_fc.weight": (dt, da),
        ABS + "visual_fc.bias": (dt,),
        ABS + "vit_eos": (1, 1, dt),
        LM + "model.embed_tokens.weight": (t.vocab_size, dt),
        LM + "model.norm.weight": (dt,),
        LM + "lm_head.weight": (t.vocab_size, dt),
    }

    def lin(name, out, inp, bias=True):
        s[name + ".weight"] = (out, inp)
        if bias:
            s[name + ".bias"] = (out,)

    def norm(name, d, bias=True):
        s[name + ".weight"] = (d,)
        if bias:
            s[name + ".bias"] = (d,)

    for i in range(v.num_hidden_layers):
        p = f"{VIT}encoder.layers.{i}."
        norm(p + "input_layernorm", dv)
        lin(p + "self_attn.query_key_value", 3 * dv, dv)
        lin(p + "self_attn.dense", dv, dv)
        norm(p + "post_attention_layernorm", dv)
        lin(p + "mlp.fc1", v.intermediate_size, dv)
        lin(p + "mlp.fc2", dv, v.intermediate_size)
    for i in range(a.num_hidden_layers):
        p = f"{ABS}encoder.layers.{i}.crossattention."
        norm(p + "norm1", da)
        norm(p + "normk", da)
        lin(p + "attention.query", da, da)
        lin(p + "attention.key", da, a.encoder_hidden_size)
        lin(p + "attention.value", da, a.encoder_hidden_size)
        lin(p + "output.out_proj", da, da)
        norm(p + "output.norm2", da)
        lin(p + "output.mlp.w1", a.intermediate_size, da)
        lin(p + "output.mlp.w3", a.intermediate_size, da)
        norm(p + "output.mlp.ffn_ln", a.intermediate_size)
        lin(p + "output.mlp.w2", da, a.intermediate_size)
    for i in range(t.num_hidden_layers):
        p = f"{LM}model.layers.{i}."
        lin(p + "self_attn.q_proj", dt, dt, False)
        lin(p + "self_attn.k_proj", t.kv_heads * hd_t, dt, False)
        lin(p + "self_attn.v_proj", t.kv_heads * hd_t, dt, False)
        lin(p + "self_attn.o_proj", dt, dt, False)
        lin(p + "mlp.gate_proj", t.intermediate_size, dt, False)
        lin(p + "mlp.up_proj", t.intermediate_size, dt, False)
        lin(p + "mlp.down_proj", dt, t.intermediate_size, False)
        norm(p + "input_layernorm", dt, False)
        norm(p + "post_attention_layernorm", dt, False)
    return s


def random_official_state_dict(cfg, seed=0):
    """float64 weights: Linear ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.3), biases N(0, 0.1),
    token embeddings / vit_eos N(0, 1); the inputs of the first vision and abstractor LayerNorms
    (patches, CLS, positions, queries) are small so that a wrong eps shows."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in official_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(k in name for k in ("layernorm", "norm1", "normk", "norm2", "ffn_ln",
                                          "model.norm"))
        if is_norm and leaf == "weight":
            x = 1.0 + 0.3 * rng.standard_normal(shape)
        elif leaf == "bias":
            x = 0.1 * rng.standard_normal(shape)
        elif name.endswith("patch_embed.weight"):
            x = 0.1 * rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif name in ("query_tokens", VIT + "embeddings.cls_token",
                      VIT + "embeddings.position_embedding"):
            # small inputs to the first LayerNorms, so their eps visibly changes the result
            x = 0.05 * rng.standard_normal(shape)
        elif len(shape) == 2 and "embed_tokens" not in name:
            x = rng.standard_normal(shape) / np.sqrt(shape[1])
        else:  # cls_token, position_embedding, query_tokens, vit_eos, embed_tokens
            x = rng.standard_normal(shape)
        sd[name] = x
    return sd


# --------------------------------------------------------------------------------------------
# Official state_dict -> owl_jax unrolled param tree (a second derivation of the converter table)


def official_to_flax(sd, cfg, dtype=np.float32):
    """Linear [out, in] -> kernel [in, out]; conv [O, I, kh, kw] -> HWIO; norms -> scale/bias."""
    c = lambda x: np.asarray(x, dtype)

    def dense(name, bias=True):
        d = {"kernel": c(sd[name + ".weight"].T)}
        if bias:
            d["bias"] = c(sd[name + ".bias"])
        return d

    def norm(name, bias=True):
        d = {"scale": c(sd[name + ".weight"])}
        if bias:
            d["bias"] = c(sd[name + ".bias"])
        return d

    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    vision = {
        "embeddings": {
            "cls_token": c(sd[VIT + "embeddings.cls_token"]),
            "position_embedding": c(sd[VIT + "embeddings.position_embedding"]),
            "patch_embed": {"kernel": c(sd[VIT + "embeddings.patch_embed.weight"]
                                        .transpose(2, 3, 1, 0))},
            "pre_layernorm": norm(VIT + "embeddings.pre_layernorm"),
        },
        "post_layernorm": norm(VIT + "post_layernorm"),
    }
    for i in range(v.num_hidden_layers):
        p = f"{VIT}encoder.layers.{i}."
        vision[f"layers_{i}"] = {
            "input_layernorm": norm(p + "input_layernorm"),
            "self_attn": {"query_key_value": dense(p + "self_attn.query_key_value"),
                          "dense": dense(p + "self_attn.dense")},
            "post_attention_layernorm": norm(p + "post_attention_layernorm"),
            "mlp": {"fc1": dense(p + "mlp.fc1"), "fc2": dense(p + "mlp.fc2")},
        }
    abstractor = {"visual_fc": dense(ABS + "visual_fc"), "vit_eos": c(sd[ABS + "vit_eos"])}
    for i in range(a.num_hidden_layers):
        p = f"{ABS}encoder.layers.{i}.crossattention."
        abstractor[f"layers_{i}"] = {
            "norm1": norm(p + "norm1"), "normk": norm(p + "normk"),
            "query": dense(p + "attention.query"), "key": dense(p + "attention.key"),
            "value": dense(p + "attention.value"), "out_proj": dense(p + "output.out_proj"),
            "norm2": norm(p + "output.norm2"), "w1": dense(p + "output.mlp.w1"),
            "w3": dense(p + "output.mlp.w3"), "ffn_ln": norm(p + "output.mlp.ffn_ln"),
            "w2": dense(p + "output.mlp.w2"),
        }
    lm = {
        "embed_tokens": {"embedding": c(sd[LM + "model.embed_tokens.weight"])},
        "norm": norm(LM + "model.norm", bias=False),
        "lm_head": dense(LM + "lm_head", bias=False),
    }
    for i in range(t.num_hidden_layers):
        p = f"{LM}model.layers.{i}."
        lm[f"layers_{i}"] = {
            "input_layernorm": norm(p + "input_layernorm", bias=False),
            "self_attn": {n: dense(p + f"self_attn.{n}", bias=False)
                          for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "post_attention_layernorm": norm(p + "post_attention_layernorm", bias=False),
            "mlp": {n: dense(p + f"mlp.{n}", bias=False)
                    for n in ("gate_proj", "up_proj", "down_proj")},
        }
    return {"vision_model": vision, "query_tokens": c(sd["query_tokens"]),
            "abstractor": abstractor, "language_model": lm}


def nchw_to_nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))
