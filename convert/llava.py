"""LLaVA checkpoints <-> owl_jax checkpoint directories, and a fresh LLaVA from HF parts.

Layouts (key tables in owl_jax.families.llava.keymap):
- llava-hf: one directory (`LlavaForConditionalGeneration`), any transformers spelling;
- original: the LLM + projector directory (`LlavaLlamaForCausalLM`) and the CLIP tower as a HF
  CLIPVisionModel directory (`--clip`, or `mm_vision_tower` when local, or DIR/vision_tower);
  a tower stored inside the checkpoint (`model.vision_tower.vision_tower.*`) is read from there.

As the Owl converters: every key and shape is checked against config.json before anything is
written (missing, unexpected, mis-shaped keys are one error naming them all), tensors stream one
at a time, `dtype=None` keeps each tensor's stored dtype, and export is bit-exact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace
from typing import Iterable

import numpy as np
from tqdm import tqdm

from owl_jax import checkpoint as ckpt
from owl_jax.convert import hf_clip, hf_llama, lora as lora_lib
from owl_jax.convert.keymap import (cast_aligned, check_keys, flatten, get_path, pop_path,
                                    set_path)
from owl_jax.convert.torch_io import (CheckpointError, CheckpointReader, ShardedWriter, np_dtype,
                                      return_freed_memory_promptly)
from owl_jax.families.llava import config as llava_config, keymap
from owl_jax.families.llava.config import LlavaConfig

LAYOUTS = ("hf", "original")
# Besides checkpoint.TOKENIZER_FILES: llava-hf's fast tokenizer with its added <image> token,
# the processor / chat template files, the generation defaults.
EXTRA_FILES = ("tokenizer.json", "added_tokens.json", "generation_config.json",
               "processor_config.json", "chat_template.json", "chat_template.jinja")
TOWER_DIR = "vision_tower"


def is_llava_source(directory: str) -> bool:
    """Whether a PyTorch directory's config.json is a LLaVA one (either layout)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    d = llava_config.read_json(path)
    return d.get("model_type") == "llava" or llava_config.is_original(d)


# --------------------------------------------------------------------------------------------
# torch -> params


def convert_tensors(tensors: Iterable[tuple[str, np.ndarray]], roles: dict[str, str],
                    entries: list[keymap.Entry], heads: int, dtype=None, params=None) -> dict:
    """Streams (raw key, array) pairs into the param tree (only the keys in `roles`)."""
    by_key = {e.torch_key: e for e in entries}
    target = np_dtype(dtype) if dtype else None
    params = {} if params is None else params
    pending: dict[tuple, dict[str, np.ndarray]] = {}   # q / k / v until all three arrived

    def put(path, y):
        if target is not None and y.dtype != target:
            y = cast_aligned(y, target)
        set_path(params, path, ckpt.host_array(y))

    for raw, x in tensors:
        if raw not in roles:
            continue
        e = by_key[roles[raw]]
        if e.kind in keymap.QKV:
            group = pending.setdefault(e.path, {})
            group[e.kind] = np.array(x, copy=True)
            if len(group) == 3:
                put(e.path, keymap.fuse_qkv(group["q"], group["k"], group["v"], heads))
                del pending[e.path]
        else:
            put(e.path, keymap.to_jax(e, x))
        del x
    return params


def read_dir(directory: str, entries: list[keymap.Entry], canonical, heads: int, dtype=None,
             progress: bool = True, params=None, desc: str = "torch->jax") -> dict:
    """Checks a checkpoint directory against `entries`, then converts it."""
    reader = CheckpointReader(directory)
    infos = reader.index()
    roles = check_keys(infos, entries, canonical, directory, skip=keymap.ignored)
    stream = tqdm(reader.tensors(), total=len(infos), unit="tensor", desc=desc,
                  disable=not progress)
    return convert_tensors(stream, roles, entries, heads, dtype, params)


def params_from_state_dict(state_dict: dict, cfg: LlavaConfig, layout: str = "hf") -> dict:
    """An in-memory state dict (numpy or torch tensors; llava-hf keys in any spelling, or the
    original LLM + projector keys with the tower under `model.vision_tower.vision_tower.`)
    -> params. For tests and notebooks; checked as a directory is."""
    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in state_dict.items()}
    infos = {k: SimpleNamespace(shape=tuple(v.shape), file="state_dict")
             for k, v in arrays.items()}
    entries, canonical = _source_tables(cfg, layout, embedded_tower=True)
    roles = check_keys(infos, entries, canonical, "state_dict", skip=keymap.ignored)
    return convert_tensors(arrays.items(), roles, entries, cfg.vision.num_attention_heads)


