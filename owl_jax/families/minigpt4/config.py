"""MiniGPT-4 configuration: one dataclass, and the reader / writer of its config.json.

owl_jax checkpoint directories (and exports in the transformers Blip2 layout) hold transformers'
`Blip2Config` form (model_type "blip-2": `vision_config` blip_2_vision_model, `qformer_config`
blip_2_qformer, `text_config` llama, `num_query_tokens`) plus `owl_jax_*` keys for what it
cannot express: `ln_vision`'s own eps (LAVIS builds it with torch's default 1e-5; transformers'
`post_layernorm` shares the ViT's 1e-6) and the image statistics. A Blip2 config.json without
the key gets MiniGPT-4's 1e-5.

The LAVIS / MiniGPT-4 release has no config file: the converter
(`owl_jax.convert.minigpt4.config_from_state`) reads every size the tensors fix, and takes the
head counts (which no shape holds) from EVA's and BERT's head widths (88 and 64) unless given.

Every size comes from the files. Where a Blip2 config.json leaves a field out, the value is
what transformers' class defaults to (the tables below). Values owl-jax does not implement are
errors that name the field.
"""
from __future__ import annotations

import dataclasses
import json
import os

from owl_jax.connectors.qformer import QFormerConfig
from owl_jax.decoder.llama import TextConfig
from owl_jax.encoders.vit import CLIP_MEAN, CLIP_STD, VisionConfig
from owl_jax.families import read_json
from owl_jax.decoder.hf_config import int_field, text_from_dict, text_to_dict

LN_VISION_EPS = 1e-5     # LAVIS `ln_vision`: torch's LayerNorm default
EVA_HEAD_DIM = 88        # EVA ViT-g: 1408 / 16 heads
BERT_HEAD_DIM = 64       # the Q-Former: 768 / 12 heads

HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                          num_attention_heads=16, image_size=224, patch_size=14,
                          hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
HF_QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12,
                           cross_attention_frequency=2, hidden_dropout_prob=0.1,
                           use_qformer_text_input=False)

_LN_VISION_KEY = "owl_jax_ln_vision_eps"
_MEAN_KEY, _STD_KEY = "owl_jax_image_mean", "owl_jax_image_std"


def eva_vision(**kw) -> VisionConfig:
    """A VisionConfig with EVA ViT-g's knobs (exact GELU, patch bias, q / v biases only, no pre-
    or post-LayerNorm); sizes from `kw` (defaults: ViT-g/14 at 224 px, 39 of its 40 blocks)."""
    sizes = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                 num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6)
    return VisionConfig(**{**sizes, **kw}, hidden_act="gelu", qkv_bias="qv", patch_bias=True,
                        pre_layernorm=False, post_layernorm=False)


VICUNA_7B_V0 = TextConfig(vocab_size=32000, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class MiniGPT4Config:
    """Defaults: MiniGPT-4 (Vicuna-7B v0) as released."""
    vision: VisionConfig = eva_vision()
    qformer: QFormerConfig = QFormerConfig()
    text: TextConfig = VICUNA_7B_V0
    ln_vision_eps: float = LN_VISION_EPS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        v = self.vision
        if (v.hidden_act, v.qkv_bias, v.patch_bias, v.pre_layernorm, v.post_layernorm) != \
                ("gelu", "qv", True, False, False):
            raise ValueError("MiniGPT-4's vision tower is EVA ViT-g: build it with eva_vision()")
        if self.qformer.encoder_hidden_size != v.hidden_size:
            raise ValueError(f"Q-Former encoder_hidden_size {self.qformer.encoder_hidden_size} "
                             f"!= the ViT's hidden_size {v.hidden_size}")

    @property
    def image_tokens(self) -> int:
        """LLM sequence slots one image occupies: the Q-Former's queries."""
        return self.qformer.num_query_tokens

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def replace(self, **kw) -> "MiniGPT4Config":
        return dataclasses.replace(self, **kw)


def tiny(vocab_size: int = 256, **text_kw) -> MiniGPT4Config:
    """A small config with non-default sizes everywhere (tests, demos): a 2-layer EVA-style ViT
    of width 48 (3 heads of 16), a 3-layer Q-Former of width 32 (cross-attention at layers 0
    and 2) with 8 queries, a 2-layer LLaMA of width 64."""
    return MiniGPT4Config(
        vision=eva_vision(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=3, image_size=28, patch_size=14),
        qformer=QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=56, encoder_hidden_size=48, num_query_tokens=8),
        text=TextConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256), **text_kw}),
    )


# --------------------------------------------------------------------------------------------
# transformers' Blip2Config form


