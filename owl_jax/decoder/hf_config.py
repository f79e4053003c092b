"""The decoder's `TextConfig` to and from a HF `LlamaConfig` dict (the `text_config` of LLaVA's
and MiniGPT-4's config.json, a Vicuna / LLaMA directory's config.json). LLaMA variants owl-jax
does not run (rope scaling, other activations, biases, tied embeddings, another head_dim) are
errors that name them."""
from __future__ import annotations

from owl_jax.decoder.llama import TextConfig

# transformers' LlamaConfig class defaults (what a config.json leaves out)
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                      rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                      hidden_act="silu")


def int_field(d: dict, key: str, where: str) -> int:
    """d[key], which must be an integer (ValueError naming `where` and the key)."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
    return v


def text_from_dict(d: dict, where: str, pad_fallback=None, tied_ok: bool = False) -> TextConfig:
    """A HF LlamaConfig dict -> TextConfig; LLaMA variants owl-jax does not run are errors.
    tied_ok: the caller unties a tied head itself (the HF LLaMA reader copies the embeddings
    into lm_head), so tie_word_embeddings is no error."""
    c = {**LLAMA_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    problems = []
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r}")
    if c["hidden_act"] != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r}")
    if d.get("attention_bias") or d.get("mlp_bias"):
        problems.append("attention / MLP biases")
    if d.get("tie_word_embeddings") and not tied_ok:
        problems.append("tie_word_embeddings (the LLaMA families have an untied lm_head)")
    hd = d.get("head_dim")
    if hd is not None and hd != c["hidden_size"] // c["num_attention_heads"]:
        problems.append(f"head_dim {hd} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"{where}: unsupported LLaMA variant: {', '.join(problems)}")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "max_position_embeddings", "bos_token_id")
    kw = {k: int_field(c, k, where) for k in sizes}
    eos = c["eos_token_id"]
    kw["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
    if d.get("num_key_value_heads") is not None:
        kw["num_key_value_heads"] = int_field(d, "num_key_value_heads", where)
    kw["rms_norm_eps"] = float(c["rms_norm_eps"])
    kw["rope_theta"] = float(rope.get("rope_theta", c["rope_theta"]))
    for pad in (d.get("pad_token_id"), pad_fallback):
        if isinstance(pad, int) and pad >= 0:  # early LLaMA configs say -1: pad with unk (0)
            kw["pad_token_id"] = pad
            break
    return TextConfig(**kw)


def text_to_dict(t: TextConfig) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"],
                vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.kv_heads,
                head_dim=t.head_dim, max_position_embeddings=t.max_position_embeddings,
                rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, hidden_act="silu",
                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                pad_token_id=t.pad_token_id, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False)