def _source_tables(cfg: LlavaConfig, layout: str, embedded_tower: bool):
    if layout == "hf":
        return keymap.hf_entries(cfg), keymap.canonical_hf
    entries = keymap.original_entries(cfg)
    if embedded_tower:
        entries += keymap.clip_entries(cfg, keymap.ORIGINAL_TOWER_PREFIX + "vision_model.")
    return entries, lambda k: k


def torch_to_jax(src: str, dst: str, clip_dir: str | None = None, dtype: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """A llava-hf or original-layout directory -> an owl_jax checkpoint directory."""
    if os.path.exists(os.path.join(dst, ckpt.PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass --overwrite)")
    return_freed_memory_promptly()
    d = llava_config.read_json(os.path.join(src, "config.json"))
    layout = "original" if llava_config.is_original(d) else "hf"
    cfg = llava_config.load(src, clip_dir)
    heads = cfg.vision.num_attention_heads
    tower = None
    if layout == "hf":
        params = read_dir(src, *_source_tables(cfg, "hf", False), heads, dtype, progress)
    else:
        embedded = any(k.startswith(keymap.ORIGINAL_TOWER_PREFIX)
                       for k in CheckpointReader(src).index())
        params = read_dir(src, *_source_tables(cfg, "original", embedded), heads, dtype,
                          progress)
        tower = llava_config.find_clip_dir(src, d, clip_dir)
        if not embedded:
            read_dir(tower, keymap.clip_entries(cfg), keymap.canonical_clip, heads, dtype,
                     progress, params, desc="clip->jax")
    extra = {"source": os.path.abspath(src), "source_layout": layout,
             "vision_tower": os.path.abspath(tower) if tower else None}
    meta = ckpt.save_checkpoint(dst, params, cfg, tokenizer_dir=src, overwrite=overwrite,
                                extra_meta=extra)
    _copy_files(src, dst, EXTRA_FILES)
    return meta


def _copy_files(src: str, dst: str, names) -> None:
    for name in names:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


# --------------------------------------------------------------------------------------------
# params -> torch


def write_tensors(params: dict, entries: list[keymap.Entry], directory: str, heads: int,
                  fmt: str, shard_size, dtype=None, progress: bool = True) -> list[str]:
    """Pops each entry's param as it is written (fused q / k / v after the last of them)."""
    target = np_dtype(dtype) if dtype else None
    if any(os.path.exists(os.path.join(directory, n)) for n in
           ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json",
            "model.safetensors.index.json")):
        raise FileExistsError(f"{directory} already holds weights; choose an empty directory")
    writer = ShardedWriter(directory, fmt, shard_size)
    for e in tqdm(entries, unit="tensor", desc="jax->torch", disable=not progress):
        x = get_path(params, e.path)
        y = keymap.to_torch(e, np.asarray(x), heads)
        if e.kind not in keymap.QKV or e.kind == "v":
            pop_path(params, e.path)
        del x
        writer.add(e.torch_key, y.astype(target) if target is not None else y)
    return writer.close()


def _write_json(path: str, d: dict, dtype) -> None:
    if "torch_dtype" in d:
        d = dict(d, torch_dtype=np.dtype(dtype).name)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def default_layout(cfg: LlavaConfig, meta: dict) -> str:
    """The layout a checkpoint came from, else llava-hf where it can hold the model."""
    if meta.get("source_layout") in LAYOUTS:
        return meta["source_layout"]
    return "hf" if cfg.projector == "mlp2x_gelu" and cfg.image_token_index is not None \
        else "original"


def jax_to_torch(src: str, dst: str, layout: str | None = None, dtype: str | None = None,
                 fmt: str | None = None, shard_size="10GB", progress: bool = True) -> list[str]:
    """Writes `layout` ("hf": one llava-hf directory; "original": the LLM + projector in DST
    and the CLIP tower in DST/vision_tower), loadable by transformers with strict keys. Returns
    the weight files written (the tower's prefixed by vision_tower/)."""
    return_freed_memory_promptly()
    cfg, params, meta = ckpt.load_checkpoint(src)
    if not isinstance(cfg, LlavaConfig):
        raise CheckpointError(f"{src}: not a LLaVA checkpoint ({type(cfg).__name__})")
    layout = layout or default_layout(cfg, meta)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LLaVA layout {layout!r}; known: {', '.join(LAYOUTS)}")
    lora_lib.merge_params(params, meta.get("lora"))
    if layout == "hf":
        if cfg.image_token_index is None:
            raise CheckpointError(f"{src}: the llava-hf layout needs an image token row in the "
                                  f"vocabulary and this model has none (image_token_index is "
                                  f"None); export with --layout original")
        groups = [(dst, keymap.hf_entries(cfg))]
    else:
        groups = [(dst, keymap.original_entries(cfg)),
                  (os.path.join(dst, TOWER_DIR), keymap.clip_entries(cfg))]
    leftover = sorted({"/".join(p) for p in flatten(params)} -
                      {"/".join(e.path) for _, entries in groups for e in entries})
    if leftover:
        raise CheckpointError(f"{src}: params with no {layout}-layout key: {leftover[:10]}")
    stored = {np.dtype(x.dtype) for x in flatten(params).values()}
    written_dtype = np_dtype(dtype) if dtype else (stored.pop() if len(stored) == 1
                                                   else np.dtype(np.float32))
    fmt = fmt or ("safetensors" if layout == "hf" else "bin")
    names = []
    for directory, entries in groups:
        files = write_tensors(params, entries, directory, cfg.vision.num_attention_heads, fmt,
                              shard_size, dtype, progress)
        rel = os.path.relpath(directory, dst)
        names += [n if rel == "." else f"{rel}/{n}" for n in files]
    if layout == "hf":
        _write_json(os.path.join(dst, "config.json"), llava_config.to_hf_dict(cfg),
                    written_dtype)
        _write_json(os.path.join(dst, "preprocessor_config.json"),
                    llava_config.preprocessor_dict(cfg), written_dtype)
    else:
        tower = os.path.abspath(os.path.join(dst, TOWER_DIR))
        _write_json(os.path.join(dst, "config.json"),
                    llava_config.to_original_dict(cfg, tower), written_dtype)
        clip_conf, clip_pre = llava_config.clip_dicts(cfg)
        _write_json(os.path.join(tower, "config.json"), clip_conf, written_dtype)
        _write_json(os.path.join(tower, "preprocessor_config.json"), clip_pre, written_dtype)
    ckpt.copy_tokenizer_files(src, dst)
    _copy_files(src, dst, EXTRA_FILES)
    return names


# --------------------------------------------------------------------------------------------
# A fresh LLaVA from HF LLaMA + CLIP


def init_projector(cfg: LlavaConfig, seed: int, dtype=None) -> dict:
    """The projector as torch.nn.Linear initialises it (what LLaVA's stage 1 starts from):
    weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from
    numpy.random.default_rng(seed), linear_1 then linear_2, weight then bias."""
    rng = np.random.default_rng(seed)
    target = np_dtype(dtype) if dtype else np.dtype(np.float32)
    d, out = cfg.text.hidden_size, {}
    shapes = [("linear_1", cfg.vision.hidden_size)] + \
        ([("linear_2", d)] if cfg.projector == "mlp2x_gelu" else [])
    for name, fan_in in shapes:
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (d, fan_in)).astype(np.float32)
        b = rng.uniform(-bound, bound, (d,)).astype(np.float32)
        out[name] = {"kernel": ckpt.host_array(np.ascontiguousarray(w.T).astype(target)),
                     "bias": ckpt.host_array(b.astype(target))}
    return out


