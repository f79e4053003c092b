"""A fresh Owl checkpoint from HF parts: LLaMA from a `LlamaForCausalLM` directory, the ViT from
a CLIP vision tower; whatever is not given (always the abstractor and query tokens) is randomly
initialised by the Owl module's own init, seeded.

Sizes: text from the LLaMA config, vision from the CLIP config, the rest from `base` (an official
config.json; default: the released 7B config). The abstractor's width follows the ViT width
(its keys/values concatenate the normed queries with the image tokens).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.convert import hf_clip, hf_llama
from owl_jax.convert.torch_io import CheckpointError, np_dtype
from owl_jax import checkpoint as ckpt
from owl_jax.families.owl1.config import OwlConfig, load_official


def build_config(llama_dir=None, clip_dir=None, base: OwlConfig | None = None,
                 clip_eps: bool = False, abstractor_layers=None, abstractor_heads=None,
                 abstractor_intermediate=None, num_query_tokens=None) -> OwlConfig:
    base = base or OwlConfig()
    text = hf_llama.read_text_config(llama_dir) if llama_dir else base.text
    vision, image = base.vision, {}
    if clip_dir:
        clip_cfg, pre = hf_clip.read_clip_json(clip_dir)
        vision = hf_clip.vision_config_from_clip(
            clip_cfg, None if clip_eps else base.vision.layer_norm_eps)
        image = hf_clip.preprocessor_from_clip(pre)
    a = base.abstractor
    a = dataclasses.replace(
        a, hidden_size=vision.hidden_size, encoder_hidden_size=vision.hidden_size,
        num_hidden_layers=abstractor_layers or a.num_hidden_layers,
        num_attention_heads=abstractor_heads or a.num_attention_heads,
        intermediate_size=abstractor_intermediate or a.intermediate_size)
    if a.hidden_size % a.num_attention_heads:
        raise ValueError(f"abstractor width {a.hidden_size} (= ViT width) is not divisible by "
                         f"{a.num_attention_heads} heads; pass --abstractor_heads")
    return dataclasses.replace(base, text=text, vision=vision, abstractor=a,
                               num_query_tokens=num_query_tokens or base.num_query_tokens,
                               **image)


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: OwlConfig, param_dtype: str, part: str):
    """A jitted Owl init for one side of the model, cached per config (compiling the init is
    most of the cost of a small conversion)."""
    from owl_jax.families.owl1.model import Owl
    model = Owl(cfg, param_dtype=jnp.dtype(param_dtype))
    if part == "vision":
        px = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size,
                        cfg.vision.num_channels), jnp.float32)
        return jax.jit(lambda k: nn.unbox(model.init(k, px, method=Owl.encode_images)))
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.jit(lambda k: nn.unbox(model.init(k, ids)))


def random_parts(cfg: OwlConfig, seed: int, need_vision_side: bool, need_text: bool,
                 param_dtype=jnp.float32) -> dict:
    """Owl-init params (numpy) for the vision side (vision_model, query_tokens, abstractor)
    and/or the language model; only the requested submodules are materialised. The key is an
    RBG key (`unsafe_rbg`): deterministic per seed on a given backend, and far cheaper to
    compile and run on CPU than threefry for billions of weights."""
    # Fields that do not change the init (eps, image stats) are normalised so that the cached
    # compiled init is shared; the text side never looks at the vision side and vice versa.
    cfg = dataclasses.replace(cfg, image_mean=OwlConfig.image_mean, image_std=OwlConfig.image_std,
                              vision=dataclasses.replace(cfg.vision, layer_norm_eps=1e-6))
    text_cfg = dataclasses.replace(cfg, vision=OwlConfig.vision, abstractor=OwlConfig.abstractor,
                                   num_query_tokens=OwlConfig.num_query_tokens)
    vision_cfg = dataclasses.replace(cfg, text=dataclasses.replace(
        OwlConfig.text, hidden_size=cfg.text.hidden_size))
    k_vis, k_txt = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"))
    dt = jnp.dtype(param_dtype).name
    out = {}
    if need_vision_side:
        p = _init_fn(vision_cfg, dt, "vision")(k_vis)["params"]
        out.update({k: p[k] for k in ("vision_model", "query_tokens", "abstractor")})
    if need_text:
        out["language_model"] = _init_fn(text_cfg, dt, "text")(k_txt)["params"][
            "language_model"]
    return out


def from_hf(dst: str, llama_dir: str | None = None, clip_dir: str | None = None, seed: int = 0,
            base_config: str | None = None, dtype: str | None = None, clip_eps: bool = False,
            overwrite: bool = False, progress: bool = True, **abstractor_kw) -> dict:
    if not llama_dir and not clip_dir:
        raise ValueError("give at least one of a LLaMA (--llama) or CLIP (--clip) directory")
    if os.path.exists(os.path.join(dst, ckpt.PARAMS_DIR)) and not overwrite:
        raise FileExistsError(f"{dst} already holds a checkpoint (pass --overwrite)")
    base = load_official(base_config) if base_config else None
    cfg = build_config(llama_dir, clip_dir, base, clip_eps, **abstractor_kw)
    store = np_dtype(dtype) if dtype else np.dtype(np.float32)
    params = random_parts(cfg, seed, need_vision_side=True, need_text=not llama_dir,
                          param_dtype=jnp.dtype(store))
    if clip_dir:
        params.update(hf_clip.read_clip_params(clip_dir, cfg.vision, dtype, progress))
    if llama_dir:
        params.update(hf_llama.read_llama_params(llama_dir, cfg.text, dtype, progress))
    random_init = ["query_tokens", "abstractor"] + ([] if clip_dir else ["vision_model"]) + \
        ([] if llama_dir else ["language_model"])
    if sorted(params) != sorted(["vision_model", "query_tokens", "abstractor",
                                 "language_model"]):
        raise CheckpointError(f"internal: incomplete param tree {sorted(params)}")
    return ckpt.save_checkpoint(
        dst, params, cfg, tokenizer_dir=llama_dir, overwrite=overwrite,
        extra_meta={"source": {"llama": llama_dir, "clip": clip_dir, "seed": seed},
                    "random_init": random_init})
