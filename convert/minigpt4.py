"""MiniGPT-4 checkpoints <-> owl_jax checkpoint directories.

Layouts (key tables in owl_jax.families.minigpt4.keymap):
- lavis: MiniGPT-4's release, one directory holding
    eva_vit_g.pth                     EVA ViT-g (a raw state dict, no prefix; 40 blocks, of
                                      which MiniGPT-4 builds and loads the first 39)
    blip2_pretrained*.pth             LAVIS BLIP-2: {"model": {ln_vision.*, query_tokens,
                                      Qformer.bert.*, ...}} (its text side, T5 / OPT parts are
                                      not MiniGPT-4's and are skipped)
    *minigpt4*.pth                    {"model": {llama_proj.*}} (training checkpoints also carry
                                      optimizer / config / scaler / epoch, which are skipped)
  and the Vicuna / LLaMA as a HF LlamaForCausalLM directory (`llama`, default DIR/vicuna).
  MiniGPT-4 loads the files in that order with strict=False, so a key in a later file wins
  (a MiniGPT-4 .pth holding a trained Q-Former overrides BLIP-2's). Without a MiniGPT-4 .pth
  the directory is stage 1's starting point: llama_proj is drawn fresh (seeded, as
  torch.nn.Linear initialises it) and the checkpoint records that. No file holds the head
  counts: they come from EVA's and BERT's head widths (88, 64) unless given, or from
  owl_jax_minigpt4.json, which the exporter writes beside the files (with the ViT depth, as
  the exported EVA file holds only the blocks in use).
- hf: transformers' Blip2ForConditionalGeneration directory (config.json model_type "blip-2"
  with a LLaMA text model), classic or transformers-5 key spelling.

Every .pth is read with torch.load(weights_only=True). Every key and shape is checked before
anything is written: missing, unexpected and mis-shaped keys are one error naming them all.
`dtype=None` keeps each tensor's stored dtype; export is bit-exact.
"""
from __future__ import annotations

import glob
import json
import os
import re
from types import SimpleNamespace
from typing import Iterable

import numpy as np
from tqdm import tqdm

from owl_jax import checkpoint as ckpt
from owl_jax.connectors.qformer import QFormerConfig
from owl_jax.convert import hf_llama, lora as lora_lib
from owl_jax.convert.keymap import (cast_aligned, check_keys, flatten, get_path, pop_path,
                                    set_path)
from owl_jax.convert.torch_io import (CheckpointError, CheckpointReader, ShardedWriter,
                                      np_dtype, numpy_to_torch, return_freed_memory_promptly,
                                      torch_to_numpy)
from owl_jax.families.minigpt4 import config as mg_config, keymap
from owl_jax.families.minigpt4.config import MiniGPT4Config

