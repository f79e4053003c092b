"""LLaVA configuration: one dataclass, and the readers / writers of its two config.json layouts.

- llava-hf (`LlavaForConditionalGeneration`, model_type "llava"): `vision_config` (CLIP),
  `text_config` (LLaMA), `image_token_index`, `projector_hidden_act`, `vision_feature_layer`,
  `vision_feature_select_strategy`; image statistics in `preprocessor_config.json`.
- the original LLaVA (`LlavaLlamaForCausalLM`): a LlamaConfig plus the `mm_*` keys; the CLIP
  tower's config (and image processor) live in the tower's own directory (`mm_vision_tower`).

Every size comes from the files. Where a file leaves a field out, the value is what the
transformers class that reads it defaults to (LlamaConfig, CLIPVisionConfig, LlavaConfig: the
tables below; the llava-hf hub configs rely on that), never our dataclass defaults. Values
owl-jax does not implement are errors that name the field.

owl_jax checkpoint directories hold the llava-hf form plus `owl_jax_*` keys for what llava-hf
cannot express (a linear projector, the aspect-ratio rule), so that every field round-trips.
"""
from __future__ import annotations

import dataclasses
import json
import os

from owl_jax.connectors.projector import KINDS as PROJECTORS
from owl_jax.families import read_json
from owl_jax.decoder.hf_config import int_field, text_from_dict, text_to_dict
from owl_jax.decoder.llama import TextConfig
from owl_jax.encoders.vit import CLIP_MEAN, CLIP_STD, VisionConfig

STRATEGIES = ("default", "full")     # default: drop the CLS token; full: keep it
ASPECT_RATIOS = ("square", "pad")    # pad: expand to a square with the mean colour first

# transformers' class defaults, applied where a config.json leaves a field out.
HF_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, image_size=224, patch_size=32,
                               num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
HF_LLAVA_DEFAULTS = dict(image_token_index=32000, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         multimodal_projector_bias=True)

_PROJECTOR_KEY = "owl_jax_projector"
_ASPECT_KEY = "owl_jax_image_aspect_ratio"
_IMAGE_TOKEN_KEY = "owl_jax_image_token_index"   # original layout only (it has no such field)

CLIP_L_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, image_size=336, patch_size=14,
                          layer_norm_eps=1e-5)
VICUNA_7B_V15 = TextConfig(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           pad_token_id=32001)


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """Defaults: llava-1.5-7b-hf (used only when building a config in code)."""
    vision: VisionConfig = CLIP_L_336
    text: TextConfig = VICUNA_7B_V15
    projector: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    # The id of `<image>` in the (extended) vocabulary, as llava-hf; None where the vocabulary
    # has no such row (the original layout marks images with -200 in its ids instead).
    image_token_index: int | None = 32000
    image_aspect_ratio: str = "pad"
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        _one_of("projector", self.projector, PROJECTORS)
        _one_of("vision_feature_select_strategy", self.vision_feature_select_strategy,
                STRATEGIES)
        _one_of("image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        n = self.vision.num_hidden_layers
        if not isinstance(self.vision_feature_layer, int) or \
                not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer!r} must be one "
                             f"int in [{-(n + 1)}, {n}] for a {n}-layer vision tower")
        i = self.image_token_index
        if i is not None and not 0 <= i < self.text.vocab_size:
            raise ValueError(f"image_token_index {i} is outside the vocabulary "
                             f"({self.text.vocab_size} ids)")

    @property
    def image_tokens(self) -> int:
        """LLM sequence slots one image occupies: its patches (+ CLS with "full")."""
        patches = (self.vision.image_size // self.vision.patch_size) ** 2
        return patches + (self.vision_feature_select_strategy == "full")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def replace(self, **kw) -> "LlavaConfig":
        return dataclasses.replace(self, **kw)


def _one_of(field: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field} {value!r} is not supported; expected one of {list(allowed)}")


def tiny(vocab_size: int = 256, **text_kw) -> LlavaConfig:
    """A small config with non-default sizes everywhere, for tests and demos. The last id of
    the vocabulary is the image token (llava-hf style); the feature layer (-2) leaves one of the
    three ViT layers unused, as in the real model."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=4, image_size=28, patch_size=14,
                            layer_norm_eps=1e-5),
        text=TextConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256), **text_kw}),
        image_token_index=vocab_size - 1,
    )


# --------------------------------------------------------------------------------------------
# Blocks shared by both layouts


def vision_from_dict(d: dict, where: str) -> VisionConfig:
    """A HF CLIPVisionConfig dict (or a CLIPConfig holding one) -> VisionConfig, CLIP's eps."""
    if isinstance(d.get("vision_config"), dict):
        d = d["vision_config"]
    if d.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"{where}: vision tower model_type {d['model_type']!r} is not "
                         f"supported (expected a CLIP vision tower, 'clip_vision_model')")
    c = {**HF_CLIP_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if c["hidden_act"] != "quick_gelu":
        raise ValueError(f"{where}: CLIP hidden_act {c['hidden_act']!r} is not supported "
                         f"(the ViT runs QuickGELU)")
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "image_size", "patch_size", "num_channels")
    return VisionConfig(**{k: int_field(c, k, where) for k in sizes},
                        layer_norm_eps=float(c["layer_norm_eps"]))


