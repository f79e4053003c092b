"""Official mPLUG-Owl PyTorch checkpoints <-> owl_jax checkpoint directories.

torch -> jax: validate every key and shape against config.json first (nothing is written if the
checkpoint does not fit), then stream tensor by tensor: each tensor is transformed into a fresh
array and the torch tensor / memory map is dropped, so peak host memory is about one copy of the
model plus one source shard.

jax -> torch: restore the host tree, then pop each leaf as it is converted and written into the
current shard, so peak memory again stays near one model copy plus one shard.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
from tqdm import tqdm

from owl_jax.convert import keymap, lora as lora_lib
from owl_jax.families.owl1 import keymap as owl_keymap
from owl_jax.convert.torch_io import (CheckpointError, CheckpointReader, ShardedWriter,
                                      checkpoint_problems, np_dtype,
                                      return_freed_memory_promptly)
from owl_jax import checkpoint as ckpt
from owl_jax.families.owl1.config import from_official_dict, load_official, save_official

EXTRA_FILES = ("generation_config.json",)
SOURCE_FILES = ("config.json", "preprocessor_config.json")


def validate(infos: dict, keys: lora_lib.LoraKeys, entries: list[keymap.Entry], src: str):
    """Missing / unexpected / mis-shaped keys -> one CheckpointError listing all of them."""
    by_key = {e.torch_key: e for e in entries}
    problems, seen = [], set()
    for raw, k in keys.canonical.items():
        info = infos[raw]
        e = by_key.get(k)
        if e is None:
            problems.append(f"unexpected key {raw} {list(info.shape)} (in "
                            f"{os.path.basename(info.file)})")
            continue
        seen.add(k)
        if tuple(info.shape) != e.torch_shape:
            problems.append(f"{raw}: config.json implies shape {list(e.torch_shape)}, "
                            f"{os.path.basename(info.file)} has {list(info.shape)}")
    for e in entries:
        if e.torch_key not in seen and e.kind != keymap.BUFFER:
            problems.append(f"missing key {e.torch_key} {list(e.torch_shape)}")
    ranks = set()
    for base, pair in keys.adapters.items():
        e = by_key.get(base)
        a, b = infos[pair["A"]].shape, infos[pair["B"]].shape
        if e is None or e.kind != keymap.LINEAR:
            problems.append(f"LoRA adapter {pair['A']} targets {base}, which is not a Linear "
                            f"weight of this model")
            continue
        out, inp = e.torch_shape
        if len(a) != 2 or len(b) != 2 or a[1] != inp or b[0] != out or a[0] != b[1]:
            problems.append(f"LoRA adapter of {base} [{out}, {inp}] has mismatched shapes: "
                            f"lora_A {list(a)}, lora_B {list(b)}")
        ranks.add(a[0])
    if len(ranks) > 1:
        problems.append(f"LoRA adapters have different ranks {sorted(ranks)}")
    if problems:
        raise checkpoint_problems(f"{src} does not match its config.json", problems)
    return ranks.pop() if ranks else None


def torch_to_jax(src: str, dst: str, dtype: str | None = None, lora_alpha: float | None = None,
                 lora_r: int | None = None, keep_lora: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Converts an official-layout directory into an owl_jax checkpoint directory.

    dtype: None keeps each tensor's stored dtype (lossless); else 'float32' | 'bfloat16' |
    'float16'. LoRA adapters (PEFT keys) are merged unless keep_lora. Returns the meta dict.
    """
    if os.path.exists(os.path.join(dst, ckpt.PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass --overwrite)")
    return_freed_memory_promptly()
    cfg = load_official(src)
    entries = owl_keymap.official_entries(cfg)
    reader = CheckpointReader(src)
    infos = reader.index()
    keys = lora_lib.classify_keys(infos)
    rank = validate(infos, keys, entries, src)
    scale = None
    if rank is not None:
        scale = lora_lib.resolve_scale(src, rank, lora_alpha, lora_r)
    if keep_lora and keys.adapters:
        _check_keepable(keys, cfg)
        if scale.use_rslora:
            raise CheckpointError("keeping rsLoRA adapters unmerged is not supported (owl_jax "
                                  "LoRA scales by alpha / r); convert without --keep_lora")
    target = np_dtype(dtype) if dtype else None
    by_key = {e.torch_key: e for e in entries}
    role = {raw: k for raw, k in keys.canonical.items()}
    adapter_of = {raw: (base, ab) for base, pair in keys.adapters.items()
                  for ab, raw in pair.items()}

    params: dict = {}
    pending: dict[str, dict[str, np.ndarray]] = {}   # LoRA A / B waiting for the merge
    bar = tqdm(total=len(infos), unit="tensor", desc="torch->jax", disable=not progress)
    for raw, x in reader.tensors():
        bar.update(1)
        if raw in adapter_of:
            base, ab = adapter_of[raw]
            pending.setdefault(base, {})[ab] = np.array(x, copy=True)
            continue
        e = by_key[role[raw]]
        if e.kind == keymap.BUFFER:
            continue  # rotary inv_freq: recomputed from the config
        y = keymap.to_jax(e.kind, x)
        del x
        if target is not None and y.dtype != target:
            y = keymap.cast_aligned(y, target)
        keymap.set_path(params, e.path, ckpt.host_array(y))  # a copy: y is freed right here
        del y
    bar.close()

    for base, ab in pending.items():
        e = by_key[base]
        kernel = np.asarray(keymap.get_path(params, e.path))
        if keep_lora:
            module = e.path[:-1]
            cast = (lambda t: t.astype(target)) if target is not None else (lambda t: t)
            for leaf, t in (("lora_a", ab["A"].T), ("lora_b", ab["B"].T)):
                keymap.set_path(params, module + (leaf,),
                                ckpt.host_array(cast(np.ascontiguousarray(t))))
        else:
            keymap.set_path(params, e.path, ckpt.host_array(
                lora_lib.merge_kernel(kernel, ab["A"].T, ab["B"].T, scale.scale)))
    lora_meta = None
    if keep_lora and keys.adapters:
        lora_meta = {"rank": scale.rank, "alpha": scale.alpha, "targets": keys.targets}
    extra = {"source": os.path.abspath(src), "source_layout": reader.layout}
    if keys.adapters and not keep_lora:
        extra["merged_lora"] = {"rank": scale.rank, "alpha": scale.alpha,
                                "targets": keys.targets}
    meta = ckpt.save_checkpoint(dst, params, cfg, tokenizer_dir=src, lora=lora_meta,
                                overwrite=overwrite, extra_meta=extra)
    for name in EXTRA_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    for name in SOURCE_FILES:  # kept verbatim so that export can give them back unchanged
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, "source_" + name))
    return meta


