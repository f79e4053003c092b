"""mPLUG-Owl's official state_dict keys <-> owl_jax param paths
(`MplugOwlForConditionalGeneration`, transformers 4.28.1 names), built on the table machinery
of owl_jax.convert.keymap."""
from __future__ import annotations

from owl_jax.convert.keymap import CONV, LINEAR, PLAIN, Entry, Table, llama_table
from owl_jax.families.owl1.config import OwlConfig


def _vision(t: Table, cfg: OwlConfig):
    v = cfg.vision
    d, k = v.hidden_size, "vision_model."
    t.add(k + "embeddings.cls_token", "vision_model/embeddings/cls_token", PLAIN, (1, 1, d))
    t.add(k + "embeddings.position_embedding", "vision_model/embeddings/position_embedding",
          PLAIN, (1, v.num_positions, d))
    t.add(k + "embeddings.patch_embed.weight", "vision_model/embeddings/patch_embed/kernel", CONV,
          (d, v.num_channels, v.patch_size, v.patch_size))
    t.norm(k + "embeddings.pre_layernorm", "vision_model/embeddings/pre_layernorm", d)
    for i in range(v.num_hidden_layers):
        tk, tp = f"{k}encoder.layers.{i}.", f"vision_model/layers_{i}/"
        t.norm(tk + "input_layernorm", tp + "input_layernorm", d)
        # Fused QKV, rows interleaved per head ([heads, 3, head_dim]); kept fused as is.
        t.linear(tk + "self_attn.query_key_value", tp + "self_attn/query_key_value", 3 * d, d)
        t.linear(tk + "self_attn.dense", tp + "self_attn/dense", d, d)
        t.norm(tk + "post_attention_layernorm", tp + "post_attention_layernorm", d)
        t.linear(tk + "mlp.fc1", tp + "mlp/fc1", v.intermediate_size, d)
        t.linear(tk + "mlp.fc2", tp + "mlp/fc2", d, v.intermediate_size)
    t.norm(k + "post_layernorm", "vision_model/post_layernorm", d)


def _abstractor(t: Table, cfg: OwlConfig):
    a, dt = cfg.abstractor, cfg.text.hidden_size
    d, dk, f = a.hidden_size, a.encoder_hidden_size, a.intermediate_size
    for i in range(a.num_hidden_layers):
        tk, tp = f"abstractor.encoder.layers.{i}.crossattention.", f"abstractor/layers_{i}/"
        t.norm(tk + "norm1", tp + "norm1", d)
        t.norm(tk + "normk", tp + "normk", dk)
        t.linear(tk + "attention.query", tp + "query", d, d)
        t.linear(tk + "attention.key", tp + "key", d, dk)
        t.linear(tk + "attention.value", tp + "value", d, dk)
        t.linear(tk + "output.out_proj", tp + "out_proj", d, d)
        t.norm(tk + "output.norm2", tp + "norm2", d)
        t.linear(tk + "output.mlp.w1", tp + "w1", f, d)
        t.linear(tk + "output.mlp.w3", tp + "w3", f, d)
        t.norm(tk + "output.mlp.ffn_ln", tp + "ffn_ln", f)
        t.linear(tk + "output.mlp.w2", tp + "w2", d, f)
    t.linear("abstractor.visual_fc", "abstractor/visual_fc", dt, d)
    t.add("abstractor.vit_eos", "abstractor/vit_eos", PLAIN, (1, 1, dt))


def official_entries(cfg: OwlConfig) -> list[Entry]:
    """Every key of `MplugOwlForConditionalGeneration.state_dict()` for `cfg`, in state_dict
    order (the top-level `query_tokens` Parameter first, then the children)."""
    if cfg.abstractor.encoder_hidden_size != cfg.vision.hidden_size:
        raise ValueError(f"visual_abstractor_config.encoder_hidden_size "
                         f"({cfg.abstractor.encoder_hidden_size}) != vision_config.hidden_size "
                         f"({cfg.vision.hidden_size})")
    t = Table()
    t.add("query_tokens", "query_tokens", PLAIN,
          (1, cfg.num_query_tokens, cfg.abstractor.hidden_size))
    _vision(t, cfg)
    _abstractor(t, cfg)
    llama_table(t, cfg.text)
    return t.entries
