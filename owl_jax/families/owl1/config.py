"""Model configuration: dataclasses mirroring the official `config.json`, and readers for it.

Every size is read from the file; nothing falls back to 7B values when the file says otherwise.
The dataclass defaults are the released 7B values and are used only when building a config
in code (e.g. `OwlConfig()` for the real model, or `tiny()` for tests).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

from owl_jax.connectors.abstractor import AbstractorConfig
from owl_jax.decoder.llama import TextConfig
from owl_jax.families import read_json
from owl_jax.encoders.vit import CLIP_MEAN, CLIP_STD, VARIANT_FIELDS, VisionConfig

@dataclasses.dataclass(frozen=True)
class OwlConfig:
    vision: VisionConfig = VisionConfig()
    abstractor: AbstractorConfig = AbstractorConfig()
    text: TextConfig = TextConfig()
    num_query_tokens: int = 64
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    # Sequence slots an `<image>` reserves. None means num_query_tokens + 1 (what the model
    # produces). The official processor always reserves 65, whatever the model config says; see
    # `from_official_dict` for when that matters.
    slots_per_image: int | None = None

    @property
    def image_tokens(self) -> int:
        """LLM sequence slots one image occupies (the queries plus the end-of-image token, or the
        official processor's fixed 65 for official checkpoints with num_query_tokens != 64)."""
        return self.slots_per_image or self.num_query_tokens + 1

    def replace(self, **kw) -> "OwlConfig":
        return dataclasses.replace(self, **kw)


def tiny(vocab_size: int = 256, **text_kw) -> OwlConfig:
    """A small config with non-default sizes everywhere, for tests and demos."""
    return OwlConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=4, image_size=28, patch_size=14),
        abstractor=AbstractorConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, encoder_hidden_size=32),
        text=TextConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256), **text_kw}),
        num_query_tokens=4,
    )


# --------------------------------------------------------------------------------------------
# The official config.json


# The official processor's `media_info={"<image>": 65}`, independent of the model config.
OFFICIAL_IMAGE_SLOTS = 65
# Written by owl-jax so that its own checkpoints (any num_query_tokens) round-trip unchanged; the
# official config class keeps unknown keys and ignores them.
_SLOTS_KEY = "owl_jax_slots_per_image"

# Where config.json leaves a field out, the official code takes its constructor default. Those
# equal our dataclass defaults except one: MplugOwlVisualAbstractorConfig defaults to an FFN width
# of 4096, while every released checkpoint (and our default) is 2816.
_OFFICIAL_CODE_DEFAULTS = {"visual_abstractor_config": {"intermediate_size": 4096}}


def _pick(cls, d: dict, block: str):
    d = {**_OFFICIAL_CODE_DEFAULTS.get(block, {}), **d}
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in fields and v is not None})