def _restore_source_files(src: str, dst: str, cfg) -> None:
    """Puts back the source's own config.json / preprocessor_config.json when they describe the
    same model as `cfg`, so that fields owl-jax does not model (projection_dim, ...) survive a
    round trip. A config that changed since (e.g. by training) keeps the rebuilt files."""
    kept = {n: os.path.join(src, "source_" + n) for n in SOURCE_FILES}
    if not all(os.path.exists(p) for p in kept.values()):
        return
    with open(kept["config.json"]) as f, open(kept["preprocessor_config.json"]) as g:
        official, pre = json.load(f), json.load(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = from_official_dict(official, pre) == cfg
    if same:
        for name, path in kept.items():
            shutil.copyfile(path, os.path.join(dst, name))


def _check_keepable(keys: lora_lib.LoraKeys, cfg) -> None:
    """owl_jax keeps adapters only where its Owl(lora=...) puts them: the same LLaMA projections
    in every layer."""
    targets = keys.targets
    n = cfg.text.num_hidden_layers
    want = set()
    for t in targets:
        group = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        want |= {f"language_model.model.layers.{i}.{group}.{t}.weight" for i in range(n)}
    if set(keys.adapters) != want:
        odd = sorted(set(keys.adapters) ^ want)[:5]
        raise CheckpointError(f"cannot keep these LoRA adapters unmerged (owl_jax adapts the "
                              f"same LLaMA projections in every layer); e.g. {odd}. Convert "
                              f"without --keep_lora to merge them.")


# --------------------------------------------------------------------------------------------


def set_torch_dtype(path: str, dtype: np.dtype) -> None:
    """config.json's `torch_dtype` names the dtype actually written (HF's torch_dtype="auto")."""
    with open(path) as f:
        conf = json.load(f)
    conf["torch_dtype"] = np.dtype(dtype).name
    with open(path, "w") as f:
        json.dump(conf, f, indent=2)


def jax_to_torch(src: str, dst: str, dtype: str | None = None, fmt: str = "bin",
                 shard_size="10GB", progress: bool = True) -> list[str]:
    """Writes the official layout (strict-loadable by the official code under transformers
    4.28.1, `rotary_emb.inv_freq` buffers included) plus config / tokenizer / preprocessor files.
    Unmerged LoRA adapters are merged. Returns the weight file names."""
    return_freed_memory_promptly()
    cfg, params, meta = ckpt.load_checkpoint(src)
    lora_lib.merge_params(params, meta.get("lora"))
    entries = owl_keymap.official_entries(cfg)
    leftover = sorted(set("/".join(p) for p in keymap.flatten(params))
                      - {e.path_str for e in entries})
    if leftover:
        raise CheckpointError(f"{src}: params with no official key: {leftover[:10]}")
    target = np_dtype(dtype) if dtype else None
    weight_dtypes = {np.dtype(x.dtype) for x in keymap.flatten(params).values()}
    buffer_dtype = target or (weight_dtypes.pop() if len(weight_dtypes) == 1
                              else np.dtype(np.float32))
    if os.path.exists(dst) and any(os.path.exists(os.path.join(dst, n)) for n in
                                   ("pytorch_model.bin", "model.safetensors")):
        raise FileExistsError(f"{dst} already holds weights; choose an empty directory")
    writer = ShardedWriter(dst, fmt, shard_size)
    inv_freq = keymap.rope_inv_freq(cfg.text)
    for e in tqdm(entries, unit="tensor", desc="jax->torch", disable=not progress):
        if e.kind == keymap.BUFFER:
            writer.add(e.torch_key, inv_freq.astype(buffer_dtype))
            continue
        x = keymap.pop_path(params, e.path)
        y = keymap.to_torch(e.kind, x)
        del x
        if target is not None and y.dtype != target:
            y = y.astype(target)
        writer.add(e.torch_key, y)
    names = writer.close()
    save_official(cfg, dst)
    _restore_source_files(src, dst, cfg)
    set_torch_dtype(os.path.join(dst, "config.json"), buffer_dtype)
    ckpt.copy_tokenizer_files(src, dst)
    for name in EXTRA_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names


# --------------------------------------------------------------------------------------------
# owl-convert (convert/cli.py): mPLUG-Owl's flags and commands

CLI_FLAGS = {
    "torch-to-jax": [
        (("--lora_alpha",), dict(type=float, default=None,
                                 help="LoRA alpha when SRC has PEFT adapters but no "
                                      "adapter_config.json")),
        (("--lora_r",), dict(type=int, default=None, help="LoRA rank (checked vs the tensors)")),
        (("--keep_lora",), dict(action="store_true",
                                help="store adapters unmerged (lora_a / lora_b) instead of "
                                     "merging them")),
    ],
    "jax-to-torch": [],
    "from-hf": [
        (("--base_config",), dict(default=None,
                                  help="official config.json (or its directory) giving the sizes "
                                       "of the parts not read from HF (abstractor, query tokens, "
                                       "missing tower); default: the released 7B config")),
        (("--clip_eps",), dict(action="store_true",
                               help="keep CLIP's LayerNorm eps (1e-5) instead of Owl's ViT eps "
                                    "(1e-6)")),
        (("--abstractor_layers",), dict(type=int, default=None)),
        (("--abstractor_heads",), dict(type=int, default=None)),
        (("--abstractor_intermediate",), dict(type=int, default=None)),
        (("--num_query_tokens",), dict(type=int, default=None)),
    ],
}


def is_source(src: str) -> bool:
    """mPLUG-Owl is the default family: torch-to-jax reads SRC as an official checkpoint when
    no other family claims it."""
    return True


def cli_run(command: str, args, progress: bool):
    from owl_jax.convert.cli import dtype_arg
    dtype = dtype_arg(args.dtype)
    if command == "torch-to-jax":
        return torch_to_jax(args.src, args.dst, dtype, args.lora_alpha, args.lora_r,
                            args.keep_lora, args.overwrite, progress)
    if command == "jax-to-torch":
        return {"files": jax_to_torch(args.src, args.dst, dtype, args.format or "bin",
                                      args.shard_size, progress)}
    from owl_jax.convert.from_hf import from_hf
    base = args.base_config
    if base and base.endswith(".json"):
        base = os.path.dirname(os.path.abspath(base))
    return from_hf(args.dst, args.llama, args.clip, args.seed, base, dtype, args.clip_eps,
                   args.overwrite, progress, abstractor_layers=args.abstractor_layers,
                   abstractor_heads=args.abstractor_heads,
                   abstractor_intermediate=args.abstractor_intermediate,
                   num_query_tokens=args.num_query_tokens)