LAYOUTS = keymap.LAYOUTS
EVA_FILE = "eva_vit_g.pth"
BLIP2_FILE = "blip2_pretrained_flant5xxl.pth"
MINIGPT4_FILE = "pretrained_minigpt4.pth"
LLAMA_DIR = "vicuna"
SIDECAR = "owl_jax_minigpt4.json"
EXTRA_FILES = ("generation_config.json", "preprocessor_config.json")
_BLOCK = re.compile(r"^visual_encoder\.blocks\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Finding and reading the files


def lavis_files(directory: str) -> dict[str, str] | None:
    """{"eva", "blip2", "minigpt4"} -> the .pth files of a LAVIS-layout directory ("minigpt4"
    None where there is none); None when it holds none of them. More than one candidate for a
    role is an error naming them."""
    if not os.path.isdir(directory):
        return None
    pths = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.pth")))
    roles = {"eva": [p for p in pths if p.startswith("eva")],
             "blip2": [p for p in pths if p.startswith("blip2")],
             "minigpt4": [p for p in pths if "minigpt4" in p.lower()]}
    if not any(roles.values()):
        return None
    other = [p for p in pths if not any(p in names for names in roles.values())]
    if other:
        raise CheckpointError(f"{directory}: {other} are not MiniGPT-4 release files (expected "
                              f"{EVA_FILE}, blip2_pretrained*.pth and *minigpt4*.pth; a "
                              f"MiniGPT-4 training checkpoint such as checkpoint_4.pth: rename "
                              f"it to *minigpt4*.pth)")
    out = {}
    for role, names in roles.items():
        if len(names) > 1:
            raise CheckpointError(f"{directory}: several {role} checkpoints ({names}); keep one")
        if not names and role == "minigpt4":
            out[role] = None
            continue
        if not names:
            want = {"eva": EVA_FILE, "blip2": "blip2_pretrained*.pth",
                    "minigpt4": "*minigpt4*.pth"}[role]
            raise CheckpointError(f"{directory}: no {role} checkpoint ({want}); found {pths}")
        out[role] = os.path.join(directory, names[0])
    return out


def is_minigpt4_source(directory: str) -> bool:
    """Whether a PyTorch directory is a MiniGPT-4 one (a Blip2 config.json, or LAVIS .pth files)."""
    path = os.path.join(directory, "config.json")
    if os.path.isfile(path):
        return mg_config.read_json(path).get("model_type") == "blip-2"
    return lavis_files(directory) is not None


def read_pth(path: str) -> dict[str, np.ndarray]:
    """A .pth state dict (its "model" entry when it has one), as numpy; weights_only=True."""
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except Exception as e:  # noqa: BLE001 - unpickling / zip errors of many kinds
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "shape"):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = torch_to_numpy(v)
    return out