def vision_to_dict(v: VisionConfig) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=v.num_channels,
                layer_norm_eps=v.layer_norm_eps, hidden_act="quick_gelu")


def preprocessor_dict(cfg: LlavaConfig) -> dict:
    """transformers' LlavaImageProcessor config (`do_pad` is the "pad" aspect rule)."""
    s = cfg.image_size
    return {"image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
            "do_pad": cfg.image_aspect_ratio == "pad", "do_resize": True,
            "size": {"shortest_edge": s}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std), "do_convert_rgb": True}


def _image_stats(pre: dict | None) -> dict:
    out = {}
    for k in ("image_mean", "image_std"):
        if pre and pre.get(k) is not None:
            out[k] = tuple(float(x) for x in pre[k])
    return out


# --------------------------------------------------------------------------------------------
# llava-hf config.json


def from_hf_dict(d: dict, preprocessor: dict | None = None) -> LlavaConfig:
    """A llava-hf `config.json` (and its `preprocessor_config.json`) -> LlavaConfig."""
    if d.get("model_type") != "llava":
        raise ValueError(f"config.json model_type {d.get('model_type')!r}: not a llava-hf "
                         f"(LlavaForConditionalGeneration) config")
    for block in ("vision_config", "text_config"):
        if not isinstance(d.get(block), dict):
            raise ValueError(f"config.json has no `{block}` block")
    if d["text_config"].get("model_type", "llama") != "llama":
        raise ValueError(f"config.json text_config.model_type "
                         f"{d['text_config']['model_type']!r} is not supported (LLaMA only)")
    c = {**HF_LLAVA_DEFAULTS, **d}
    if "image_token_index" not in d and "image_token_id" in d:
        c["image_token_index"] = d["image_token_id"]
    projector = c.get(_PROJECTOR_KEY, "mlp2x_gelu")
    if projector == "mlp2x_gelu" and c["projector_hidden_act"] != "gelu":
        raise ValueError(f"config.json projector_hidden_act {c['projector_hidden_act']!r} is "
                         f"not supported (LLaVA's projector uses the exact GELU, 'gelu')")
    if c["multimodal_projector_bias"] is not True:
        raise ValueError("config.json multimodal_projector_bias=false is not supported")
    if not isinstance(c["vision_feature_layer"], int):
        raise ValueError(f"config.json vision_feature_layer {c['vision_feature_layer']!r}: "
                         f"only one feature layer is supported")
    aspect = c.get(_ASPECT_KEY)
    if aspect is None:  # llava-hf holds LLaVA-1.5 models, trained on padded images
        aspect = "pad" if (preprocessor or {}).get("do_pad", True) else "square"
    return LlavaConfig(
        vision=vision_from_dict(d["vision_config"], "config.json vision_config"),
        text=text_from_dict(d["text_config"], "config.json text_config", d.get("pad_token_id")),
        projector=projector, vision_feature_layer=c["vision_feature_layer"],
        vision_feature_select_strategy=c["vision_feature_select_strategy"],
        image_token_index=c["image_token_index"], image_aspect_ratio=aspect,
        **_image_stats(preprocessor))


def to_hf_dict(cfg: LlavaConfig) -> dict:
    """The llava-hf config.json (plus `owl_jax_*` keys, which transformers keeps and ignores).
    A linear projector or a vocabulary without an image token cannot be expressed for
    transformers: the exporter refuses those for the llava-hf layout."""
    text = text_to_dict(cfg.text)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision_to_dict(cfg.vision),
        "text_config": text,
        "image_token_index": cfg.image_token_index,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": cfg.image_tokens,
        "pad_token_id": cfg.text.pad_token_id,
        "vocab_size": cfg.text.vocab_size,
        "tie_word_embeddings": False,
        _PROJECTOR_KEY: cfg.projector,
        _ASPECT_KEY: cfg.image_aspect_ratio,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------
# The original LLaVA config.json (LlavaLlamaForCausalLM)


def is_original(d: dict) -> bool:
    return "LlavaLlamaForCausalLM" in (d.get("architectures") or []) or "mm_vision_tower" in d


