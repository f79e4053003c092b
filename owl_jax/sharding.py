"""Mesh construction, logical-axis rules, and host-batch -> global-array helpers.

Models name every parameter and large activation by logical axes; the rules below map those
names onto the mesh axes `data`, `fsdp`, `tensor`. Changing the parallelism layout means
changing rules (in the config), never model code.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). First matching mesh axis that is free wins (flax semantics).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),          # model width of the ViT, abstractor and LLM
    ("text_embed", "fsdp"),     # LLM width on the abstractor's output projection
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    # The token table's vocab axis stays whole: a gather from a vocab-sharded table makes XLA
    # copy the full table to every device. Its width is still sharded (fsdp).
    ("embed_vocab", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (takes the remaining devices).

    Axes are Auto (not Explicit) so that linen's logical partitioning drives the layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh "
                             f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # odd device counts / CPU stand-ins: plain order is fine
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_from_config(rules) -> tuple:
    """Config rules (list of [name, axes]) -> tuple form flax expects."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def logical_to_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape(init)`).

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    return logical_to_shardings(abstract_boxed_params, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension over the data-like axes the rules give `act_batch`."""
    axes = dict(rules).get("act_batch", ("data", "fsdp"))
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def global_batch(local_batch: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Per-process numpy batch -> global jax.Arrays, batch dimension sharded over data axes.

    Every process passes its own share (equal sizes); the global batch is their concatenation
    in process order.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules),
                                                      np.asarray(v))
            for k, v in local_batch.items()}


def shard_params(params, shardings):
    """Places a host (numpy / single-device) param tree onto the given shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