def lavis_state(files: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(MiniGPT-4 module key -> array, key -> the file it came from), the files applied in
    MiniGPT-4's order (EVA, BLIP-2, MiniGPT-4; later wins). Unused BLIP-2 keys are left out."""
    state, origin = {}, {}
    for role in ("eva", "blip2", "minigpt4"):
        if files.get(role) is None:
            continue
        for k, x in read_pth(files[role]).items():
            key = "visual_encoder." + k if role == "eva" else k
            if keymap.ignored(key) or (role != "eva" and keymap.lavis_unused(key)):
                continue
            state[key], origin[key] = x, os.path.basename(files[role])
    return state, origin


def _read_sidecar(directory: str) -> dict:
    path = os.path.join(directory, SIDECAR)
    return mg_config.read_json(path) if os.path.isfile(path) else {}


def _shape(state, key, where):
    if key not in state:
        raise CheckpointError(f"{where}: missing key {key} (needed to read the model's sizes)")
    return state[key].shape


def _heads(width: int, head_dim: int, given: int | None, what: str, flag: str) -> int:
    if given:
        return int(given)
    if width % head_dim:
        raise CheckpointError(f"{what} width {width} is not a multiple of the usual head width "
                              f"{head_dim}: give the head count ({flag})")
    return width // head_dim


def config_from_state(state: dict, text, where: str, vit_heads: int | None = None,
                      qformer_heads: int | None = None, vit_depth: int | None = None,
                      sidecar: dict | None = None) -> MiniGPT4Config:
    """Every size the tensors fix; head counts and the ViT depth from the arguments, else the
    sidecar, else EVA's / BERT's head widths and the EVA rule (the last stored block unused)."""
    s = sidecar or {}
    pos = _shape(state, "visual_encoder.pos_embed", where)
    patch = _shape(state, "visual_encoder.patch_embed.proj.weight", where)
    d, p = patch[0], patch[2]
    grid = int(round((pos[1] - 1) ** 0.5))
    if grid * grid != pos[1] - 1:
        raise CheckpointError(f"{where}: visual_encoder.pos_embed has {pos[1]} positions, not "
                              f"1 + a square grid")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"{where}: visual_encoder blocks are not 0..n-1: {blocks[:8]}...")
    depth = vit_depth or s.get("vit_depth") or len(blocks) - 1
    if not 1 <= depth <= len(blocks):
        raise CheckpointError(f"{where}: ViT depth {depth} but the files hold {len(blocks)} "
                              f"blocks")
    vision = mg_config.eva_vision(
        hidden_size=d, intermediate_size=_shape(state, "visual_encoder.blocks.0.mlp.fc1.weight",
                                                where)[0],
        num_hidden_layers=depth, image_size=grid * p, patch_size=p,
        num_attention_heads=_heads(d, mg_config.EVA_HEAD_DIM, vit_heads or s.get("vit_heads"),
                                   "the ViT", "--vit_heads"),
        layer_norm_eps=float(s.get("vit_eps", 1e-6)))
    qt = _shape(state, "query_tokens", where)
    layer = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")
    n = 1 + max([int(m.group(1)) for k in state if (m := layer.match(k))], default=-1)
    cross = {i for i in range(n) if
             f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight" in state}
    freq = next((f for f in range(1, n + 1) if {i for i in range(n) if i % f == 0} == cross),
                None)
    if n == 0 or freq is None:
        raise CheckpointError(f"{where}: the Q-Former's cross-attention layers {sorted(cross)} "
                              f"of {n} are not every k-th layer from layer 0")
    qd = qt[2]
    try:
        qformer = QFormerConfig(
            hidden_size=qd, num_hidden_layers=n, cross_attention_frequency=freq,
            num_attention_heads=_heads(qd, mg_config.BERT_HEAD_DIM,
                                       qformer_heads or s.get("qformer_heads"), "the Q-Former",
                                       "--qformer_heads"),
            intermediate_size=_shape(
                state, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", where)[0],
            layer_norm_eps=float(s.get("qformer_eps", 1e-12)), encoder_hidden_size=d,
            num_query_tokens=qt[1])
        ln_eps = float(s.get("ln_vision_eps", mg_config.LN_VISION_EPS))
        return MiniGPT4Config(vision=vision, qformer=qformer, text=text, ln_vision_eps=ln_eps)
    except ValueError as e:
        raise CheckpointError(f"{where}: inconsistent sizes: {e}") from None


# --------------------------------------------------------------------------------------------
# torch -> params


def convert_tensors(tensors: Iterable[tuple[str, np.ndarray]], roles: dict[str, str],
                    entries: list[keymap.Entry], cfg: MiniGPT4Config, dtype=None,
                    params=None) -> dict:
    by_key = {e.torch_key: e for e in entries}
    target = np_dtype(dtype) if dtype else None
    params = {} if params is None else params
    for raw, x in tensors:
        if raw not in roles:
            continue
        e = by_key[roles[raw]]
        for path, y in zip(e.paths, keymap.to_jax(e, x, cfg.vision.num_attention_heads)):
            if target is not None and y.dtype != target:
                y = cast_aligned(y, target)
            set_path(params, path, ckpt.host_array(y))
        del x
    return params


def _infos(state: dict, origin: dict | None = None, where: str = "state_dict") -> dict:
    return {k: SimpleNamespace(shape=tuple(v.shape), file=(origin or {}).get(k, where))
            for k, v in state.items()}


def params_from_state_dict(state_dict: dict, cfg: MiniGPT4Config, layout: str = "hf") -> dict:
    """An in-memory state dict (numpy or torch tensors) in `layout` ("hf": any Blip2 spelling;
    "lavis": MiniGPT-4's module keys, the LLaMA under `llama_model.`) -> params. For tests and
    notebooks; checked as files are."""
    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in state_dict.items()}
    canonical = keymap.canonical_hf if layout == "hf" else (lambda k: k)
    entries = keymap.entries(cfg, layout)
    roles = check_keys(_infos(arrays), entries, canonical, "state_dict", skip=keymap.ignored)
    return convert_tensors(arrays.items(), roles, entries, cfg)


def read_lavis(src: str, llama_dir: str | None = None, vit_heads: int | None = None,
               qformer_heads: int | None = None, vit_depth: int | None = None,
               dtype: str | None = None, progress: bool = True, seed: int = 0
               ) -> tuple[MiniGPT4Config, dict, dict]:
    """A LAVIS-layout directory (+ the HF LLaMA directory) -> (cfg, params, report). Without a
    MiniGPT-4 .pth, llama_proj is drawn fresh from `seed` (see `init_proj`)."""
    files = lavis_files(src)
    if files is None:
        raise CheckpointError(f"{src}: no MiniGPT-4 .pth files ({EVA_FILE}, "
                              f"blip2_pretrained*.pth, *minigpt4*.pth)")
    llama_dir = llama_dir or os.path.join(src, LLAMA_DIR)
    text = hf_llama.read_text_config(llama_dir)
    state, origin = lavis_state(files)
    cfg = config_from_state(state, text, src, vit_heads, qformer_heads, vit_depth,
                            _read_sidecar(src))
    depth = cfg.vision.num_hidden_layers
    dropped = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))
                      and int(m.group(1)) >= depth})
    entries = keymap.entries(cfg, "lavis", parts=("vision", "qformer"))
    fresh = files["minigpt4"] is None and not any(k.startswith("llama_proj.") for k in state)
    if fresh:
        entries = [e for e in entries if not e.torch_key.startswith("llama_proj.")]
    unused = lambda k: bool((m := _BLOCK.match(k)) and int(m.group(1)) >= depth)  # noqa: E731
    roles = check_keys(_infos(state, origin), entries, lambda k: k, src,
                       skip=lambda k: keymap.ignored(k) or unused(k))
    params = convert_tensors(state.items(), roles, entries, cfg, dtype)
    del state
    if fresh:
        params["llama_proj"] = init_proj(cfg, seed, dtype)
    params.update(hf_llama.read_llama_params(llama_dir, text, dtype, progress))
    report = {"llama": os.path.abspath(llama_dir), "dropped_vit_blocks": dropped,
              "files": {r: os.path.basename(p) for r, p in files.items() if p}}
    if fresh:
        report.update(random_init=["llama_proj"], seed=seed,
                      proj_init="torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), "
                                "numpy default_rng(seed), weight then bias")
    return cfg, params, report