def from_official_dict(d: dict, preprocessor: dict | None = None) -> OwlConfig:
    """Builds an OwlConfig from the official composite `config.json` (as a dict)."""
    for block in ("vision_config", "visual_abstractor_config", "text_config"):
        if not isinstance(d.get(block), dict):
            raise ValueError(f"config.json has no `{block}` block: not an mPLUG-Owl config")
    vision = _pick(VisionConfig, {k: v for k, v in d["vision_config"].items()
                                  if k not in VARIANT_FIELDS}, "vision_config")
    abstractor = _pick(AbstractorConfig, d["visual_abstractor_config"], "visual_abstractor_config")
    t = dict(d["text_config"])
    rope = t.get("rope_parameters") or t.get("rope_scaling")
    if isinstance(rope, dict):
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"text_config rope scaling {rope} is not supported")
        if rope.get("rope_theta") is not None:
            t.setdefault("rope_theta", rope["rope_theta"])
    if t.get("tie_word_embeddings"):
        raise ValueError("text_config.tie_word_embeddings=true is not supported: mPLUG-Owl's "
                         "LLaMA has an untied lm_head")
    if (t.get("pad_token_id") or 0) < 0:  # early LLaMA configs say -1; the tokenizer pads with 0
        t["pad_token_id"] = 0
    text = _pick(TextConfig, t, "text_config")
    if abstractor.encoder_hidden_size != vision.hidden_size or \
            abstractor.hidden_size != vision.hidden_size:
        raise ValueError(
            "the abstractor concatenates its queries with the ViT tokens, so "
            "visual_abstractor_config.hidden_size and encoder_hidden_size must equal "
            f"vision_config.hidden_size; got {abstractor.hidden_size}, "
            f"{abstractor.encoder_hidden_size} and {vision.hidden_size}")
    nq = int(d.get("num_query_tokens", 64))
    slots = d.get(_SLOTS_KEY)
    if slots is None and nq + 1 != OFFICIAL_IMAGE_SLOTS:
        # The official processor hard-codes 65 slots per image, and the official model fills the
        # first num_query_tokens + 1 of them, leaving the rest as a dummy token's embedding. Keep
        # that layout so that input ids (and generation) match the official code exactly.
        warnings.warn(f"num_query_tokens={nq}: each <image> reserves the official processor's "
                      f"{OFFICIAL_IMAGE_SLOTS} slots, of which the model fills {nq + 1}")
        slots = OFFICIAL_IMAGE_SLOTS
    if slots is not None and int(slots) < nq + 1:
        raise ValueError(f"config.json {_SLOTS_KEY}={slots} cannot hold {nq + 1} image tokens")
    kw: dict[str, Any] = dict(vision=vision, abstractor=abstractor, text=text,
                              num_query_tokens=nq,
                              slots_per_image=None if slots in (None, nq + 1) else int(slots))
    if preprocessor:
        kw.update(image_mean=tuple(preprocessor.get("image_mean", CLIP_MEAN)),
                  image_std=tuple(preprocessor.get("image_std", CLIP_STD)))
        size = _preprocessor_size(preprocessor)
        if size is not None and size != vision.image_size:
            # The ViT only takes its own size (its position table is sized for it), so that is
            # what images are resized to; say so rather than fail on a copied hub file.
            warnings.warn(f"preprocessor_config.json says {size} px but vision_config.image_size "
                          f"is {vision.image_size}; images are resized to {vision.image_size}")
    return OwlConfig(**kw)


def _preprocessor_size(p: dict) -> int | None:
    if "resolution" in p:
        return int(p["resolution"])
    size = p.get("size")
    if isinstance(size, dict):
        return int(size.get("shortest_edge") or size.get("height"))
    if isinstance(size, int):
        return size
    return None


def to_official_dict(cfg: OwlConfig) -> dict:
    """The official composite config.json for `cfg` (loadable by MplugOwlConfig)."""
    t = dataclasses.asdict(cfg.text)
    del t["stop_token_ids"]   # LLaMA stops at eos only
    if t["num_key_value_heads"] is None:  # LLaMA v1: the 4.28-era config has no such field
        del t["num_key_value_heads"]
    text = dict(t, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                tie_word_embeddings=False, initializer_range=0.02, use_cache=True)
    sizes = {k: v for k, v in dataclasses.asdict(cfg.vision).items() if k not in VARIANT_FIELDS}
    vision = dict(sizes, model_type="mplug_owl_vision_model",
                  hidden_act="quick_gelu", attention_dropout=0.0, initializer_range=0.02,
                  initializer_factor=1.0, projection_dim=768, use_flash_attn=False)
    abstractor = dict(dataclasses.asdict(cfg.abstractor), model_type="mplug_owl_visual_abstract",
                      initializer_range=0.02)
    return {
        "architectures": ["MplugOwlForConditionalGeneration"],
        "model_type": "mplug-owl",
        "num_query_tokens": cfg.num_query_tokens,
        _SLOTS_KEY: cfg.image_tokens,
        "use_decoder_only_language_model": True,
        "tie_word_embeddings": False,
        "vision_config": vision,
        "visual_abstractor_config": abstractor,
        "text_config": text,
        "torch_dtype": "float32",
    }


def preprocessor_dict(cfg: OwlConfig) -> dict:
    """The hub's preprocessor_config.json, plus the `size` / `crop_size` fields that the official
    processor actually reads (it ignores `resolution` and would fall back to 224 px)."""
    s = cfg.vision.image_size
    return {"resolution": s, "size": {"shortest_edge": s}, "crop_size": {"height": s, "width": s},
            "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)}


def load_official(directory: str) -> OwlConfig:
    """Reads `config.json` and (if present) `preprocessor_config.json` from a directory."""
    pre_path = os.path.join(directory, "preprocessor_config.json")
    pre = read_json(pre_path) if os.path.exists(pre_path) else None
    return from_official_dict(read_json(os.path.join(directory, "config.json")), pre)


def save_official(cfg: OwlConfig, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_official_dict(cfg), f, indent=2)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_dict(cfg), f, indent=2)
