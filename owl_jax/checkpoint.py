"""The self-contained JAX checkpoint directory (what `owl-convert` writes and everything loads).

    DIR/config.json               the family's official / HF config (its `save_config`)
    DIR/preprocessor_config.json  image size / mean / std (where the family writes one)
    DIR/tokenizer.model, tokenizer_config.json, special_tokens_map.json   (when available)
    DIR/params/                   orbax PyTree checkpoint of the UNROLLED param tree, plain arrays
    DIR/owl_jax.json              {"format", "version", "family", "dtype", "param_count", "lora"}

The family (`owl_jax.families`) is recorded in owl_jax.json; directories written before it was
are owl1 checkpoints.

LoRA adapters may be kept unmerged (`lora_a` [in, r] / `lora_b` [r, out] next to a Dense
`kernel`); `owl_jax.json` then records {"rank", "alpha", "targets"}.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from owl_jax import families

FORMAT = "owl_jax"
VERSION = 1
META_FILE = "owl_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json")
LORA_LEAVES = ("lora_a", "lora_b")


def _cpu_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS restricted): stay in numpy
        return None


def host_array(x):
    """A jax.Array on the host CPU device with `x`'s values (numpy stays numpy without a CPU
    backend). Orbax writes jax.Arrays without a second copy of the tree, but copies numpy
    leaves, so converters hand it these, built tensor by tensor. A 64-byte aligned, contiguous
    `x` is adopted without a copy (so it must not be modified afterwards); others are copied."""
    if isinstance(x, jax.Array):
        return x
    cpu = _cpu_device()
    return np.asarray(x) if cpu is None else jax.device_put(np.asarray(x), cpu, may_alias=True)


def _flat(tree) -> dict[str, Any]:
    """{"a/b/c": leaf} for a nested dict (or orbax metadata tree)."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            out[prefix] = node
    walk(tree, "")
    return out


def _dtype_name(dtypes) -> str:
    names = sorted({np.dtype(d).name for d in dtypes})
    return names[0] if len(names) == 1 else "mixed:" + ",".join(names)


def lora_targets_in(params) -> list[str]:
    """Names of the Dense modules holding LoRA adapters (`q_proj`, ...), sorted."""
    return sorted({p.split("/")[-2] for p in _flat(params) if p.split("/")[-1] in LORA_LEAVES})


def copy_tokenizer_files(src_dir: str | None, dst_dir: str) -> list[str]:
    """Copies the tokenizer files present in `src_dir`; returns their names."""
    copied = []
    if not src_dir:
        return copied
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(
                os.path.join(dst_dir, name)):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def save_checkpoint(directory: str, params, cfg, tokenizer_dir: str | None = None,
                    lora: Mapping | None = None, overwrite: bool = False,
                    extra_meta: Mapping | None = None) -> dict:
    """Writes `params` (unrolled tree of numpy or jax arrays, possibly sharded across hosts) of
    the model `cfg` (any family's config) describes.

    lora: {"rank", "alpha", "targets"} when the tree holds unmerged adapters (targets default to
    the modules that hold them). Returns the meta dict written to `owl_jax.json`.
    """
    directory = os.path.abspath(directory)
    flat = _flat(params)
    if any(k.split("/")[1:2] == ["layers"] for k in flat):  # a tower's stacked layers
        raise ValueError("params are in the scanned layout; save the unrolled tree "
                         "(owl_jax.layers.scan.unscan_params)")
    found_targets = lora_targets_in(params)
    if found_targets and lora is None:
        raise ValueError(f"params hold LoRA adapters on {found_targets}: pass "
                         f"lora={{'rank': ..., 'alpha': ...}} (or merge them first)")
    lora_meta = None
    if lora is not None:
        if not found_targets:
            raise ValueError("lora metadata given but params hold no lora_a / lora_b leaves")
        lora_meta = {"rank": int(lora["rank"]), "alpha": float(lora["alpha"]),
                     "targets": sorted(lora.get("targets") or found_targets)}
    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(params_dir):
        if not overwrite:
            raise FileExistsError(f"{params_dir} exists (pass overwrite=True / --overwrite)")
        if jax.process_index() == 0:
            shutil.rmtree(params_dir)
    os.makedirs(directory, exist_ok=True)
    # numpy leaves -> host jax.Arrays (orbax would copy numpy leaves anyway); no compression:
    # weights barely compress (~8 %) and zstd triples the time and holds a second copy.
    if jax.process_count() == 1:  # multi-host trees are global jax.Arrays already
        params = jax.tree.map(host_array, params)
    _checkpointer().save(params_dir, args=ocp.args.PyTreeSave(params))
    family = families.of_config(cfg)
    meta = {"format": FORMAT, "version": VERSION, "family": family.name,
            "dtype": _dtype_name(x.dtype for x in flat.values()),
            "param_count": int(sum(int(np.prod(x.shape)) for x in flat.values())),
            "lora": lora_meta, **dict(extra_meta or {})}
    if jax.process_index() == 0:
        family.save_config(cfg, directory)
        copy_tokenizer_files(tokenizer_dir, directory)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    return meta


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def load_config(directory: str):
    """The model config of a checkpoint directory, read by its family."""
    return families.of_checkpoint(directory).load_config(directory)


