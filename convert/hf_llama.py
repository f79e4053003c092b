"""A HF `LlamaForCausalLM` directory -> the `language_model` part of an Owl param tree.

HF LLaMA keeps q/k in the rotate-half layout and owl_jax's RoPE is rotate-half too, so no
permutation is needed: every Linear is transposed, everything else is copied.
"""
from __future__ import annotations

import json
import os

from tqdm import tqdm

from owl_jax.convert import keymap
from owl_jax.convert.torch_io import CheckpointError, CheckpointReader, np_dtype
from owl_jax.checkpoint import host_array
from owl_jax.decoder.llama import TextConfig


def read_text_config(directory: str) -> TextConfig:
    """TextConfig from a HF LlamaConfig json. Variants owl_jax does not implement are refused."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (expected a HF LlamaForCausalLM directory)"
                              ) from None
    if c.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"{path}: model_type {c.get('model_type')!r}, expected 'llama'")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
    missing = [k for k in need if k not in c]
    if missing:
        raise CheckpointError(f"{path}: missing {missing}")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or \
        (scaling or {}).get("type") or "default"
    unsupported = []
    if rope_type != "default":
        unsupported.append(f"rope type {rope_type!r}")
    if c.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {c['hidden_act']!r}")
    if c.get("attention_bias") or c.get("mlp_bias"):
        unsupported.append("attention / MLP biases")
    hd = c.get("head_dim")
    if hd is not None and hd != c["hidden_size"] // c["num_attention_heads"]:
        unsupported.append(f"head_dim {hd} != hidden_size / num_attention_heads")
    if unsupported:
        raise CheckpointError(f"{path}: unsupported LLaMA variant: {', '.join(unsupported)}")
    kw = {k: c[k] for k in need}
    for k in ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
              "eos_token_id"):
        if isinstance(c.get(k), (int, float)) and not isinstance(c.get(k), bool):
            kw[k] = c[k]
    theta = rope.get("rope_theta", c.get("rope_theta"))
    if theta is not None:
        kw["rope_theta"] = float(theta)
    if isinstance(c.get("pad_token_id"), int) and c["pad_token_id"] >= 0:
        kw["pad_token_id"] = c["pad_token_id"]
    return TextConfig(**kw)


def read_llama_params(directory: str, text: TextConfig, dtype: str | None = None,
                      progress: bool = True) -> dict:
    """{'language_model': {...}} in our layout. Checks keys and shapes against `text` first."""
    entries = keymap.hf_llama_entries(text)
    by_key = {e.torch_key: e for e in entries}
    reader = CheckpointReader(directory)
    infos = reader.index()
    tied = "lm_head.weight" not in infos
    problems = []
    for k, info in infos.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        e = by_key.get(k)
        if e is None:
            problems.append(f"unexpected key {k} {list(info.shape)}")
        elif tuple(info.shape) != e.torch_shape:
            problems.append(f"{k}: config.json implies {list(e.torch_shape)}, "
                            f"{os.path.basename(info.file)} has {list(info.shape)}")
    for e in entries:
        if e.torch_key not in infos and not (tied and e.torch_key == "lm_head.weight"):
            problems.append(f"missing key {e.torch_key} {list(e.torch_shape)}")
    if problems:
        raise CheckpointError(f"{directory}: not a LlamaForCausalLM checkpoint matching its "
                              f"config.json:\n  " + "\n  ".join(problems[:25]))
    target = np_dtype(dtype) if dtype else None
    params: dict = {}
    for k, x in tqdm(reader.tensors(), total=len(infos), unit="tensor", desc="hf-llama",
                     disable=not progress):
        if k not in by_key:
            continue
        e = by_key[k]
        y = keymap.to_jax(e.kind, x)
        del x
        y = y.astype(target) if target is not None else y
        keymap.set_path(params, e.path, host_array(y))
        if tied and k == "model.embed_tokens.weight":  # tied head: lm_head = embed^T
            keymap.set_path(params, ("language_model", "lm_head", "kernel"),
                            host_array(keymap.to_jax(keymap.LINEAR, y)))
        del y
    return params
