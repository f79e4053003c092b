"""The train state, its layout on the mesh, and the three ways to create it.

    TrainState(step, trainable, frozen, opt_state)

- `trainable` holds master weights (model.param_dtype, fp32 by default) and is the only tree the
  optimizer sees; `frozen` holds the rest (model.frozen_dtype) and is passed through the step
  untouched.
- `StateLayout` is computed from shapes only (`jax.eval_shape`): the abstract state and a
  NamedSharding for every leaf, from the params' logical axis names and the config's rules. The
  optimizer state inherits its params' names, so Adam moments shard like their params.
- Creation: `init_fresh` (random init, directly into the shardings), `init_from_export`
  (weights of an owl-convert / owl-train export directory restored straight into their
  shardings; what the directory lacks, e.g. LoRA adapters, is initialised), or a restore from a
  train checkpoint (checkpointing.py) against `layout.abstract`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from owl_jax import families
from owl_jax.layers.core import LoraSpec
from owl_jax.layers.scan import scan_params
from owl_jax.train import trainable as tr

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any

    def params(self):
        return tr.merge(self.trainable, self.frozen)


# --------------------------------------------------------------------------------------------
# Model from config


def family_of(config) -> families.Family:
    """The recipe's model family (`model.family`, owl1 by default); an `init_from` checkpoint
    of another family is an error."""
    family = families.get(config.model.get("family", families.DEFAULT))
    if config.init_from:
        stored = families.name_of_checkpoint(config.init_from)
        if stored != family.name:
            raise ValueError(f"init_from {config.init_from} holds a {stored} model, the recipe "
                             f"trains {family.name} (model.family)")
    return family


def load_tokenizer(config):
    """The tokenizer the data pipeline encodes with, from `tokenizer_dir` or else `init_from`:
    the family's own (e.g. Owl3's tokenizer.json), else a SentencePiece tokenizer.model (what
    the tests and the demo train for any family); None where neither holds one."""
    from owl_jax import families
    from owl_jax.tokenizer import OwlTokenizer
    family = families.get(config.model.family)
    for d in filter(None, (config.tokenizer_dir, config.init_from)):
        for load in (family.load_tokenizer, OwlTokenizer.from_dir):
            try:
                return load(d)
            except FileNotFoundError:
                continue
    return None


def model_config(config):
    """The model shape: from `init_from`'s config.json when set, else the `model.size` preset
    of the recipe's family."""
    m = config.model
    family = family_of(config)
    if config.init_from:
        cfg = family.load_config(config.init_from)
    elif m.size == "7b":
        cfg = family.config_type()
    elif m.size == "tiny":  # a fresh tiny model reads its tokenizer's ids, where one is set
        vocab = int(m.vocab_size)
        tok = load_tokenizer(config) if config.tokenizer_dir else None
        if tok is not None:
            vocab = tok.vocab_size
        cfg = family.tiny(vocab_size=vocab)
    else:
        raise ValueError(f"model.size={m.size!r}: expected 7b or tiny")
    if m.image_size and m.image_size != cfg.vision.image_size:
        if m.image_size % cfg.vision.patch_size:
            raise ValueError(f"model.image_size={m.image_size} is not a multiple of the patch "
                             f"size {cfg.vision.patch_size}")
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=int(m.image_size)))
    return cfg


def lora_spec(config) -> LoraSpec | None:
    if not config.lora.rank:
        return None
    return LoraSpec(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                    dropout=float(config.lora.dropout))


def build_model(config, cfg, scan_layers: bool | None = None):
    m = config.model
    lora = lora_spec(config)
    return families.of_config(cfg).model(
        cfg, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
        scan_layers=m.scan_layers if scan_layers is None else scan_layers,
        remat_policy=m.remat_policy, lora=lora,
        lora_targets=tuple(config.lora.targets) if lora else ())


def frozen_dtype(config):
    return DTYPES[config.model.frozen_dtype or config.model.param_dtype]


def init_params_fn(model, cfg):
    """rng -> boxed params (logical axis names attached)."""
    inputs = families.of_config(cfg).dummy_inputs(cfg)
    return lambda rng: model.init({"params": rng, "dropout": rng}, *inputs)["params"]


