"""A HF CLIP vision tower (`CLIPVisionModel` or the vision half of `CLIPModel`, e.g.
openai/clip-vit-large-patch14) -> the `vision_model` part of an Owl param tree.

Mapping (HF CLIP -> Owl ViT):
  embeddings.class_embedding [D]           -> embeddings/cls_token [1, 1, D]
  embeddings.patch_embedding.weight        -> embeddings/patch_embed/kernel (HWIO; CLIP has no
                                              bias, nor does Owl)
  embeddings.position_embedding.weight [P, D] -> embeddings/position_embedding [1, P, D]
  pre_layrnorm                             -> embeddings/pre_layernorm
  encoder.layers.i.layer_norm1 / layer_norm2 -> layers_i/input_layernorm / post_attention_layernorm
  encoder.layers.i.self_attn.{q,k,v}_proj  -> layers_i/self_attn/query_key_value, fused with the
                                              output rows interleaved per head [heads, 3, hd]
  encoder.layers.i.self_attn.out_proj      -> layers_i/self_attn/dense
  encoder.layers.i.mlp.fc1 / fc2           -> layers_i/mlp/fc1 / fc2
  post_layernorm                           -> post_layernorm
HF applies post_layernorm to the pooled CLS token only; Owl applies it to every token, so the
Owl ViT output equals HF `post_layernorm(last_hidden_state)`. Keys may carry a `vision_model.`
prefix (transformers 4.x, CLIPModel); CLIPModel's text tower and projections are ignored.
"""
from __future__ import annotations

import json
import os

import numpy as np
from tqdm import tqdm

from owl_jax.convert import keymap
from owl_jax.convert.torch_io import CheckpointError, CheckpointReader, np_dtype
from owl_jax.checkpoint import host_array
from owl_jax.encoders.vit import VisionConfig

