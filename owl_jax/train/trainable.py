"""Which parameters train: regexes over '/'-joined param paths split the tree in two.

The trainable tree gets gradients and optimizer state; the frozen tree is a constant of the step
(gradients still flow THROUGH frozen modules, e.g. the frozen LLM in stage 1, but no weight
gradient is formed for them and they are returned untouched, bit for bit).

Recipes (paths as in owl_jax/families/owl1/model.py; scanned layers live under
`{vision_model,abstractor,language_model}/layers/layer/...`):

  stage 1             vision_model/.*  query_tokens  abstractor/.*       (LLM frozen)
  stage 2 LoRA        .*/lora_[ab]                                      (+ abstractor/.* as the
                                                                          paper; the script
                                                                          freezes it)
  stage 2 full LLM    language_model/.*
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import numpy as np
from flax import traverse_util

STAGE1 = ("vision_model/.*", "query_tokens", "abstractor/.*")
LORA = (".*/lora_[ab]",)
FULL_LLM = ("language_model/.*",)


def _flat(tree) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}. Leaves are whatever is not a dict (arrays, shape structs,
    flax LogicallyPartitioned boxes), so this works on abstract and boxed trees too."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(_to_dict(tree)).items()}


def _unflat(flat: dict[str, Any]):
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _to_dict(tree):
    if hasattr(tree, "items") and not isinstance(tree, dict):  # FrozenDict and friends
        tree = dict(tree)
    if isinstance(tree, dict):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _compile(patterns: Iterable[str]) -> list[re.Pattern]:
    return [re.compile(p) for p in patterns]


def is_trainable(path: str, patterns: Iterable[str]) -> bool:
    return any(p.fullmatch(path) for p in _compile(patterns))


def split(params, patterns: Iterable[str]):
    """params -> (trainable, frozen) nested dicts. A pattern that matches nothing is an error
    (a typo would otherwise silently freeze the whole model)."""
    patterns = tuple(patterns)
    compiled = _compile(patterns)
    flat = _flat(params)
    used = [False] * len(compiled)
    train, frozen = {}, {}
    for path, leaf in flat.items():
        hit = [i for i, p in enumerate(compiled) if p.fullmatch(path)]
        for i in hit:
            used[i] = True
        (train if hit else frozen)[path] = leaf
    unused = [patterns[i] for i, u in enumerate(used) if not u]
    if unused:
        raise ValueError(f"trainable patterns {unused} match no parameter; paths look like "
                         f"{sorted(flat)[:3]} ...")
    if not train:
        raise ValueError("no parameter is trainable")
    return _unflat(train), (_unflat(frozen) if frozen else {})


def merge(trainable, frozen):
    """Inverse of `split`."""
    flat = _flat(frozen) if frozen else {}
    overlap = set(flat) & set(_flat(trainable))
    if overlap:
        raise ValueError(f"parameters both trainable and frozen: {sorted(overlap)[:5]}")
    flat.update(_flat(trainable))
    return _unflat(flat)


def mask(params, patterns: Iterable[str]):
    """A tree of bools shaped like params: True where the leaf's path matches a pattern."""
    compiled = _compile(patterns)
    return _unflat({k: any(p.fullmatch(k) for p in compiled) for k in _flat(params)})


def paths(tree) -> list[str]:
    return sorted(_flat(tree))


def count(tree) -> int:
    """Number of scalars in a (possibly abstract or boxed) tree."""
    def size(x):
        x = getattr(x, "value", x)  # unwrap a LogicallyPartitioned box
        return int(np.prod(x.shape))
    if not tree:
        return 0
    leaves = (_flat(tree).values() if isinstance(tree, dict) else
              jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "value")))
    return sum(size(x) for x in leaves)


def summary(trainable, frozen) -> str:
    nt, nf = count(trainable), count(frozen)
    tops = sorted({k.split("/")[0] for k in _flat(trainable)})
    return (f"trainable {nt:,} params ({100 * nt / max(nt + nf, 1):.2f}%) in {tops}; "
            f"frozen {nf:,}")


def tree_map_with_path(fn, tree):
    """fn('a/b/c', leaf) over a nested dict of leaves."""
    return _unflat({k: fn(k, v) for k, v in _flat(tree).items()})


def flatten(tree) -> dict[str, Any]:
    return _flat(tree)


def unflatten(flat: dict[str, Any]):
    return _unflat(flat)


def leaves_equal(a, b) -> bool:
    """Bitwise equality of two param trees (same paths, same bytes)."""
    fa, fb = _flat(a), _flat(b)
    if set(fa) != set(fb):
        return False
    return all(np.array_equal(np.asarray(jax.device_get(fa[k])).view(np.uint8),
                              np.asarray(jax.device_get(fb[k])).view(np.uint8)) for k in fa)
