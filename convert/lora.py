"""PEFT-style LoRA keys in official checkpoints, and merging them into the base weights.

A LoRA run of the official `pipeline/train.py` saves the PEFT-wrapped model's full state dict:
every key gets the prefix `base_model.model.`, the base weight of an adapted Linear is
`...q_proj.weight` (PEFT < 0.7) or `...q_proj.base_layer.weight` (PEFT >= 0.7), and the adapter is
`...q_proj.lora_A.default.weight` [r, in] / `...q_proj.lora_B.default.weight` [out, r].
Merged weight: W' = W + (alpha / r) * B @ A  (alpha / sqrt(r) with rsLoRA).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
_LORA_KEY = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])\.(?P<name>[^.]+)\.weight$")


@dataclasses.dataclass
class LoraKeys:
    """How the raw keys of a checkpoint map onto official keys and adapter pairs."""
    canonical: dict[str, str]                 # raw key -> official key (base weights, buffers)
    adapters: dict[str, dict[str, str]]       # official weight key -> {"A": raw, "B": raw}
    is_peft: bool

    @property
    def targets(self) -> list[str]:
        """Adapted module names (`q_proj`, ...), sorted."""
        return sorted({k.rsplit(".", 2)[-2] for k in self.adapters})


def classify_keys(raw_keys) -> LoraKeys:
    """Strips the PEFT prefix / `base_layer`, pairs the lora_A / lora_B tensors. Checkpoints
    without the prefix pass through unchanged."""
    raw_keys = list(raw_keys)
    is_peft = any(k.startswith(PEFT_PREFIX) for k in raw_keys)
    canonical, adapters, names = {}, {}, set()
    for raw in raw_keys:
        k = raw[len(PEFT_PREFIX):] if raw.startswith(PEFT_PREFIX) else raw
        m = _LORA_KEY.match(k)
        if m:
            names.add(m.group("name"))
            adapters.setdefault(m.group("base") + ".weight", {})[m.group("ab")] = raw
            continue
        canonical[raw] = k.replace(".base_layer.", ".")
    if len(names) > 1:
        raise ValueError(f"checkpoint holds several LoRA adapters {sorted(names)}; "
                         f"merge one of them with PEFT first")
    for base, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))
            raise ValueError(f"LoRA adapter for {base} is incomplete: found {have} without its "
                             f"lora_{'B' if 'A' in pair else 'A'} partner")
    return LoraKeys(canonical, adapters, is_peft)


@dataclasses.dataclass(frozen=True)
class LoraScale:
    rank: int
    alpha: float
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(directory: str) -> dict | None:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def resolve_scale(directory: str, rank_in_weights: int, alpha: float | None = None,
                  rank: int | None = None) -> LoraScale:
    """alpha / r from flags, else from adapter_config.json in `directory`. The rank must agree
    with the adapter tensors."""
    conf = read_adapter_config(directory) or {}
    alpha = alpha if alpha is not None else conf.get("lora_alpha")
    rank = rank if rank is not None else conf.get("r", rank_in_weights)
    if alpha is None:
        raise ValueError(f"the checkpoint holds LoRA adapters but LoRA alpha is unknown: no "
                         f"{ADAPTER_CONFIG} in {directory}; pass --lora_alpha (and --lora_r)")
    if int(rank) != rank_in_weights:
        raise ValueError(f"LoRA rank {rank} (flag / {ADAPTER_CONFIG}) does not match the "
                         f"adapter tensors, which have rank {rank_in_weights}")
    return LoraScale(int(rank), float(alpha), bool(conf.get("use_rslora", False)))


def merge_torch_layout(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W [out, in] + scale * B [out, r] @ A [r, in], computed in float32, returned in W's dtype."""
    f32 = np.float32
    c = lambda x: np.ascontiguousarray(x, dtype=f32)  # same memory order -> same BLAS path
    merged = c(w) + f32(scale) * (c(b) @ c(a))
    return merged.astype(w.dtype)


def merge_kernel(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray,
                 scale: float) -> np.ndarray:
    """Our layout: kernel [in, out], lora_a [in, r], lora_b [r, out] -> merged kernel [in, out].
    Same arithmetic as `merge_torch_layout` on the transposes (so both paths agree)."""
    merged = merge_torch_layout(kernel.T, lora_a.T, lora_b.T, scale)
    return np.ascontiguousarray(merged.T)


def merge_params(params: dict, lora_meta: dict | None) -> None:
    """Every unmerged adapter pair (`lora_a` / `lora_b` leaves, a checkpoint's `lora` meta:
    rank and alpha) merged into its module's kernel, in place (jax-to-torch of a LoRA run)."""
    if not lora_meta:
        return
    from owl_jax.convert.keymap import flatten, get_path, pop_path, set_path
    scale = float(lora_meta["alpha"]) / int(lora_meta["rank"])
    for path in [p for p in flatten(params) if p[-1] == "lora_a"]:
        module = path[:-1]
        a, b = pop_path(params, path), pop_path(params, module + ("lora_b",))
        kernel = get_path(params, module + ("kernel",))
        set_path(params, module + ("kernel",), merge_kernel(kernel, a, b, scale))