def from_original_dict(d: dict, clip: dict, clip_preprocessor: dict | None = None
                       ) -> LlavaConfig:
    """The original config.json, the CLIP tower's config.json and its preprocessor config."""
    missing = [k for k in ("mm_vision_tower", "mm_hidden_size", "mm_vision_select_layer")
               if d.get(k) is None]
    if missing:
        raise ValueError(f"config.json: missing {missing} (not an original LLaVA config)")
    projector = d.get("mm_projector_type") or "linear"   # absent: LLaVA's own default
    _one_of("config.json mm_projector_type", projector, PROJECTORS)
    feature = d.get("mm_vision_select_feature", "patch")
    _one_of("config.json mm_vision_select_feature", feature, ("patch", "cls_patch"))
    aspect = d.get("image_aspect_ratio") or "square"
    _one_of("config.json image_aspect_ratio", aspect, ASPECT_RATIOS)
    _one_of("config.json mm_patch_merge_type", d.get("mm_patch_merge_type", "flat"), ("flat",))
    if d.get("mm_use_im_start_end"):
        raise ValueError("config.json mm_use_im_start_end=true is not supported")
    vision = vision_from_dict(clip, "CLIP tower config.json")
    if int_field(d, "mm_hidden_size", "config.json") != vision.hidden_size:
        raise ValueError(f"config.json mm_hidden_size {d['mm_hidden_size']} != the CLIP "
                         f"tower's hidden_size {vision.hidden_size}")
    return LlavaConfig(
        vision=vision, text=text_from_dict(d, "config.json"), projector=projector,
        vision_feature_layer=int_field(d, "mm_vision_select_layer", "config.json"),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        image_token_index=d.get(_IMAGE_TOKEN_KEY), image_aspect_ratio=aspect,
        **_image_stats(clip_preprocessor))


def to_original_dict(cfg: LlavaConfig, vision_tower: str) -> dict:
    """The original config.json; `vision_tower` is where the original code finds CLIP."""
    d = dict(text_to_dict(cfg.text), architectures=["LlavaLlamaForCausalLM"], model_type="llava",
             mm_vision_tower=vision_tower, mm_hidden_size=cfg.vision.hidden_size,
             mm_projector_type=cfg.projector,
             mm_vision_select_layer=cfg.vision_feature_layer,
             mm_vision_select_feature="patch" if cfg.vision_feature_select_strategy == "default"
             else "cls_patch",
             mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
             image_aspect_ratio=cfg.image_aspect_ratio, tokenizer_padding_side="right",
             use_mm_proj=True, torch_dtype="float32")
    if cfg.image_token_index is not None:
        d[_IMAGE_TOKEN_KEY] = cfg.image_token_index
    return d


def clip_dicts(cfg: LlavaConfig) -> tuple[dict, dict]:
    """(config.json, preprocessor_config.json) of the tower as a HF CLIPVisionModel directory."""
    conf = dict(vision_to_dict(cfg.vision), architectures=["CLIPVisionModel"],
                torch_dtype="float32")
    pre = dict(preprocessor_dict(cfg), image_processor_type="CLIPImageProcessor")
    for k in ("do_pad", "processor_class"):
        del pre[k]
    return conf, pre


# --------------------------------------------------------------------------------------------
# Directories


def _optional_json(path: str) -> dict | None:
    return read_json(path) if os.path.exists(path) else None


def find_clip_dir(directory: str, d: dict, clip_dir: str | None = None) -> str:
    """The CLIP tower directory of an original-layout checkpoint: `clip_dir` if given, else
    `mm_vision_tower` when it is a local directory (absolute, or relative to `directory`), else
    `directory/vision_tower` (where the exporter writes it)."""
    if clip_dir:
        if not os.path.isfile(os.path.join(clip_dir, "config.json")):
            raise FileNotFoundError(f"{clip_dir}: no config.json (expected a HF CLIP directory)")
        return clip_dir
    name = str(d.get("mm_vision_tower") or "")
    cands = ([name, os.path.join(directory, name)] if name else []) + \
        [os.path.join(directory, "vision_tower")]
    for cand in cands:
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise FileNotFoundError(
        f"{directory}: the CLIP tower {name!r} (mm_vision_tower) is not a local directory and "
        f"there is no {os.path.join(directory, 'vision_tower')}; pass the tower's HF directory "
        f"(e.g. a download of openai/clip-vit-large-patch14-336) with --clip DIR")


def load(directory: str, clip_dir: str | None = None) -> LlavaConfig:
    """config.json (+ preprocessor_config.json) of a llava-hf or owl_jax directory, or of an
    original-layout directory (whose CLIP tower is found by `find_clip_dir`)."""
    d = read_json(os.path.join(directory, "config.json"))
    if is_original(d):
        tower = find_clip_dir(directory, d, clip_dir)
        return from_original_dict(d, read_json(os.path.join(tower, "config.json")),
                                  _optional_json(os.path.join(tower, "preprocessor_config.json")))
    return from_hf_dict(d, _optional_json(os.path.join(directory, "preprocessor_config.json")))


def save(cfg: LlavaConfig, directory: str) -> None:
    """config.json (llava-hf form + owl_jax_* keys) and preprocessor_config.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_dict(cfg), f, indent=2)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_dict(cfg), f, indent=2)
