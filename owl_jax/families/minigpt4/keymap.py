"""MiniGPT-4 checkpoint keys <-> owl_jax param paths, in both layouts.

- lavis: the keys of MiniGPT-4's module, as its release files hold them: `visual_encoder.*`
  (EVA ViT-g; `eva_vit_g.pth` stores them without the prefix), `ln_vision.*`, `query_tokens`,
  `Qformer.bert.*` (the LAVIS BLIP-2 .pth), `llama_proj.*` (the MiniGPT-4 .pth) and
  `llama_model.*` (an HF LLaMA / Vicuna directory's `model.*`, `lm_head.weight`).
- hf: transformers' Blip2ForConditionalGeneration (`vision_model.*`, `query_tokens`,
  `qformer.*`, `language_projection.*`, `language_model.model.*`, `language_model.lm_head.*`).
  `canonical_hf` maps the spelling of transformers 5 module paths (`model.vision_model.*`,
  `model.qformer.*`, `model.query_tokens`, `model.language_projection.*`,
  `model.language_model.*`, `lm_head.weight`) onto these.

Kinds (torch -> jax; the inverse on export), as owl_jax.convert.keymap plus:
- "qkv": EVA's fused qkv weight [3D, D], rows ordered (q, k, v) x heads x head_dim -> the
  ViT's kernel [D, 3D], whose output axis owl_jax orders heads x (q, k, v) x head_dim;
- "qv_bias" (hf only): Blip2's fused qkv bias [3D] = (q_bias, k part, v_bias) -> the two
  params `q_bias`, `v_bias`. EVA has no key bias; a non-zero k part (a Blip2 model trained
  with transformers) adds one constant per query to every score, which softmax cancels, so
  dropping it is exact. Export writes zeros there.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from owl_jax.convert import keymap as owl_keymap
from owl_jax.families.minigpt4.config import MiniGPT4Config

LINEAR, CONV, PLAIN = owl_keymap.LINEAR, owl_keymap.CONV, owl_keymap.PLAIN
QKV, QV_BIAS = "qkv", "qv_bias"
LAYOUTS = ("lavis", "hf")


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    paths: tuple[tuple[str, ...], ...]   # one param; two for qv_bias (q_bias, v_bias)
    kind: str
    torch_shape: tuple[int, ...]

    @property
    def path(self) -> tuple[str, ...]:
        return self.paths[0]


class Table:
    def __init__(self, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown MiniGPT-4 layout {layout!r}; known: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.entries: list[Entry] = []

    def add(self, key, path, kind, shape, *more_paths):
        paths = tuple(tuple(p.split("/")) for p in (path, *more_paths))
        self.entries.append(Entry(key, paths, kind, tuple(shape)))

    def linear(self, key, path, out, inp, bias=True):
        self.add(key + ".weight", path + "/kernel", LINEAR, (out, inp))
        if bias:
            self.add(key + ".bias", path + "/bias", PLAIN, (out,))

    def norm(self, key, path, d, bias=True):
        self.add(key + ".weight", path + "/scale", PLAIN, (d,))
        if bias:
            self.add(key + ".bias", path + "/bias", PLAIN, (d,))


def vision_table(t: Table, cfg: MiniGPT4Config):
    v = cfg.vision
    d, f, p, n = v.hidden_size, v.intermediate_size, v.patch_size, v.num_positions
    hf = t.layout == "hf"
    k = "vision_model." if hf else "visual_encoder."
    e = "visual_encoder/embeddings/"
    t.add(k + ("embeddings.class_embedding" if hf else "cls_token"), e + "cls_token", PLAIN,
          (1, 1, d))
    t.add(k + ("embeddings.position_embedding" if hf else "pos_embed"), e + "position_embedding",
          PLAIN, (1, n, d))
    patch = k + ("embeddings.patch_embedding" if hf else "patch_embed.proj")
    t.add(patch + ".weight", e + "patch_embed/kernel", CONV, (d, v.num_channels, p, p))
    t.add(patch + ".bias", e + "patch_embed/bias", PLAIN, (d,))
    for i in range(v.num_hidden_layers):
        b = f"{k}encoder.layers.{i}." if hf else f"{k}blocks.{i}."
        q = f"visual_encoder/layers_{i}/"
        attn = b + ("self_attn." if hf else "attn.")
        t.norm(b + ("layer_norm1" if hf else "norm1"), q + "input_layernorm", d)
        t.add(attn + "qkv.weight", q + "self_attn/query_key_value/kernel", QKV, (3 * d, d))
        if hf:
            t.add(attn + "qkv.bias", q + "self_attn/q_bias", QV_BIAS, (3 * d,),
                  q + "self_attn/v_bias")
        else:
            t.add(attn + "q_bias", q + "self_attn/q_bias", PLAIN, (d,))
            t.add(attn + "v_bias", q + "self_attn/v_bias", PLAIN, (d,))
        t.linear(attn + ("projection" if hf else "proj"), q + "self_attn/dense", d, d)
        t.norm(b + ("layer_norm2" if hf else "norm2"), q + "post_attention_layernorm", d)
        t.linear(b + "mlp.fc1", q + "mlp/fc1", f, d)
        t.linear(b + "mlp.fc2", q + "mlp/fc2", d, f)
    t.norm("vision_model.post_layernorm" if hf else "ln_vision", "ln_vision", d)


def qformer_table(t: Table, cfg: MiniGPT4Config):
    c = cfg.qformer
    d, f, dv = c.hidden_size, c.intermediate_size, c.encoder_hidden_size
    hf = t.layout == "hf"
    k = "qformer." if hf else "Qformer.bert."
    self_name = "attention" if hf else "self"
    t.add("query_tokens", "qformer/query_tokens", PLAIN, (1, c.num_query_tokens, d))
    t.norm(k + ("layernorm" if hf else "embeddings.LayerNorm"), "qformer/layernorm", d)
    for i in range(c.num_hidden_layers):
        b, q = f"{k}encoder.layer.{i}.", f"qformer/layer_{i}/"
        blocks = [("attention", d)] + ([("crossattention", dv)] if c.has_cross_attention(i)
                                       else [])
        for name, kv_in in blocks:
            t.linear(f"{b}{name}.{self_name}.query", f"{q}{name}/query", d, d)
            t.linear(f"{b}{name}.{self_name}.key", f"{q}{name}/key", d, kv_in)
            t.linear(f"{b}{name}.{self_name}.value", f"{q}{name}/value", d, kv_in)
            t.linear(f"{b}{name}.output.dense", f"{q}{name}/dense", d, d)
            t.norm(f"{b}{name}.output.LayerNorm", f"{q}{name}/norm", d)
        t.linear(b + "intermediate_query.dense", q + "ffn/fc1", f, d)
        t.linear(b + "output_query.dense", q + "ffn/fc2", d, f)
        t.norm(b + "output_query.LayerNorm", q + "ffn/norm", d)
    t.linear("language_projection" if hf else "llama_proj", "llama_proj", cfg.text.hidden_size,
             d)


def entries(cfg: MiniGPT4Config, layout: str, parts=("vision", "qformer", "llm")
            ) -> list[Entry]:
    """The keys of `layout` (see the module docstring); `parts` picks the towers."""
    t = Table(layout)
    if "vision" in parts:
        vision_table(t, cfg)
    if "qformer" in parts:
        qformer_table(t, cfg)
    if "llm" in parts:
        prefix = "language_model." if layout == "hf" else "llama_model."
        owl_keymap.llama_table(t, cfg.text, key_prefix=prefix, with_buffers=False)
    return t.entries


# --------------------------------------------------------------------------------------------
# Spellings

_HF_RENAMES = (("model.language_model.", "language_model.model."),
               ("model.vision_model.", "vision_model."),
               ("model.qformer.", "qformer."),
               ("model.language_projection.", "language_projection."))
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")   # derived buffers
# What a LAVIS BLIP-2 checkpoint holds that MiniGPT-4 does not use (its `init_Qformer` deletes
# the text side; the T5 / OPT parts belong to the BLIP-2 model it came from).
_LAVIS_UNUSED = re.compile(
    r"^(t5_model\.|t5_proj\.|opt_model\.|opt_proj\.|llm_model\.|llm_proj\.|vision_proj\.|"
    r"text_proj\.|itm_head\.|temp$|Qformer\.cls\.|"
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.|"
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")


def ignored(raw: str) -> bool:
    return raw.endswith(_IGNORED_SUFFIXES)


def canonical_hf(raw: str) -> str:
    """Any Blip2 key spelling -> the one of `entries(cfg, "hf")`."""
    if raw in ("lm_head.weight", "model.query_tokens"):
        return {"lm_head.weight": "language_model.lm_head.weight",
                "model.query_tokens": "query_tokens"}[raw]
    for old, new in _HF_RENAMES:
        if raw.startswith(old):
            return new + raw[len(old):]
    return raw


def lavis_unused(key: str) -> bool:
    """A LAVIS BLIP-2 key MiniGPT-4 does not load (text side of the Q-Former, T5 / OPT)."""
    return bool(_LAVIS_UNUSED.match(key))


# --------------------------------------------------------------------------------------------
# Tensors


def to_jax(e: Entry, x: np.ndarray, heads: int) -> list[np.ndarray]:
    """One tensor -> its param(s), in the order of `e.paths` (fresh arrays)."""
    x = np.asarray(x)
    if e.kind == QKV:
        d = x.shape[1]
        rows = x.reshape(3, heads, d // heads, d).transpose(1, 0, 2, 3).reshape(3 * d, d)
        return [owl_keymap.to_jax(LINEAR, rows)]
    if e.kind == QV_BIAS:
        d = x.shape[0] // 3
        return [owl_keymap.to_jax(PLAIN, x[:d]), owl_keymap.to_jax(PLAIN, x[2 * d:])]
    return [owl_keymap.to_jax(e.kind, x)]


def to_torch(e: Entry, params: list[np.ndarray], heads: int) -> np.ndarray:
    """The tensor of `e` from its param(s) (a fresh C-contiguous array)."""
    if e.kind == QKV:
        kernel = np.asarray(params[0])
        d = kernel.shape[0]
        rows = kernel.T.reshape(heads, 3, d // heads, d).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(rows.reshape(3 * d, d))
    if e.kind == QV_BIAS:
        q, v = (np.asarray(p) for p in params)
        return np.concatenate([q, np.zeros_like(q), v])
    return owl_keymap.to_torch(e.kind, np.asarray(params[0]))