_IGNORED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def read_clip_json(directory: str) -> tuple[dict, dict | None]:
    """(vision config dict, preprocessor dict or None)."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (expected a HF CLIP directory)") from None
    if isinstance(c.get("vision_config"), dict):  # a full CLIPModel config
        c = c["vision_config"]
    pre = None
    pre_path = os.path.join(directory, "preprocessor_config.json")
    if os.path.exists(pre_path):
        with open(pre_path) as f:
            pre = json.load(f)
    return c, pre


def vision_config_from_clip(c: dict, layer_norm_eps: float | None = 1e-6) -> VisionConfig:
    """Sizes from CLIP's config. `layer_norm_eps` None keeps CLIP's own eps (1e-5); the default
    keeps mPLUG-Owl's 1e-6 (the released Owl ViT runs with 1e-6 although CLIP was trained
    with 1e-5)."""
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"CLIP hidden_act {c['hidden_act']!r}: the Owl ViT hard-codes "
                              f"QuickGELU")
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "image_size", "patch_size")
    missing = [k for k in need if k not in c]
    if missing:
        raise CheckpointError(f"CLIP config.json is missing {missing}")
    eps = float(c.get("layer_norm_eps", 1e-5)) if layer_norm_eps is None else layer_norm_eps
    return VisionConfig(**{k: int(c[k]) for k in need},
                        num_channels=int(c.get("num_channels", 3)), layer_norm_eps=eps)


def _expected(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, f, p = v.hidden_size, v.intermediate_size, v.patch_size
    s = {"embeddings.class_embedding": (d,),
         "embeddings.patch_embedding.weight": (d, v.num_channels, p, p),
         "embeddings.position_embedding.weight": (v.num_positions, d),
         "pre_layrnorm.weight": (d,), "pre_layrnorm.bias": (d,),
         "post_layernorm.weight": (d,), "post_layernorm.bias": (d,)}
    for i in range(v.num_hidden_layers):
        k = f"encoder.layers.{i}."
        for n, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)),
                         ("self_attn.v_proj", (d, d)), ("self_attn.out_proj", (d, d)),
                         ("mlp.fc1", (f, d)), ("mlp.fc2", (d, f))):
            s[k + n + ".weight"], s[k + n + ".bias"] = shape, shape[:1]
        for n in ("layer_norm1", "layer_norm2"):
            s[k + n + ".weight"], s[k + n + ".bias"] = (d,), (d,)
    return s


def _canonical(raw: str) -> str | None:
    """Strips `vision_model.`; None for keys to ignore (text tower, buffers)."""
    k = raw[len("vision_model."):] if raw.startswith("vision_model.") else raw
    if raw.startswith(_IGNORED_PREFIXES) or k.endswith("position_ids"):
        return None
    return k


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """Separate q/k/v weights [D, ...] (or biases [D]) -> the official fused layout [3D, ...]
    where head n owns rows [n*3*hd, (n+1)*3*hd) as [q_n; k_n; v_n]."""
    d = q.shape[0]
    stacked = np.stack([x.reshape(heads, d // heads, *x.shape[1:]) for x in (q, k, v)], axis=1)
    return stacked.reshape(3 * d, *q.shape[1:])


def read_clip_params(directory: str, v: VisionConfig, dtype: str | None = None,
                     progress: bool = True) -> dict:
    """{'vision_model': {...}} in our layout, checked against `v` first."""
    reader = CheckpointReader(directory)
    infos = reader.index()
    want = _expected(v)
    have = {c: info for raw, info in infos.items() if (c := _canonical(raw)) is not None}
    problems = [f"missing key {k} {list(s)}" for k, s in want.items() if k not in have]
    for k, info in have.items():
        if k not in want:
            problems.append(f"unexpected key {info.key} {list(info.shape)}")
        elif tuple(info.shape) != want[k]:
            problems.append(f"{info.key}: config.json implies {list(want[k])}, "
                            f"{os.path.basename(info.file)} has {list(info.shape)}")
    if problems:
        raise CheckpointError(f"{directory}: not a CLIP vision checkpoint matching its "
                              f"config.json:\n  " + "\n  ".join(problems[:25]))
    target = np_dtype(dtype) if dtype else None
    cast = (lambda x: x.astype(target)) if target is not None else (lambda x: x)
    out: dict = {}
    put = lambda path, x: keymap.set_path(out, ("vision_model",) + tuple(path.split("/")),
                                          host_array(cast(x)))
    pending: dict[str, dict[str, np.ndarray]] = {}   # q/k/v of a layer until all three arrive
    simple = {"embeddings.patch_embedding.weight": ("embeddings/patch_embed/kernel",
                                                    keymap.CONV),
              "pre_layrnorm.weight": ("embeddings/pre_layernorm/scale", keymap.PLAIN),
              "pre_layrnorm.bias": ("embeddings/pre_layernorm/bias", keymap.PLAIN),
              "post_layernorm.weight": ("post_layernorm/scale", keymap.PLAIN),
              "post_layernorm.bias": ("post_layernorm/bias", keymap.PLAIN)}
    L, P = keymap.LINEAR, keymap.PLAIN
    layer_map = {"layer_norm1.weight": ("input_layernorm/scale", P),
                 "layer_norm1.bias": ("input_layernorm/bias", P),
                 "layer_norm2.weight": ("post_attention_layernorm/scale", P),
                 "layer_norm2.bias": ("post_attention_layernorm/bias", P),
                 "self_attn.out_proj.weight": ("self_attn/dense/kernel", L),
                 "self_attn.out_proj.bias": ("self_attn/dense/bias", P),
                 "mlp.fc1.weight": ("mlp/fc1/kernel", L), "mlp.fc1.bias": ("mlp/fc1/bias", P),
                 "mlp.fc2.weight": ("mlp/fc2/kernel", L), "mlp.fc2.bias": ("mlp/fc2/bias", P)}
    for raw, x in tqdm(reader.tensors(), total=len(infos), unit="tensor", desc="hf-clip",
                       disable=not progress):
        k = _canonical(raw)
        if k is None:
            continue
        if k == "embeddings.class_embedding":
            put("embeddings/cls_token", np.array(x).reshape(1, 1, -1))
        elif k == "embeddings.position_embedding.weight":
            put("embeddings/position_embedding", np.array(x)[None])
        elif k in simple:
            path, kind = simple[k]
            put(path, keymap.to_jax(kind, x))
        else:
            i, rest = k[len("encoder.layers."):].split(".", 1)
            if rest in layer_map:
                path, kind = layer_map[rest]
                put(f"layers_{i}/{path}", keymap.to_jax(kind, x))
            else:  # self_attn.{q,k,v}_proj.{weight,bias}
                proj, leaf = rest.split(".")[1:]
                group = pending.setdefault(f"{i}.{leaf}", {})
                group[proj[0]] = np.array(x, copy=True)
                if len(group) == 3:
                    fused = fuse_qkv(group["q"], group["k"], group["v"], v.num_attention_heads)
                    kind, name = (L, "kernel") if leaf == "weight" else (P, "bias")
                    put(f"layers_{i}/self_attn/query_key_value/{name}",
                        keymap.to_jax(kind, fused))
                    del pending[f"{i}.{leaf}"]
        del x
    return out


def preprocessor_from_clip(pre: dict | None) -> dict:
    """image_mean / image_std of CLIP's image processor (for the Owl config)."""
    if not pre:
        return {}
    out = {}
    if "image_mean" in pre:
        out["image_mean"] = tuple(float(x) for x in pre["image_mean"])
    if "image_std" in pre:
        out["image_std"] = tuple(float(x) for x in pre["image_std"])
    return out
