"""mPLUG-Owl3 checkpoint keys (the official `mPLUGOwl3Model.state_dict()`) <-> owl_jax params.

  language_model.model.*, language_model.lm_head.weight   Qwen2 (q/k/v biases), hyper layers
      add self_attn.v_kv_proj.{weight,bias} and, in 240728, self_attn.gate_proj.0.{weight,bias}
  vision_model.embeddings / encoder.layers.{j} / post_layernorm   transformers' SigLIP
  vision2text_model.{weight,bias} (240728) or vision2text_model.{0,2}.{weight,bias} (241101)

`vision_model.head.*` (SigLIP's attention-pool head, never read by the model) is dropped on
import and not written on export (the official class then initialises it, unused). With tied
embeddings the lm_head key, when present, is the embedding table again and is dropped.
"""
from __future__ import annotations

from owl_jax.convert.keymap import CONV, LINEAR, PLAIN, Table

IGNORED_PREFIXES = ("vision_model.head.",)


def entries(cfg) -> list:
    t = Table()
    text, v = cfg.text, cfg.vision
    d, f, hd = text.hidden_size, text.intermediate_size, text.head_dim
    q, kv = text.num_attention_heads * hd, text.kv_heads * hd
    t.add("language_model.model.embed_tokens.weight", "language_model/embed_tokens/embedding",
          PLAIN, (text.vocab_size, d))
    for i in range(text.num_hidden_layers):
        k, p = f"language_model.model.layers.{i}.", f"language_model/layers_{i}/"
        t.linear(k + "self_attn.q_proj", p + "self_attn/q_proj", q, d)
        t.linear(k + "self_attn.k_proj", p + "self_attn/k_proj", kv, d)
        t.linear(k + "self_attn.v_proj", p + "self_attn/v_proj", kv, d)
        t.linear(k + "self_attn.o_proj", p + "self_attn/o_proj", d, q, bias=False)
        if i + 1 in cfg.hyper_layers:
            t.linear(k + "self_attn.v_kv_proj", p + "self_attn/v_kv_proj", 2 * kv, d)
            if cfg.fusion == "gate":
                t.linear(k + "self_attn.gate_proj.0", p + "self_attn/gate_proj", hd, hd)
        t.linear(k + "mlp.gate_proj", p + "mlp/gate_proj", f, d, bias=False)
        t.linear(k + "mlp.up_proj", p + "mlp/up_proj", f, d, bias=False)
        t.linear(k + "mlp.down_proj", p + "mlp/down_proj", d, f, bias=False)
        t.norm(k + "input_layernorm", p + "input_layernorm", d, bias=False)
        t.norm(k + "post_attention_layernorm", p + "post_attention_layernorm", d, bias=False)
    t.norm("language_model.model.norm", "language_model/norm", d, bias=False)
    if not text.tie_word_embeddings:
        t.linear("language_model.lm_head", "language_model/lm_head", text.vocab_size, d,
                 bias=False)
    vd, vf, ps = v.hidden_size, v.intermediate_size, v.patch_size
    t.add("vision_model.embeddings.patch_embedding.weight",
          "vision_model/embeddings/patch_embedding/kernel", CONV, (vd, v.num_channels, ps, ps))
    t.add("vision_model.embeddings.patch_embedding.bias",
          "vision_model/embeddings/patch_embedding/bias", PLAIN, (vd,))
    t.add("vision_model.embeddings.position_embedding.weight",
          "vision_model/embeddings/position_embedding", PLAIN, (v.num_positions, vd))
    for j in range(v.num_hidden_layers):
        k, p = f"vision_model.encoder.layers.{j}.", f"vision_model/layers_{j}/"
        t.norm(k + "layer_norm1", p + "layer_norm1", vd)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t.linear(k + "self_attn." + name, p + "self_attn/" + name, vd, vd)
        t.norm(k + "layer_norm2", p + "layer_norm2", vd)
        t.linear(k + "mlp.fc1", p + "mlp/fc1", vf, vd)
        t.linear(k + "mlp.fc2", p + "mlp/fc2", vd, vf)
    t.norm("vision_model.post_layernorm", "vision_model/post_layernorm", vd)
    if cfg.projector == "linear":
        t.linear("vision2text_model", "vision2text_model/linear_1", d, vd)
    else:
        t.linear("vision2text_model.0", "vision2text_model/linear_1", d, vd)
        t.linear("vision2text_model.2", "vision2text_model/linear_2", d, d)
    return t.entries


def ignored(cfg, key: str) -> bool:
    """Keys a checkpoint may hold that the model does not use."""
    if key.startswith(IGNORED_PREFIXES):
        return True
    return cfg.text.tie_word_embeddings and key == "language_model.lm_head.weight"


def version_hint(keys) -> str | None:
    """The code version a state_dict's projector keys imply (None: no projector keys)."""
    keys = set(keys)
    if "vision2text_model.0.weight" in keys:
        return "241101"
    if "vision2text_model.weight" in keys:
        return "240728"
    return None