def _add_image_token_row(lm: dict) -> None:
    """One more vocabulary row in embed_tokens and lm_head: the mean of the existing rows (the
    centre of llava-hf's own N(mean, 1e-5 cov) draw), in place."""
    emb = np.asarray(lm["embed_tokens"]["embedding"])
    head = np.asarray(lm["lm_head"]["kernel"])
    row = emb.astype(np.float32).mean(0, keepdims=True).astype(emb.dtype)
    col = head.astype(np.float32).mean(1, keepdims=True).astype(head.dtype)
    lm["embed_tokens"]["embedding"] = ckpt.host_array(np.concatenate([emb, row], 0))
    lm["lm_head"]["kernel"] = ckpt.host_array(np.concatenate([head, col], 1))


def build_config(llama_dir: str, clip_dir: str, projector: str = "mlp2x_gelu",
                 image_token: bool = False, image_aspect_ratio: str | None = None,
                 vision_feature_layer: int = -2,
                 vision_feature_select_strategy: str = "default") -> LlavaConfig:
    text = hf_llama.read_text_config(llama_dir)
    clip, pre = hf_clip.read_clip_json(clip_dir)
    vision = hf_clip.vision_config_from_clip(clip, layer_norm_eps=None)  # CLIP's own eps
    token = None
    if image_token:
        token, text = text.vocab_size, dataclasses.replace(text, vocab_size=text.vocab_size + 1)
    aspect = image_aspect_ratio or ("pad" if projector == "mlp2x_gelu" else "square")
    return LlavaConfig(vision=vision, text=text, projector=projector,
                       vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=vision_feature_select_strategy,
                       image_token_index=token, image_aspect_ratio=aspect,
                       **hf_clip.preprocessor_from_clip(pre))