# --------------------------------------------------------------------------------------------
# Layout


@dataclasses.dataclass
class StateLayout:
    model: Any                 # the family's linen Module
    cfg: Any                   # its config
    tx: Any
    patterns: tuple[str, ...]
    frozen_dtype: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    abstract: TrainState       # ShapeDtypeStructs carrying their target sharding
    shardings: TrainState      # NamedSharding per leaf
    compiler_options: dict = dataclasses.field(default_factory=dict)  # for every jit

    @property
    def param_shardings(self):
        return tr.merge(self.shardings.trainable, self.shardings.frozen)


def _split_and_cast(params, patterns, fdtype):
    t, f = tr.split(params, patterns)
    f = jax.tree.map(lambda x: x.astype(fdtype), f)
    return t, f


def make_layout(config, model, cfg, tx, mesh, rules) -> StateLayout:
    patterns = tuple(config.trainable)
    fdtype = frozen_dtype(config)

    def boxed_state():
        boxed = init_params_fn(model, cfg)(jax.random.key(0))
        t, f = _split_and_cast(boxed, patterns, fdtype)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=t, frozen=f,
                          opt_state=tx.init(t))

    boxed = jax.eval_shape(boxed_state)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    return StateLayout(model, cfg, tx, patterns, fdtype, mesh, rules, abstract, shardings,
                       compiler_options(config))


def compiler_options(config) -> dict:
    """XLA options for every compile of the run. `fast_compile` (the tiny recipes) turns off
    LLVM optimisation: CPU compiles 3-4x faster, tiny steps run ~2x slower."""
    return {"xla_backend_optimization_level": 0} if config.get("fast_compile") else {}


# --------------------------------------------------------------------------------------------
# Creation


def init_fresh(layout: StateLayout, seed: int) -> TrainState:
    """Random init, computed directly in the target shardings (never whole on one device)."""
    init = init_params_fn(layout.model, layout.cfg)

    def fn(rng):
        t, f = _split_and_cast(nn.unbox(init(rng)), layout.patterns, layout.frozen_dtype)
        return TrainState(jnp.zeros((), jnp.int32), t, f, layout.tx.init(t))

    with jax.set_mesh(layout.mesh):
        return jax.jit(fn, out_shardings=layout.shardings,
                       compiler_options=layout.compiler_options)(jax.random.key(seed))


def _stored_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    import orbax.checkpoint as ocp
    from owl_jax import checkpoint as ckpt
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, ckpt.PARAMS_DIR))
    return {k: tuple(v.shape) for k, v in tr.flatten(meta.item_metadata.tree).items()}


def _grid_side(n: int) -> tuple[int, int]:
    """(leading CLS rows, grid side) of a table of n positions: a square grid has none
    (SigLIP), else one CLS row first (CLIP / EVA)."""
    g = int(round(n ** 0.5))
    if g * g == n:
        return 0, g
    return 1, int(round((n - 1) ** 0.5))


def resize_position_embedding(pe, num_positions: int):
    """[..., (1 +) g*g, D] -> [..., num_positions, D]: a CLS row kept, the patch grid resized
    bicubically (fine-tuning at another resolution, as CLIP / big_vision do)."""
    lead, d = pe.shape[:-2], pe.shape[-1]
    cls, g_old = _grid_side(pe.shape[-2])
    _, g_new = _grid_side(num_positions)
    flat = pe.reshape(-1, pe.shape[-2], d)[0]
    grid = flat[cls:].reshape(g_old, g_old, d).astype(jnp.float32)
    grid = jax.image.resize(grid, (g_new, g_new, d), "bicubic")
    out = jnp.concatenate([flat[:cls], grid.reshape(g_new * g_new, d).astype(pe.dtype)], 0)
    return out.reshape(*lead, num_positions, d)


