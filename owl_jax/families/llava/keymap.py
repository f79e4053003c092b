"""LLaVA checkpoint keys <-> owl_jax param paths, for both layouts.

Tables are written in one spelling per layout, with shapes from the LlavaConfig:
- llava-hf: the hub names of transformers 4.x (`language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`).
  `canonical_hf` maps the other spellings onto them: transformers 5.x files
  (`vision_tower.*` without `vision_model.`) and 5.x module names (`model.language_model.*`,
  `lm_head.weight`, `model.vision_tower.*`, `model.multi_modal_projector.*`).
- original: the LLM and projector (`model.*`, `lm_head.weight`, `model.mm_projector.*`); the CLIP
  tower (`vision_model.*`) in its own directory, or inside the checkpoint under
  `model.vision_tower.vision_tower.` (self-trained runs).

Kinds (torch -> jax; the inverse on export), as owl_jax.convert.keymap plus:
- "reshape": the same values with leading unit axes (CLIP's class / position embeddings);
- "q", "k", "v": one third of the tower's fused `query_key_value` kernel or bias (owl_jax keeps
  the official per-head [heads, 3, head_dim] interleave on the output axis; HF CLIP has three
  separate Linears).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from owl_jax.convert import hf_clip, keymap as owl_keymap
from owl_jax.families.llava.config import LlavaConfig

LINEAR, CONV, PLAIN = owl_keymap.LINEAR, owl_keymap.CONV, owl_keymap.PLAIN
RESHAPE = "reshape"
QKV = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    path: tuple[str, ...]
    kind: str
    torch_shape: tuple[int, ...]
    jax_shape: tuple[int, ...]


class Table:
    """Builds entries; `add` / `linear` / `norm` as owl_jax.convert.keymap's table, so that its
    `llama_table` fills this one too."""

    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, key, path, kind, shape, jax_shape=None):
        shape = tuple(shape)
        self.entries.append(Entry(key, tuple(path.split("/")), kind, shape,
                                  tuple(jax_shape or owl_keymap.jax_shape(kind, shape))))

    def linear(self, key, path, out, inp, bias=True):
        self.add(key + ".weight", path + "/kernel", LINEAR, (out, inp))
        if bias:
            self.add(key + ".bias", path + "/bias", PLAIN, (out,))

    def norm(self, key, path, d, bias=True):
        self.add(key + ".weight", path + "/scale", PLAIN, (d,))
        if bias:
            self.add(key + ".bias", path + "/bias", PLAIN, (d,))


def vision_table(t: Table, cfg: LlavaConfig, prefix: str):
    """HF CLIPVisionModel keys under `prefix` -> `vision_tower/...`."""
    v = cfg.vision
    d, f, p = v.hidden_size, v.intermediate_size, "vision_tower/"
    t.add(prefix + "embeddings.class_embedding", p + "embeddings/cls_token", RESHAPE, (d,),
          (1, 1, d))
    t.add(prefix + "embeddings.patch_embedding.weight", p + "embeddings/patch_embed/kernel",
          CONV, (d, v.num_channels, v.patch_size, v.patch_size))
    t.add(prefix + "embeddings.position_embedding.weight", p + "embeddings/position_embedding",
          RESHAPE, (v.num_positions, d), (1, v.num_positions, d))
    t.norm(prefix + "pre_layrnorm", p + "embeddings/pre_layernorm", d)
    for i in range(v.num_hidden_layers):
        k, q = f"{prefix}encoder.layers.{i}.", f"{p}layers_{i}/"
        for x in QKV:
            t.add(f"{k}self_attn.{x}_proj.weight", q + "self_attn/query_key_value/kernel", x,
                  (d, d), (d, 3 * d))
            t.add(f"{k}self_attn.{x}_proj.bias", q + "self_attn/query_key_value/bias", x,
                  (d,), (3 * d,))
        t.linear(k + "self_attn.out_proj", q + "self_attn/dense", d, d)
        t.norm(k + "layer_norm1", q + "input_layernorm", d)
        t.linear(k + "mlp.fc1", q + "mlp/fc1", f, d)
        t.linear(k + "mlp.fc2", q + "mlp/fc2", d, f)
        t.norm(k + "layer_norm2", q + "post_attention_layernorm", d)
    t.norm(prefix + "post_layernorm", p + "post_layernorm", d)


def projector_table(t: Table, cfg: LlavaConfig, names: tuple[str, str]):
    """The projector's Linears, named `names` (first, second)."""
    dv, d = cfg.vision.hidden_size, cfg.text.hidden_size
    t.linear(names[0], "multi_modal_projector/linear_1", d, dv)
    if cfg.projector == "mlp2x_gelu":
        t.linear(names[1], "multi_modal_projector/linear_2", d, d)