def from_hf(dst: str, llama_dir: str | None, clip_dir: str | None,
            projector: str = "mlp2x_gelu", seed: int = 0, image_token: bool = False,
            image_aspect_ratio: str | None = None, vision_feature_layer: int = -2,
            vision_feature_select_strategy: str = "default", dtype: str | None = None,
            overwrite: bool = False, progress: bool = True) -> dict:
    """LLaMA and CLIP from their HF directories, a freshly initialised projector (seeded; see
    `init_projector`): LLaVA's stage-1 starting point."""
    if not llama_dir or not clip_dir:
        raise ValueError("a LLaVA from HF parts needs both --llama (LlamaForCausalLM) and "
                         "--clip (CLIPVisionModel / CLIPModel) directories")
    if os.path.exists(os.path.join(dst, ckpt.PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass --overwrite)")
    cfg = build_config(llama_dir, clip_dir, projector, image_token, image_aspect_ratio,
                       vision_feature_layer, vision_feature_select_strategy)
    text = dataclasses.replace(cfg.text, vocab_size=cfg.text.vocab_size - image_token)
    params = {"vision_tower": hf_clip.read_clip_params(clip_dir, cfg.vision, dtype,
                                                       progress)["vision_model"],
              "multi_modal_projector": init_projector(cfg, seed, dtype),
              **hf_llama.read_llama_params(llama_dir, text, dtype, progress)}
    if image_token:
        _add_image_token_row(params["language_model"])
    return ckpt.save_checkpoint(
        dst, params, cfg, tokenizer_dir=llama_dir, overwrite=overwrite,
        extra_meta={"source": {"llama": llama_dir, "clip": clip_dir, "seed": seed},
                    "random_init": ["multi_modal_projector"],
                    "projector_init": "torch.nn.Linear default: U(-1/sqrt(fan_in), "
                                      "1/sqrt(fan_in)), numpy default_rng(seed)"})


# --------------------------------------------------------------------------------------------
# owl-convert (convert/cli.py): LLaVA's flags and commands

CLI_FLAGS = {
    "torch-to-jax": [
        (("--clip",), dict(default=None,
                           help="original-layout LLaVA: the CLIP tower's HF directory (default: "
                                "mm_vision_tower when it is a local directory, else "
                                "SRC/vision_tower)")),
    ],
    "jax-to-torch": [
        (("--layout",), dict(choices=LAYOUTS, default=None,
                             help="llava-hf (LlavaForConditionalGeneration, safetensors) or the "
                                  "original LlavaLlamaForCausalLM + CLIP tower in "
                                  "DST/vision_tower (default: the layout it was converted from, "
                                  "else hf where it can hold the model)")),
    ],
    "from-hf": [  # needs --llama and --clip
        (("--projector",), dict(choices=("linear", "mlp2x_gelu"), default=None,
                                help="linear (LLaVA v1) or mlp2x_gelu (LLaVA-1.5, the default)")),
        (("--image_token",), dict(action="store_true", default=None,
                                  help="add one vocabulary row for <image> (llava-hf style; "
                                       "initialised as the mean of the existing rows); default: "
                                       "no image row (original style)")),
        (("--image_aspect_ratio",), dict(choices=("square", "pad"), default=None,
                                         help="image transform (default: pad with mlp2x_gelu, "
                                              "square with linear)")),
        (("--vision_feature_layer",), dict(type=int, default=None,
                                           help="the CLIP hidden state fed to the projector "
                                                "(default -2)")),
        (("--vision_feature_select_strategy",), dict(choices=("default", "full"), default=None,
                                                     help="default drops the CLS token "
                                                          "(default), full keeps it")),
    ],
}

is_source = is_llava_source


def cli_run(command: str, args, progress: bool):
    from owl_jax.convert.cli import dtype_arg
    dtype = dtype_arg(args.dtype)
    if command == "torch-to-jax":
        return torch_to_jax(args.src, args.dst, args.clip, dtype, args.overwrite, progress)
    if command == "jax-to-torch":
        return {"files": jax_to_torch(args.src, args.dst, args.layout, dtype, args.format,
                                      args.shard_size, progress)}
    return from_hf(args.dst, args.llama, args.clip, args.projector or "mlp2x_gelu", args.seed,
                   bool(args.image_token), args.image_aspect_ratio,
                   -2 if args.vision_feature_layer is None else args.vision_feature_layer,
                   args.vision_feature_select_strategy or "default", dtype, args.overwrite,
                   progress)
