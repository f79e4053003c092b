"""mPLUG-Owl3 checkpoints <-> owl_jax checkpoint directories, and a fresh Owl3 from HF parts.

The official layout is one directory: config.json (mPLUGOwl3Config) and the state_dict as
safetensors (single or sharded with model.safetensors.index.json; .bin pickles are read with
weights_only=True), any float dtype. Every key and shape is checked against config.json first
(missing, unexpected and mis-shaped keys: one error naming them all); tensors stream one at a
time; `dtype=None` keeps each tensor's stored dtype, so a round trip is bit-exact.

`from_hf`: a Qwen2 directory (Qwen2ForCausalLM) + a SigLIP directory (SiglipVisionModel or a
full SiglipModel) -> an Owl3 whose new parameters (projector, every hyper layer's v_kv_proj and,
for 240728, gate_proj) are initialised as the official `_init_weights` does for weights the
checkpoint lacks: Linear weights ~ N(0, 0.02), biases 0 (drawn with numpy from `seed`).
"""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

from owl_jax import checkpoint as ckpt
from owl_jax.convert.keymap import (cast_aligned, flatten, get_path, pop_path, set_path,
                                    to_jax, to_torch)
from owl_jax.convert.torch_io import (CheckpointError, CheckpointReader, ShardedWriter,
                                      checkpoint_problems, np_dtype,
                                      return_freed_memory_promptly)
from owl_jax.decoder.llama import TextConfig
from owl_jax.families import read_json
from owl_jax.families.owl3 import config as owl3_config, keymap
from owl_jax.families.owl3.config import Owl3Config

EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "generation_config.json", "special_tokens_map.json")