def vision_from_dict(d: dict, where: str) -> VisionConfig:
    c = {**HF_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if c["hidden_act"] != "gelu":
        raise ValueError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (EVA ViT-g "
                         f"runs the exact GELU, 'gelu')")
    if c["qkv_bias"] is not True:
        raise ValueError(f"{where}: qkv_bias {c['qkv_bias']!r} is not supported (EVA ViT-g has "
                         f"query / value biases)")
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "image_size", "patch_size")
    return eva_vision(**{k: int_field(c, k, where) for k in sizes},
                      layer_norm_eps=float(c["layer_norm_eps"]))


def qformer_from_dict(d: dict, encoder_hidden_size: int, num_query_tokens: int,
                      where: str) -> QFormerConfig:
    c = {**HF_QFORMER_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if c["hidden_act"] != "gelu":
        raise ValueError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (the "
                         f"Q-Former runs the exact GELU, 'gelu')")
    if c["use_qformer_text_input"]:
        raise ValueError(f"{where}: use_qformer_text_input=true is not supported (MiniGPT-4 "
                         f"feeds the Q-Former its queries only)")
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "cross_attention_frequency")
    return QFormerConfig(**{k: int_field(c, k, where) for k in sizes},
                         layer_norm_eps=float(c["layer_norm_eps"]),
                         hidden_dropout_prob=float(c["hidden_dropout_prob"]),
                         encoder_hidden_size=encoder_hidden_size,
                         num_query_tokens=num_query_tokens)


def from_hf_dict(d: dict) -> MiniGPT4Config:
    """A Blip2 config.json (LLaMA text model) -> MiniGPT4Config."""
    if d.get("model_type") != "blip-2":
        raise ValueError(f"config.json model_type {d.get('model_type')!r}: not a transformers "
                         f"Blip2 ('blip-2') config")
    for block in ("vision_config", "qformer_config", "text_config"):
        if not isinstance(d.get(block), dict):
            raise ValueError(f"config.json has no `{block}` block")
    if d["text_config"].get("model_type") != "llama":
        raise ValueError(f"config.json text_config.model_type "
                         f"{d['text_config'].get('model_type')!r} is not supported (MiniGPT-4 "
                         f"runs a LLaMA / Vicuna)")
    vision = vision_from_dict(d["vision_config"], "config.json vision_config")
    queries = int_field({**{"num_query_tokens": 32}, **d}, "num_query_tokens", "config.json")
    stats = {k: tuple(float(x) for x in d[key]) for k, key in
             (("image_mean", _MEAN_KEY), ("image_std", _STD_KEY)) if d.get(key) is not None}
    return MiniGPT4Config(
        vision=vision,
        qformer=qformer_from_dict(d["qformer_config"], vision.hidden_size, queries,
                                  "config.json qformer_config"),
        text=text_from_dict(d["text_config"], "config.json text_config", d.get("pad_token_id")),
        ln_vision_eps=float(d.get(_LN_VISION_KEY, LN_VISION_EPS)), **stats)


def to_hf_dict(cfg: MiniGPT4Config) -> dict:
    """The Blip2 config.json (plus `owl_jax_*` keys, which transformers keeps and ignores)."""
    v, q = cfg.vision, cfg.qformer
    return {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "vision_config": dict(model_type="blip_2_vision_model", hidden_size=v.hidden_size,
                              intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_hidden_layers,
                              num_attention_heads=v.num_attention_heads,
                              image_size=v.image_size, patch_size=v.patch_size,
                              hidden_act="gelu", layer_norm_eps=v.layer_norm_eps,
                              qkv_bias=True),
        "qformer_config": dict(model_type="blip_2_qformer", hidden_size=q.hidden_size,
                               num_hidden_layers=q.num_hidden_layers,
                               num_attention_heads=q.num_attention_heads,
                               intermediate_size=q.intermediate_size, hidden_act="gelu",
                               layer_norm_eps=q.layer_norm_eps,
                               cross_attention_frequency=q.cross_attention_frequency,
                               encoder_hidden_size=q.encoder_hidden_size,
                               hidden_dropout_prob=q.hidden_dropout_prob,
                               use_qformer_text_input=False),
        "text_config": text_to_dict(cfg.text),
        "num_query_tokens": q.num_query_tokens,
        "use_decoder_only_language_model": True,
        "tie_word_embeddings": False,
        _LN_VISION_KEY: cfg.ln_vision_eps,
        _MEAN_KEY: list(cfg.image_mean),
        _STD_KEY: list(cfg.image_std),
        "torch_dtype": "float32",
    }


def preprocessor_dict(cfg: MiniGPT4Config) -> dict:
    """transformers' BlipImageProcessor config: MiniGPT-4's eval transform (a plain bicubic
    resize to S x S, no crop)."""
    s = cfg.image_size
    return {"image_processor_type": "BlipImageProcessor", "do_resize": True,
            "size": {"height": s, "width": s}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std), "do_convert_rgb": True}


def load(directory: str) -> MiniGPT4Config:
    return from_hf_dict(read_json(os.path.join(directory, "config.json")))


def save(cfg: MiniGPT4Config, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_dict(cfg), f, indent=2)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_dict(cfg), f, indent=2)
