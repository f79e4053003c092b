"""Tiny random models for tests and benchmarks of the generation engine: a small config, random
weights whose choices depend on the context, HF's LlamaForCausalLM on the same weights, and a
batch of prompts with different lengths and image counts.

Everything here is numpy on the host (no init compile); torch and transformers are imported only
by `to_hf`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from owl_jax import families
from owl_jax.families.owl1.config import OwlConfig, tiny

VOCAB = 48
"""Vocabulary size of `small_config` (token ids 0, 1, 2 are pad / BOS / EOS)."""

FAST = {"xla_backend_optimization_level": 0}
"""XLA compiler options for tiny shapes, where compile time dominates: pass as
`Generator(..., compiler_options=FAST)`."""


def small_config() -> OwlConfig:
    """tiny() with a `VOCAB`-token vocabulary, one ViT / abstractor layer (compile time), two LLM
    layers and grouped-query attention (4 heads over 2 kv heads), so the cache layout is checked
    against HF with GQA."""
    cfg = tiny(vocab_size=VOCAB, num_key_value_heads=2)
    return dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, num_hidden_layers=1),
        abstractor=dataclasses.replace(cfg.abstractor, num_hidden_layers=1))


def random_params(cfg, seed: int = 0) -> dict:
    """Random fp32 numpy weights for the model of `cfg` (any family; shapes from
    `jax.eval_shape`, so no init compile), scaled so that the model's choices depend on the
    context: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + 0.2 N, biases ~ 0.05 N, embeddings
    ~ N(0, 1)."""
    family = families.of_config(cfg)
    shapes = nn.unbox(jax.eval_shape(lambda: family.model(cfg).init(
        jax.random.key(0), *family.dummy_inputs(cfg))))["params"]
    rng = np.random.default_rng(seed)

    def make(path, a):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            x = 1 + 0.2 * rng.standard_normal(a.shape)
        elif "bias" in name:
            x = 0.05 * rng.standard_normal(a.shape)
        elif "kernel" in name:
            x = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        else:
            x = rng.standard_normal(a.shape)
        return x.astype(np.float32)
    return jax.tree_util.tree_map_with_path(make, shapes)


def to_hf(cfg: OwlConfig, params: dict):
    """HF transformers' LlamaForCausalLM (PyTorch, eager attention, eval mode) holding the
    weights of `params`' language model, for comparisons with HF `generate`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from owl_jax.convert import keymap
    t = cfg.text
    hc = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                     intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                     num_attention_heads=t.num_attention_heads, num_key_value_heads=t.kv_heads,
                     max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
                     tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     attn_implementation="eager")
    m = LlamaForCausalLM(hc).eval()
    sd = {e.torch_key: torch.from_numpy(np.ascontiguousarray(
        keymap.to_torch(e.kind, np.asarray(keymap.get_path(params, e.path)))))
        for e in keymap.hf_llama_entries(t)}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m


def prompt_rows(cfg: OwlConfig, rng: np.random.Generator) -> list[list[int]]:
    """Four prompts of different lengths for `small_config` models: text only, one image, two
    images, a longer text only one (BOS first, random token ids in [3, VOCAB), -1 x
    `cfg.image_tokens` per image). They need three images' pixel values."""
    t = cfg.image_tokens
    w = lambda n: rng.integers(3, VOCAB, n).tolist()  # noqa: E731
    return [[1] + w(9),                                   # text only
            [1] + w(2) + [-1] * t + w(4),                  # one image
            [1] + w(3) + [-1] * t + w(2) + [-1] * t + w(1),  # two images
            [1] + w(17)]                                   # longer, text only