def is_owl3_source(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    return os.path.isfile(path) and read_json(path).get("model_type") == "mplugowl3"


def check_keys(infos: dict, entries: list, cfg: Owl3Config, where: str) -> dict:
    """key -> Entry for every tensor to read; raises naming every missing, unexpected or
    mis-shaped key."""
    by_key = {e.torch_key: e for e in entries}
    problems, roles = [], {}
    for key, info in infos.items():
        if keymap.ignored(cfg, key):
            continue
        e = by_key.get(key)
        if e is None:
            problems.append(f"unexpected key {key} {list(info.shape)}")
        elif tuple(info.shape) != e.torch_shape:
            problems.append(f"{key}: config.json implies shape {list(e.torch_shape)}, the "
                            f"checkpoint has {list(info.shape)}")
        else:
            roles[key] = e
    problems += [f"missing key {e.torch_key} {list(e.torch_shape)}" for e in entries
                 if e.torch_key not in infos]
    if problems:
        raise checkpoint_problems(f"{where} does not match its config.json", problems)
    return roles


def convert_tensors(tensors, roles: dict, dtype=None, params=None) -> dict:
    target = np_dtype(dtype) if dtype else None
    params = {} if params is None else params
    for key, x in tensors:
        e = roles.get(key)
        if e is None:
            continue
        y = to_jax(e.kind, x)
        if target is not None and y.dtype != target:
            y = cast_aligned(y, target)
        set_path(params, e.path, ckpt.host_array(y))
        del x
    return params


def load_config(src: str) -> Owl3Config:
    """config.json, with the code version read off the projector keys when the file does not
    record it."""
    keys = CheckpointReader(src).index().keys()
    return owl3_config.load(src, keymap.version_hint(keys))


def read_params(src: str, cfg: Owl3Config, dtype=None, progress: bool = False) -> dict:
    reader = CheckpointReader(src)
    infos = reader.index()
    roles = check_keys(infos, keymap.entries(cfg), cfg, src)
    stream = tqdm(reader.tensors(), total=len(infos), unit="tensor", desc="torch->jax",
                  disable=not progress)
    return convert_tensors(stream, roles, dtype)


def params_from_state_dict(state_dict: dict, cfg: Owl3Config) -> dict:
    """An in-memory official state dict (numpy or torch tensors) -> params (checked)."""
    arrays = {k: (v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in state_dict.items()}
    infos = {k: SimpleNamespace(shape=tuple(v.shape)) for k, v in arrays.items()}
    roles = check_keys(infos, keymap.entries(cfg), cfg, "state_dict")
    return convert_tensors(arrays.items(), roles)


def torch_to_jax(src: str, dst: str, dtype: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    if os.path.exists(os.path.join(dst, ckpt.PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass --overwrite)")
    return_freed_memory_promptly()
    cfg = load_config(src)
    params = read_params(src, cfg, dtype, progress)
    meta = ckpt.save_checkpoint(dst, params, cfg, tokenizer_dir=src, overwrite=overwrite,
                                extra_meta={"source": os.path.abspath(src),
                                            "source_layout": "official"})
    _copy_files(src, dst)
    return meta


def _copy_files(src: str, dst: str) -> None:
    for name in EXTRA_FILES:
        if os.path.exists(os.path.join(src, name)) and not os.path.exists(
                os.path.join(dst, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def write_tensors(params: dict, cfg: Owl3Config, directory: str, fmt: str = "safetensors",
                  shard_size="10GB", dtype=None, progress: bool = True) -> list[str]:
    entries = keymap.entries(cfg)
    leftover = sorted({"/".join(p) for p in flatten(params)} -
                      {"/".join(e.path) for e in entries})
    if leftover:
        raise CheckpointError(f"params with no official key: {leftover[:10]}")
    if any(os.path.exists(os.path.join(directory, n)) for n in
           ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json",
            "model.safetensors.index.json")):
        raise FileExistsError(f"{directory} already holds weights; choose an empty directory")
    target = np_dtype(dtype) if dtype else None
    writer = ShardedWriter(directory, fmt, shard_size)
    for e in tqdm(entries, unit="tensor", desc="jax->torch", disable=not progress):
        y = to_torch(e.kind, np.asarray(pop_path(params, e.path)))
        writer.add(e.torch_key, y.astype(target) if target is not None else y)
    return writer.close()


def jax_to_torch(src: str, dst: str, layout: str | None = None, dtype: str | None = None,
                 fmt: str | None = None, shard_size="10GB", progress: bool = True) -> list[str]:
    """An owl_jax Owl3 checkpoint -> the official layout (config.json + weights, safetensors
    unless `fmt` says bin), loadable by the official `mPLUGOwl3Model.from_pretrained`."""
    if layout not in (None, "official"):
        raise ValueError(f"mPLUG-Owl3 has one layout, the official one (got --layout {layout})")
    fmt = fmt or "safetensors"
    return_freed_memory_promptly()
    cfg, params, _ = ckpt.load_checkpoint(src)
    if not isinstance(cfg, Owl3Config):
        raise CheckpointError(f"{src}: not an mPLUG-Owl3 checkpoint ({type(cfg).__name__})")
    os.makedirs(dst, exist_ok=True)
    stored = {np.dtype(x.dtype) for x in flatten(params).values()}
    written = np_dtype(dtype) if dtype else (stored.pop() if len(stored) == 1
                                             else np.dtype(np.float32))
    names = write_tensors(params, cfg, dst, fmt, shard_size, dtype, progress)
    d = owl3_config.to_dict(cfg)
    d["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16",
                        "float16": "float16"}.get(written.name, written.name)
    d["auto_map"] = {"AutoConfig": "configuration_mplugowl3.mPLUGOwl3Config",
                     "AutoModel": "modeling_mplugowl3.mPLUGOwl3Model",
                     "AutoModelForCausalLM": "modeling_mplugowl3.mPLUGOwl3Model"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    ckpt.copy_tokenizer_files(src, dst)
    _copy_files(src, dst)
    return names


# --------------------------------------------------------------------------------------------
# A fresh Owl3 from HF Qwen2 + SigLIP


def _qwen2_text(d: dict, where: str) -> TextConfig:
    if d.get("model_type") not in ("qwen2", None):
        raise ValueError(f"{where}: model_type {d.get('model_type')!r} is not qwen2")
    od = owl3_config.from_dict({**{k: v for k, v in d.items() if k != "vision_config"},
                                "hyper_layers": [1]}, where)
    return od.text


def _siglip_vision(d: dict, where: str):
    v = d.get("vision_config", d) if d.get("model_type") == "siglip" else d
    od = owl3_config.from_dict({"vision_config": v, "num_hidden_layers": 1, "hyper_layers": [1]}, where)
    return od.vision


def build_config(qwen2_dir: str, siglip_dir: str, version: str = "240728",
                 hyper_layers=None) -> Owl3Config:
    qp, sp = os.path.join(qwen2_dir, "config.json"), os.path.join(siglip_dir, "config.json")
    text = _qwen2_text(read_json(qp), qp)
    vision = _siglip_vision(read_json(sp), sp)
    n = text.num_hidden_layers
    layers = tuple(hyper_layers) if hyper_layers else tuple(range(1, n + 1, 8))
    return Owl3Config(vision=vision, text=text, hyper_layers=layers, version=version)


def _read_part(directory, entries, cfg, strip, add, where):
    """Reads a HF directory whose keys are ours after replacing prefix `strip` with `add`."""
    reader = CheckpointReader(directory)
    infos = {}
    for k, info in reader.index().items():
        if k.startswith(strip):
            infos[add + k[len(strip):]] = (k, info)
    by_key = {e.torch_key: e for e in entries}
    problems = [f"missing key {strip}{e.torch_key[len(add):]} {list(e.torch_shape)}"
                for e in entries if e.torch_key not in infos]
    roles = {}
    for ours, (raw, info) in infos.items():
        e = by_key.get(ours)
        if e is None:
            continue
        if tuple(info.shape) != e.torch_shape:
            problems.append(f"{raw}: config.json implies {list(e.torch_shape)}, found "
                            f"{list(info.shape)}")
        roles[raw] = e
    if problems:
        raise checkpoint_problems(f"{where} does not match its config.json", problems)
    return reader, roles


def from_hf(dst: str, qwen2_dir: str, siglip_dir: str, version: str = "240728",
            hyper_layers=None, seed: int = 0, overwrite: bool = False,
            progress: bool = True) -> dict:
    cfg = build_config(qwen2_dir, siglip_dir, version, hyper_layers)
    entries = keymap.entries(cfg)
    lm = [e for e in entries if e.torch_key.startswith("language_model.")
          and ".v_kv_proj." not in e.torch_key and ".gate_proj.0." not in e.torch_key]
    vis = [e for e in entries if e.torch_key.startswith("vision_model.")]
    new = [e for e in entries if e not in lm and e not in vis]
    params = {}
    if cfg.text.tie_word_embeddings:
        lm = [e for e in lm if e.torch_key != "language_model.lm_head.weight"]
    reader, roles = _read_part(qwen2_dir, lm, cfg, "", "language_model.", qwen2_dir)
    convert_tensors(reader.tensors(), roles, params=params)
    # SiglipVisionModel / SiglipModel files of transformers 4.x: vision_model.*; 5.x's
    # SiglipVisionModel: no prefix
    keys = CheckpointReader(siglip_dir).index()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    if not any(k.startswith(prefix + "embeddings.patch_embedding.") for k in keys):
        raise CheckpointError(f"{siglip_dir}: no SigLIP vision keys "
                              f"(embeddings.patch_embedding.*)")
    reader, roles = _read_part(siglip_dir, vis, cfg, prefix, "vision_model.", siglip_dir)
    convert_tensors(reader.tensors(), roles, params=params)
    rng = np.random.default_rng(seed)
    for e in new:
        if e.torch_key.endswith(".bias"):
            x = np.zeros(e.torch_shape, np.float32)
        else:
            x = rng.normal(0.0, 0.02, e.torch_shape).astype(np.float32)
        set_path(params, e.path, ckpt.host_array(to_jax(e.kind, x)))
    dtype = {np.dtype(x.dtype) for x in flatten(params).values()}
    if len(dtype) > 1:  # the new parameters follow the LLM's stored dtype
        lm_dtype = np.dtype(get_path(params, ("language_model", "norm", "scale")).dtype)
        for e in new:
            set_path(params, e.path, ckpt.host_array(
                cast_aligned(np.asarray(get_path(params, e.path)), lm_dtype)))
    meta = ckpt.save_checkpoint(dst, params, cfg, tokenizer_dir=qwen2_dir, overwrite=overwrite,
                                extra_meta={"source": {"qwen2": os.path.abspath(qwen2_dir),
                                                       "siglip": os.path.abspath(siglip_dir)},
                                            "init": f"from-hf seed {seed}"})
    _copy_files(qwen2_dir, dst)
    return meta


# --------------------------------------------------------------------------------------------
# owl-convert (convert/cli.py): mPLUG-Owl3's flags and commands

CLI_FLAGS = {
    "torch-to-jax": [],
    "jax-to-torch": [],
    "from-hf": [  # its parts are Qwen2 and SigLIP, not --llama / --clip
        (("--qwen2",), dict(default=None, help="HF Qwen2ForCausalLM directory")),
        (("--siglip",), dict(default=None, help="HF SiglipVisionModel / SiglipModel directory")),
        (("--version",), dict(choices=("240728", "241101"), default=None,
                              help="the code version to build (default 240728)")),
        (("--hyper_layers",), dict(default=None,
                                   help="1-based hyper layer indices, comma separated (default "
                                        "1, 9, 17, ...)")),
    ],
}

is_source = is_owl3_source


def cli_run(command: str, args, progress: bool):
    from owl_jax.convert.cli import dtype_arg
    if command == "torch-to-jax":
        return torch_to_jax(args.src, args.dst, dtype_arg(args.dtype), args.overwrite, progress)
    if command == "jax-to-torch":
        return {"files": jax_to_torch(args.src, args.dst, None, dtype_arg(args.dtype),
                                      args.format, args.shard_size, progress)}
    if args.llama or args.clip:
        raise ValueError("--family owl3 is built from --qwen2 and --siglip, not --llama / --clip")
    if not args.qwen2 or not args.siglip:
        raise ValueError("--family owl3 needs --qwen2 and --siglip directories")
    layers = [int(x) for x in args.hyper_layers.split(",")] if args.hyper_layers else None
    return from_hf(args.dst, args.qwen2, args.siglip, args.version or "240728", layers,
                   args.seed, args.overwrite, progress)
