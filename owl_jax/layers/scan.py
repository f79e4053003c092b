"""The two on-disk / in-training layouts of stacked layers.

Checkpoints hold every tower's layers unrolled (`layers_{i}`); a model built with
scan_layers=True holds them stacked (`layers/layer`, one leading axis). Any top-level subtree
with `layers_{i}` children is a tower.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"^layers_(\d+)$")


def scan_params(params):
    """Unrolled layers (`layers_{i}`) of every tower -> one stacked `layers/layer` subtree each
    (for scan_layers=True)."""
    out = dict(params)
    for tower, sub in params.items():
        if not isinstance(sub, dict):
            continue
        idx = sorted(int(_LAYER.match(k).group(1)) for k in sub if _LAYER.match(k))
        if idx:
            sub = dict(sub)
            layers = [sub.pop(f"layers_{i}") for i in idx]
            sub["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
            out[tower] = sub
    return out


def unscan_params(params):
    """Inverse of `scan_params`."""
    out = dict(params)
    for tower, sub in params.items():
        if not isinstance(sub, dict) or "layers" not in sub:
            continue
        sub = dict(sub)
        stacked = sub.pop("layers")["layer"]
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            sub[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        out[tower] = sub
    return out