def init_proj(cfg: MiniGPT4Config, seed: int, dtype=None) -> dict:
    """llama_proj as torch.nn.Linear initialises it (MiniGPT-4's stage-1 start): weight and
    bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from numpy.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    fan_in, d = cfg.qformer.hidden_size, cfg.text.hidden_size
    bound = 1.0 / np.sqrt(fan_in)
    target = np_dtype(dtype) if dtype else np.dtype(np.float32)
    w = rng.uniform(-bound, bound, (d, fan_in)).astype(np.float32)
    b = rng.uniform(-bound, bound, (d,)).astype(np.float32)
    return {"kernel": ckpt.host_array(np.ascontiguousarray(w.T).astype(target)),
            "bias": ckpt.host_array(b.astype(target))}


def read_hf(src: str, dtype: str | None = None, progress: bool = True
            ) -> tuple[MiniGPT4Config, dict]:
    """A Blip2ForConditionalGeneration directory -> (cfg, params), streaming tensor by tensor."""
    cfg = mg_config.load(src)
    reader = CheckpointReader(src)
    infos = reader.index()
    entries = keymap.entries(cfg, "hf")
    roles = check_keys(infos, entries, keymap.canonical_hf, src, skip=keymap.ignored)
    stream = tqdm(reader.tensors(), total=len(infos), unit="tensor", desc="torch->jax",
                  disable=not progress)
    return cfg, convert_tensors(stream, roles, entries, cfg, dtype)


def torch_to_jax(src: str, dst: str, llama_dir: str | None = None, vit_heads: int | None = None,
                 qformer_heads: int | None = None, dtype: str | None = None,
                 overwrite: bool = False, progress: bool = True, seed: int = 0) -> dict:
    """A Blip2 or LAVIS-layout MiniGPT-4 directory -> an owl_jax checkpoint directory."""
    if os.path.exists(os.path.join(dst, ckpt.PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass --overwrite)")
    return_freed_memory_promptly()
    if os.path.isfile(os.path.join(src, "config.json")):
        if llama_dir or vit_heads or qformer_heads:
            raise ValueError("--llama / --vit_heads / --qformer_heads apply to the LAVIS layout "
                             f"(.pth files); {src} is a transformers Blip2 directory")
        cfg, params = read_hf(src, dtype, progress)
        extra, tok_dir = {"source": os.path.abspath(src), "source_layout": "hf"}, src
    else:
        cfg, params, report = read_lavis(src, llama_dir, vit_heads, qformer_heads, None, dtype,
                                         progress, seed)
        extra = {"source": os.path.abspath(src), "source_layout": "lavis", **report}
        tok_dir = report["llama"]
    meta = ckpt.save_checkpoint(dst, params, cfg, tokenizer_dir=tok_dir, overwrite=overwrite,
                                extra_meta=extra)
    for name in ("tokenizer.json", "generation_config.json"):
        if os.path.exists(os.path.join(tok_dir, name)):
            with open(os.path.join(tok_dir, name), "rb") as f, \
                    open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    return meta


# --------------------------------------------------------------------------------------------
# params -> torch


def tensors_of(params: dict, entries: list[keymap.Entry], heads: int, dtype=None,
               pop: bool = True):
    """Yields (torch key, array) for every entry, popping params as they are written."""
    target = np_dtype(dtype) if dtype else None
    for e in entries:
        parts = [np.asarray(get_path(params, p)) for p in e.paths]
        y = keymap.to_torch(e, parts, heads)
        if pop:
            for p in e.paths:
                pop_path(params, p)
        yield e.torch_key, (y.astype(target) if target is not None else y)


def _save_pth(path: str, tensors: Iterable[tuple[str, np.ndarray]], wrap: bool) -> None:
    import torch
    sd = {k: numpy_to_torch(np.ascontiguousarray(x)) for k, x in tensors}
    torch.save({"model": sd} if wrap else sd, path)


def _write_json(path: str, d: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def default_layout(meta: dict) -> str:
    return meta.get("source_layout") if meta.get("source_layout") in LAYOUTS else "hf"


def jax_to_torch(src: str, dst: str, layout: str | None = None, dtype: str | None = None,
                 fmt: str | None = None, shard_size="10GB", progress: bool = True) -> list[str]:
    """Writes `layout` ("hf": one Blip2ForConditionalGeneration directory, loadable by
    transformers with strict keys; "lavis": MiniGPT-4's three .pth files, the Vicuna as a HF
    LLaMA directory in DST/vicuna, and owl_jax_minigpt4.json). Returns the files written."""
    return_freed_memory_promptly()
    cfg, params, meta = ckpt.load_checkpoint(src)
    if not isinstance(cfg, MiniGPT4Config):
        raise CheckpointError(f"{src}: not a MiniGPT-4 checkpoint ({type(cfg).__name__})")
    lora_lib.merge_params(params, meta.get("lora"))
    layout = layout or default_layout(meta)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown MiniGPT-4 layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if any(os.path.exists(os.path.join(dst, n)) for n in
           ("model.safetensors", "pytorch_model.bin", EVA_FILE, MINIGPT4_FILE)):
        raise FileExistsError(f"{dst} already holds weights; choose an empty directory")
    os.makedirs(dst, exist_ok=True)
    entries = keymap.entries(cfg, layout)
    leftover = sorted({"/".join(p) for p in flatten(params)} -
                      {"/".join(p) for e in entries for p in e.paths})
    if leftover:
        raise CheckpointError(f"{src}: params with no {layout}-layout key: {leftover[:10]}")
    heads = cfg.vision.num_attention_heads
    stored = {np.dtype(x.dtype) for x in flatten(params).values()}
    written = np_dtype(dtype) if dtype else (stored.pop() if len(stored) == 1
                                             else np.dtype(np.float32))
    if layout == "hf":
        writer = ShardedWriter(dst, fmt or "safetensors", shard_size)
        for k, y in tqdm(tensors_of(params, entries, heads, dtype), total=len(entries),
                         unit="tensor", desc="jax->torch", disable=not progress):
            writer.add(k, y)
        names = writer.close()
        _write_json(os.path.join(dst, "config.json"),
                    dict(mg_config.to_hf_dict(cfg), torch_dtype=written.name))
        _write_json(os.path.join(dst, "preprocessor_config.json"),
                    mg_config.preprocessor_dict(cfg))
        ckpt.copy_tokenizer_files(src, dst)
        return names
    llm = [e for e in entries if e.torch_key.startswith("llama_model.")]
    vision = [e for e in entries if e.torch_key.startswith("visual_encoder.")]
    rest = [e for e in entries if e not in llm and e not in vision]
    blip2 = [e for e in rest if not e.torch_key.startswith("llama_proj.")]
    proj = [e for e in rest if e.torch_key.startswith("llama_proj.")]
    strip = len("visual_encoder.")
    _save_pth(os.path.join(dst, EVA_FILE),
              ((k[strip:], y) for k, y in tensors_of(params, vision, heads, dtype)), wrap=False)
    _save_pth(os.path.join(dst, BLIP2_FILE), tensors_of(params, blip2, heads, dtype), wrap=True)
    _save_pth(os.path.join(dst, MINIGPT4_FILE), tensors_of(params, proj, heads, dtype),
              wrap=True)
    llama_dst = os.path.join(dst, LLAMA_DIR)
    os.makedirs(llama_dst, exist_ok=True)
    writer = ShardedWriter(llama_dst, fmt or "bin", shard_size)
    strip = len("llama_model.")
    for k, y in tqdm(tensors_of(params, llm, heads, dtype), total=len(llm), unit="tensor",
                     desc="jax->torch", disable=not progress):
        writer.add(k[strip:], y)
    llama_files = writer.close()
    from owl_jax.decoder.hf_config import text_to_dict
    _write_json(os.path.join(llama_dst, "config.json"),
                dict(text_to_dict(cfg.text), torch_dtype=written.name))
    ckpt.copy_tokenizer_files(src, llama_dst)
    v, q = cfg.vision, cfg.qformer
    _write_json(os.path.join(dst, SIDECAR), {
        "vit_depth": v.num_hidden_layers, "vit_heads": v.num_attention_heads,
        "vit_eps": v.layer_norm_eps, "qformer_heads": q.num_attention_heads,
        "qformer_eps": q.layer_norm_eps, "ln_vision_eps": cfg.ln_vision_eps})
    return [EVA_FILE, BLIP2_FILE, MINIGPT4_FILE, SIDECAR] + \
        [f"{LLAMA_DIR}/{n}" for n in llama_files]


# --------------------------------------------------------------------------------------------
# owl-convert (convert/cli.py): MiniGPT-4's flags and commands

CLI_FLAGS = {
    "torch-to-jax": [  # the LAVIS layout (.pth files in SRC)
        (("--llama",), dict(default=None,
                            help="LAVIS layout: the Vicuna / LLaMA HF directory (default "
                                 "SRC/vicuna)")),
        (("--vit_heads",), dict(type=int, default=None,
                                help="EVA ViT heads (default: width / 88, or "
                                     "SRC/owl_jax_minigpt4.json)")),
        (("--qformer_heads",), dict(type=int, default=None,
                                    help="Q-Former heads (default: width / 64, or "
                                         "SRC/owl_jax_minigpt4.json)")),
        (("--seed",), dict(type=int, default=None,
                           help="seed of a fresh llama_proj (SRC without a MiniGPT-4 .pth; "
                                "default 0)")),
    ],
    "jax-to-torch": [
        (("--layout",), dict(choices=LAYOUTS, default=None,
                             help="hf (Blip2ForConditionalGeneration) or lavis (MiniGPT-4's "
                                  ".pth files + DST/vicuna) (default: the layout it was "
                                  "converted from)")),
    ],
}

is_source = is_minigpt4_source


def cli_run(command: str, args, progress: bool):
    from owl_jax.convert.cli import dtype_arg
    dtype = dtype_arg(args.dtype)
    if command == "torch-to-jax":
        return torch_to_jax(args.src, args.dst, args.llama, args.vit_heads, args.qformer_heads,
                            dtype, args.overwrite, progress, args.seed or 0)
    return {"files": jax_to_torch(args.src, args.dst, args.layout, dtype, args.format,
                                  args.shard_size, progress)}