def hf_entries(cfg: LlavaConfig) -> list[Entry]:
    """Every key of a llava-hf checkpoint (transformers 4.x hub spelling)."""
    if cfg.projector != "mlp2x_gelu":
        raise ValueError(f"the llava-hf layout has no {cfg.projector!r} projector (it always "
                         f"holds linear_1 -> act -> linear_2); use the original layout")
    t = Table()
    vision_table(t, cfg, "vision_tower.vision_model.")
    projector_table(t, cfg, ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"))
    owl_keymap.llama_table(t, cfg.text, key_prefix="language_model.", with_buffers=False)
    return t.entries


def original_entries(cfg: LlavaConfig) -> list[Entry]:
    """Keys of the original LlavaLlamaForCausalLM checkpoint: the LLM and the projector."""
    t = Table()
    owl_keymap.llama_table(t, cfg.text, key_prefix="", with_buffers=False)
    names = ("model.mm_projector", "") if cfg.projector == "linear" else \
        ("model.mm_projector.0", "model.mm_projector.2")
    projector_table(t, cfg, names)
    return t.entries


def clip_entries(cfg: LlavaConfig, prefix: str = "vision_model.") -> list[Entry]:
    """Keys of the tower as a HF CLIPVisionModel (transformers 4.x spelling by default)."""
    t = Table()
    vision_table(t, cfg, prefix)
    return t.entries


# --------------------------------------------------------------------------------------------
# Spellings

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")   # derived buffers
_HF_RENAMES = (  # (spelling, hub spelling), first match wins
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
)
ORIGINAL_TOWER_PREFIX = "model.vision_tower.vision_tower."


def ignored(raw: str) -> bool:
    return raw.endswith(_IGNORED_SUFFIXES)


def canonical_hf(raw: str) -> str:
    """Any llava-hf key spelling -> the hub spelling of `hf_entries`."""
    if raw == "lm_head.weight":
        return "language_model.lm_head.weight"
    for old, new in _HF_RENAMES:
        if raw.startswith(old):
            return new + raw[len(old):]
    return raw


def canonical_clip(raw: str) -> str | None:
    """A CLIPVisionModel / CLIPModel key -> `vision_model.*`; None for the text half of a
    CLIPModel."""
    if raw.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
        return None
    return raw if raw.startswith("vision_model.") else "vision_model." + raw


# --------------------------------------------------------------------------------------------
# Tensors


def to_jax(e: Entry, x: np.ndarray) -> np.ndarray:
    """One tensor -> its param (not for the q / k / v parts: see `fuse_qkv`)."""
    if e.kind == RESHAPE:
        return owl_keymap.to_jax(PLAIN, np.asarray(x).reshape(e.jax_shape))
    return owl_keymap.to_jax(e.kind, x)


def to_torch(e: Entry, x: np.ndarray, heads: int) -> np.ndarray:
    """The tensor of `e` from its param (for q / k / v, the fused param)."""
    if e.kind in QKV:
        return split_qkv(np.asarray(x), heads, e.kind)
    if e.kind == RESHAPE:
        return np.array(np.asarray(x).reshape(e.torch_shape), copy=True)
    return owl_keymap.to_torch(e.kind, x)


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """torch q / k / v weights [D, Din] (or biases [D]) -> the fused param: kernel
    [Din, 3D] (or bias [3D]) whose output axis is [heads, (q, k, v), head_dim]."""
    fused = hf_clip.fuse_qkv(q, k, v, heads)
    return owl_keymap.to_jax(LINEAR if fused.ndim == 2 else PLAIN, fused)


def split_qkv(fused: np.ndarray, heads: int, which: str) -> np.ndarray:
    """Inverse of `fuse_qkv` for one of "q", "k", "v" (torch layout, fresh array)."""
    rows = fused.T if fused.ndim == 2 else fused            # [3D, ...]
    d = rows.shape[0] // 3
    part = rows.reshape(heads, 3, d // heads, *rows.shape[1:])[:, QKV.index(which)]
    return np.ascontiguousarray(part.reshape(d, *rows.shape[1:]))
