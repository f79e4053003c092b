"""Synthetic checkpoints in the official mPLUG-Owl layout, for tests and benchmarks.

`write_official_checkpoint` writes RANDOM, non-trivial weights (norm scales away from 1, non-zero
biases, non-zero query_tokens / vit_eos) under the exact official key names and shapes, the
`rotary_emb.inv_freq` buffers included, in any of the four HF file layouts, tensor by tensor (a
1 GB checkpoint needs about one shard of memory to write).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from owl_jax.convert import keymap
from owl_jax.families.owl1 import keymap as owl_keymap
from owl_jax.convert.official import set_torch_dtype
from owl_jax.convert.torch_io import ShardedWriter, np_dtype, numpy_to_torch, torch_to_numpy
from owl_jax.families.owl1.config import OwlConfig, save_official

LAYOUTS = ("bin", "sharded_bin", "safetensors", "sharded_safetensors")
_NORM_MARKERS = ("layernorm", "norm1", "normk", "norm2", "ffn_ln", "model.norm")


def random_tensor(rng: np.random.Generator, key: str, shape) -> np.ndarray:
    """float32 values whose scale keeps a forward pass well-conditioned."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and any(m in key for m in _NORM_MARKERS):
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if leaf == "bias":
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if key.endswith("patch_embed.weight"):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    if len(shape) == 2 and "embed_tokens" not in key:  # Linear [out, in]
        return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    # cls_token, position_embedding, query_tokens, vit_eos, embed_tokens
    return (0.5 * rng.standard_normal(shape)).astype(np.float32)


def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """float32 -> `dtype` with torch's rounding (round to nearest even)."""
    return torch_to_numpy(numpy_to_torch(x).to(_torch_dtype(dtype)))


def _torch_dtype(dtype):
    import torch
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[np.dtype(np_dtype(dtype)).name]


def write_official_checkpoint(directory: str, cfg: OwlConfig, dtype: str = "float32",
                              layout: str = "bin", seed: int = 0,
                              tokenizer_dir: str | None = None, lora: dict | None = None,
                              shard_size: int | str | None = None) -> list[str]:
    """Writes config.json, preprocessor_config.json, weights (and tokenizer files, and with
    `lora` an adapter_config.json) into `directory`. Returns the written tensor keys in order.

    lora: {"rank": 8, "alpha": 32, "targets": ("q_proj", "v_proj"), "base_layer": False,
      "write_config": True} -> the PEFT layout of a LoRA run of the official trainer: every key
      prefixed `base_model.model.`, random non-zero `lora_A.default` / `lora_B.default`.
    shard_size: bytes per shard for the sharded layouts (default: a third of the model, so there
      are always several shards).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    rng = np.random.default_rng(seed)
    entries = owl_keymap.official_entries(cfg)
    itemsize = np.dtype(np_dtype(dtype)).itemsize
    total = sum(int(np.prod(e.torch_shape)) * itemsize for e in entries)
    sharded = layout.startswith("sharded")
    max_bytes = (shard_size or total // 3 + 1) if sharded else 2 ** 62
    fmt = "safetensors" if layout.endswith("safetensors") else "bin"
    writer = ShardedWriter(directory, fmt, max_bytes)
    inv_freq = keymap.rope_inv_freq(cfg.text)
    lora = dict(lora) if lora is not None else None
    targets = tuple(lora.get("targets", ("q_proj", "v_proj"))) if lora else ()
    prefix = "base_model.model." if lora else ""
    written = []

    def add(key, x):
        writer.add(key, x)
        written.append(key)

    for e in entries:
        if e.kind == keymap.BUFFER:
            add(prefix + e.torch_key, round_to(inv_freq, dtype))
            continue
        x = round_to(random_tensor(rng, e.torch_key, e.torch_shape), dtype)
        module = e.torch_key.rsplit(".", 1)[0]
        adapted = lora and e.kind == keymap.LINEAR and module.rsplit(".", 1)[-1] in targets
        base = module + (".base_layer.weight" if adapted and lora.get("base_layer") else ".weight")
        add(prefix + (base if adapted else e.torch_key), x)
        if adapted:
            out, inp = e.torch_shape
            r = int(lora.get("rank", 8))
            a = rng.standard_normal((r, inp)) / np.sqrt(inp)
            b = 0.1 * rng.standard_normal((out, r))
            add(prefix + module + ".lora_A.default.weight", round_to(a.astype(np.float32), dtype))
            add(prefix + module + ".lora_B.default.weight", round_to(b.astype(np.float32), dtype))
    writer.close()
    save_official(cfg, directory)
    set_torch_dtype(os.path.join(directory, "config.json"), np_dtype(dtype))
    if lora and lora.get("write_config", True):
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": None, "r": int(lora.get("rank", 8)),
                       "lora_alpha": lora.get("alpha", 32), "lora_dropout": 0.05,
                       "target_modules": list(targets), "bias": "none"}, f, indent=2)
    if tokenizer_dir:
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(tokenizer_dir, name)):
                shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
    return written
