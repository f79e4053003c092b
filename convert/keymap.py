"""The machinery of key tables between PyTorch state_dict keys and owl_jax param paths, and
the LLaMA table every family's decoder shares (a family's own table: its `keymap.py`, e.g.
owl_jax.families.owl1.keymap).

Each `Entry` names a PyTorch key, the matching leaf of our unrolled param tree, how the tensor
is transformed between the two, and the PyTorch shape the config implies. Every size comes from
the model config, so a checkpoint is checked against its own config.json, never against 7B
defaults.

Transforms (PyTorch -> JAX; the inverse is applied on export):
- "linear": Linear weight [out, in] -> Dense kernel [in, out] (transpose);
- "conv":   Conv2d weight [O, I, kh, kw] -> HWIO [kh, kw, I, O];
- "plain":  identity (biases, norm weights -> `scale`, embeddings, tokens);
- "buffer": a derived, non-learned buffer (LLaMA `rotary_emb.inv_freq`): skipped on import,
  recomputed on export (transformers 4.28.1 keeps it persistent, so strict loading needs it).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from owl_jax.convert.torch_io import checkpoint_problems
from owl_jax.decoder.llama import TextConfig

LINEAR, CONV, PLAIN, BUFFER = "linear", "conv", "plain", "buffer"


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    path: tuple[str, ...]      # our param path; () for buffers
    kind: str
    torch_shape: tuple[int, ...]

    @property
    def jax_shape(self) -> tuple[int, ...]:
        return jax_shape(self.kind, self.torch_shape)

    @property
    def path_str(self) -> str:
        return "/".join(self.path)


def jax_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == LINEAR:
        return (shape[1], shape[0])
    if kind == CONV:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(shape)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is `align`-byte aligned: jax can then
    adopt it as a host buffer without copying (`jax.device_put(..., may_alias=True)`)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def cast_aligned(x: np.ndarray, dtype) -> np.ndarray:
    """`x.astype(dtype)` into an aligned buffer (same rounding as astype)."""
    out = aligned_empty(x.shape, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def to_jax(kind: str, x: np.ndarray) -> np.ndarray:
    """PyTorch layout -> our layout. Returns a fresh, aligned, C-contiguous array (never a view
    of `x`, so the caller may drop the source tensor / memory map)."""
    if kind == LINEAR:
        x = x.T
    elif kind == CONV:
        x = x.transpose(2, 3, 1, 0)
    out = aligned_empty(x.shape, x.dtype)
    np.copyto(out, x)
    return out


def to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """Our layout -> PyTorch layout (fresh C-contiguous array)."""
    if kind == LINEAR:
        return np.ascontiguousarray(x.T)
    if kind == CONV:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return np.array(x, copy=True)


def rope_inv_freq(text: TextConfig) -> np.ndarray:
    """`1 / theta ** (arange(0, d, 2) / d)` in float32, as HF LlamaRotaryEmbedding builds it."""
    d = text.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    return (1.0 / (np.float32(text.rope_theta) ** exponent)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The table


class Table:
    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, key, path, kind, shape):
        self.entries.append(Entry(key, tuple(path.split("/")) if path else (), kind, tuple(shape)))

    def linear(self, key, path, out, inp, bias=True):
        self.add(key + ".weight", path + "/kernel", LINEAR, (out, inp))
        if bias:
            self.add(key + ".bias", path + "/bias", PLAIN, (out,))

    def norm(self, key, path, d, bias=True):
        self.add(key + ".weight", path + "/scale", PLAIN, (d,))
        if bias:
            self.add(key + ".bias", path + "/bias", PLAIN, (d,))


def llama_table(t: Table, text: TextConfig, key_prefix: str = "language_model.",
                with_buffers: bool = True):
    """HF LlamaForCausalLM keys (4.28.1 names) under `key_prefix` -> `language_model/...`."""
    d, f, hd = text.hidden_size, text.intermediate_size, text.head_dim
    q, kv = text.num_attention_heads * hd, text.kv_heads * hd
    k = key_prefix
    t.add(k + "model.embed_tokens.weight", "language_model/embed_tokens/embedding", PLAIN,
          (text.vocab_size, d))
    for i in range(text.num_hidden_layers):
        tk, tp = f"{k}model.layers.{i}.", f"language_model/layers_{i}/"
        t.linear(tk + "self_attn.q_proj", tp + "self_attn/q_proj", q, d, bias=False)
        t.linear(tk + "self_attn.k_proj", tp + "self_attn/k_proj", kv, d, bias=False)
        t.linear(tk + "self_attn.v_proj", tp + "self_attn/v_proj", kv, d, bias=False)
        t.linear(tk + "self_attn.o_proj", tp + "self_attn/o_proj", d, q, bias=False)
        if with_buffers:
            t.add(tk + "self_attn.rotary_emb.inv_freq", "", BUFFER, (hd // 2,))
        t.linear(tk + "mlp.gate_proj", tp + "mlp/gate_proj", f, d, bias=False)
        t.linear(tk + "mlp.up_proj", tp + "mlp/up_proj", f, d, bias=False)
        t.linear(tk + "mlp.down_proj", tp + "mlp/down_proj", d, f, bias=False)
        t.norm(tk + "input_layernorm", tp + "input_layernorm", d, bias=False)
        t.norm(tk + "post_attention_layernorm", tp + "post_attention_layernorm", d, bias=False)
    t.norm(k + "model.norm", "language_model/norm", d, bias=False)
    t.linear(k + "lm_head", "language_model/lm_head", text.vocab_size, d, bias=False)


def hf_llama_entries(text: TextConfig) -> list[Entry]:
    """Keys of a plain HF `LlamaForCausalLM` checkpoint (no buffers; newer transformers never
    save `inv_freq`)."""
    t = Table()
    llama_table(t, text, key_prefix="", with_buffers=False)
    return t.entries


# --------------------------------------------------------------------------------------------
# Nested-dict helpers for the param tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def pop_path(tree: dict, path: tuple[str, ...]):
    """Removes and returns a leaf, pruning dicts left empty (frees memory as export streams)."""
    parents = []
    node = tree
    for p in path[:-1]:
        parents.append((node, p))
        node = node[p]
    value = node.pop(path[-1])
    for parent, key in reversed(parents):
        if parent[key]:
            break
        del parent[key]
    return value


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def check_keys(infos: dict, entries: list, canonical, where: str,
               skip=lambda key: False) -> dict[str, str]:
    """raw key -> table key for every tensor to read (infos: raw key -> an object with .shape
    and .file; `canonical(raw)`: its table key, None to pass it by; `skip(raw)`: keys the
    layout holds but the model does not use). Raises one error naming every missing,
    unexpected, mis-shaped or doubly spelled key."""
    by_key = {e.torch_key: e for e in entries}
    problems, roles, seen = [], {}, {}
    for raw, info in infos.items():
        k = None if skip(raw) else canonical(raw)
        if k is None:
            continue
        e = by_key.get(k)
        if e is None:
            problems.append(f"unexpected key {raw} {list(info.shape)} (in "
                            f"{os.path.basename(info.file)})")
        elif k in seen:
            problems.append(f"{raw} and {seen[k]} are the same tensor ({k}) spelled twice")
        elif tuple(info.shape) != e.torch_shape:
            problems.append(f"{raw}: the config implies shape {list(e.torch_shape)}, "
                            f"{os.path.basename(info.file)} has {list(info.shape)}")
        else:
            roles[raw], seen[k] = k, raw
    problems += [f"missing key {e.torch_key} {list(e.torch_shape)}" for e in entries
                 if e.torch_key not in seen]
    if problems:
        raise checkpoint_problems(f"{where} does not match its config", problems)
    return roles