def load_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        hint = (" (it looks like a PyTorch checkpoint: run `owl-convert torch-to-jax` first)"
                if any(os.path.exists(os.path.join(directory, n)) for n in
                       ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors",
                        "model.safetensors.index.json")) else "")
        raise FileNotFoundError(f"{directory}: not an owl_jax checkpoint, no {META_FILE}{hint}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) > VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')} "
                         f"is not readable by this owl_jax (format {FORMAT!r} <= v{VERSION})")
    return meta


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{"path": shape} of every weight the family's model creates for `cfg` (abstract)."""
    family = families.of_config(cfg)
    shapes = nn.unbox(jax.eval_shape(
        lambda: family.model(cfg).init(jax.random.key(0), *family.dummy_inputs(cfg))))["params"]
    return {k: tuple(v.shape) for k, v in _flat(shapes).items()}


def check_params_against_config(stored: Mapping[str, tuple[int, ...]], cfg,
                                lora: Mapping | None, where: str) -> None:
    """Raises ValueError listing missing / unexpected / mis-shaped params."""
    want = expected_shapes(cfg)
    targets = set((lora or {}).get("targets") or ())
    problems = []
    for k, shape in want.items():
        if k not in stored:
            problems.append(f"missing {k} {list(shape)}")
        elif tuple(stored[k]) != shape:
            problems.append(f"{k}: config.json implies {list(shape)}, stored {list(stored[k])}")
    for k in stored:
        if k in want:
            continue
        parts = k.split("/")
        if parts[-1] in LORA_LEAVES and parts[-2] in targets and "/".join(
                parts[:-1] + ["kernel"]) in want:
            continue
        problems.append(f"unexpected {k} {list(stored[k])}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{where}: params do not match config.json ({len(problems)} "
                         f"problems):\n  {shown}{more}")


def load_checkpoint(directory: str, dtype=None, shardings=None, check: bool = True):
    """Returns (cfg, params, meta).

    dtype: cast every leaf on load (e.g. jnp.float32 master weights from a bf16 checkpoint);
      None keeps the stored dtype.
    shardings: None -> host numpy arrays (read-only, zero-copy views of host buffers); a single jax.sharding.Sharding for every leaf; or a
      pytree of Shardings matching the stored (unrolled) tree -> jax.Arrays restored straight into
      those shardings (each host reads only its shards).
    """
    directory = os.path.abspath(directory)
    meta = load_meta(directory)
    cfg = load_config(directory)
    params_dir = os.path.join(directory, PARAMS_DIR)
    ckptr = _checkpointer()
    try:
        tree_meta = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a broken dir
        raise ValueError(f"{params_dir}: unreadable orbax checkpoint ({type(e).__name__}: {e})"
                         ) from None
    stored = {k: tuple(m.shape) for k, m in _flat(tree_meta).items()}
    if check:
        check_params_against_config(stored, cfg, meta.get("lora"), directory)
    to_numpy = shardings is None
    if shardings is None and _cpu_device() is None:
        restore_args = jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), tree_meta)
    else:
        if shardings is None:
            # Restoring numpy leaves makes orbax hold two copies; host jax.Arrays viewed as
            # numpy (zero-copy on CPU) peak at one.
            shardings = jax.sharding.SingleDeviceSharding(_cpu_device())
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, tree_meta)
        got = _flat(shardings)
        if set(got) != set(stored):
            missing = sorted(set(stored) - set(got))[:5]
            extra = sorted(set(got) - set(stored))[:5]
            raise ValueError(f"shardings do not match the stored tree: missing {missing}, "
                             f"unexpected {extra}")
        restore_args = jax.tree.map(
            lambda m, s: ocp.ArrayRestoreArgs(sharding=s, dtype=dtype, global_shape=m.shape),
            tree_meta, shardings)
    params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=None, restore_args=restore_args))
    return cfg, _plain_dicts(params, to_numpy), meta


def _plain_dicts(tree, to_numpy: bool):
    if isinstance(tree, Mapping):
        return {k: _plain_dicts(v, to_numpy) for k, v in tree.items()}
    return np.asarray(tree) if to_numpy else tree
