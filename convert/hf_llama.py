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
from owl_jax.decoder.hf_config import text_from_dict
from owl_jax.decoder.llama import TextConfig


def read_text_config(directory: str) -> TextConfig:
    """TextConfig from a HF LlamaConfig json (`owl_jax.decoder.hf_config`). Variants owl_jax
    does not implement are refused."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (expected a HF LlamaForCausalLM directory)"
                              ) from None
    if c.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"{path}: model_type {c.get('model_type')!r}, expected 'llama'")
    try:
        return text_from_dict(c, path, tied_ok=True)   # read_llama_params unties the head
    except ValueError as e:
        raise CheckpointError(str(e)) from None


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