def init_from_export(layout: StateLayout, directory: str, seed: int):
    """Loads an owl-convert / owl-train export directory into the state layout.

    Stored weights are restored straight into their target shardings (in the unrolled on-disk
    layout), then one jitted function stacks each tower's layers when training scans them,
    casts to the master / frozen dtypes, initialises whatever the directory lacks (LoRA adapters,
    or a module the export does not hold) and builds the optimizer state. Returns (state, report)
    where report lists the loaded and initialised parameter paths.
    """
    from owl_jax import checkpoint as ckpt

    stored = _stored_shapes(directory)
    meta = ckpt.load_meta(directory)
    unrolled = dataclasses.replace(layout.model, scan_layers=False)
    want_unrolled = nn.unbox(jax.eval_shape(init_params_fn(unrolled, layout.cfg),
                                            jax.random.key(0)))
    want = {k: tuple(v.shape) for k, v in tr.flatten(want_unrolled).items()}
    unexpected = sorted(set(stored) - set(want))
    if unexpected:
        hint = (" (the export keeps LoRA adapters unmerged: train with the same lora.* settings"
                " or merge them first)" if meta.get("lora") else "")
        raise ValueError(f"{directory}: stored params the model does not have: "
                         f"{unexpected[:5]}{hint}")
    # the ViT's position table (any family's tower): resized when the resolution changes
    pe_key = next((k for k in want if k.endswith("embeddings/position_embedding")), None)
    bad = [f"{k}: stored {list(s)}, model {list(want[k])}" for k, s in stored.items()
           if s != want[k] and k != pe_key]
    if bad:
        raise ValueError(f"{directory}: shape mismatch: {bad[:5]}")

    boxed_unrolled = jax.eval_shape(init_params_fn(unrolled, layout.cfg), jax.random.key(0))
    unrolled_shardings = tr.flatten(nn.logical_to_mesh_sharding(
        nn.get_partition_spec(boxed_unrolled), layout.mesh, layout.rules))
    if stored.get(pe_key, want.get(pe_key)) != want.get(pe_key):  # other resolution: replicate
        unrolled_shardings[pe_key] = jax.sharding.NamedSharding(layout.mesh,
                                                                jax.sharding.PartitionSpec())
    shardings = tr.unflatten({k: unrolled_shardings[k] for k in stored})
    _, loaded, _ = ckpt.load_checkpoint(directory, dtype=None, shardings=shardings, check=False)

    init = init_params_fn(layout.model, layout.cfg)
    scan = layout.model.scan_layers

    def fn(loaded, rng):
        fresh = tr.flatten(nn.unbox(init(rng)))
        got = tr.flatten(loaded)
        if pe_key in got and got[pe_key].shape != fresh[pe_key].shape:
            got[pe_key] = resize_position_embedding(got[pe_key], fresh[pe_key].shape[-2])
        if scan:
            got = tr.flatten(scan_params(tr.unflatten(got)))
        for k, v in got.items():
            if k not in fresh:
                raise ValueError(f"loaded param {k} has no place in the model")
            fresh[k] = v.astype(fresh[k].dtype)
        t, f = _split_and_cast(tr.unflatten(fresh), layout.patterns, layout.frozen_dtype)
        return TrainState(jnp.zeros((), jnp.int32), t, f, layout.tx.init(t))

    with jax.set_mesh(layout.mesh), warnings.catch_warnings():
        # Stacking layers for scan cannot reuse the donated per-layer buffers; the rest can.
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        state = jax.jit(fn, out_shardings=layout.shardings, donate_argnums=0,
                        compiler_options=layout.compiler_options)(loaded, jax.random.key(seed))
    fresh_keys = sorted(set(want) - set(stored))
    report = {"loaded": len(stored), "initialised": fresh_keys,
              "resized": ""}
    if pe_key and stored.get(pe_key) not in (None, want[pe_key]):
        grid = lambda n: _grid_side(n)[1] * layout.cfg.vision.patch_size  # noqa: E731
        report["resized"] = (f"ViT position embeddings resized from the checkpoint's "
                             f"{grid(stored[pe_key][-2])} px to model.image_size="
                             f"{layout.cfg.vision.image_size} px (bicubic)")
    return state, report


def host_params_unrolled(state: TrainState):
    """The full param tree in the on-disk (unrolled) layout, still as jax.Arrays."""
    from owl_jax.layers.scan import unscan_params
    return unscan_params(state.params())


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
