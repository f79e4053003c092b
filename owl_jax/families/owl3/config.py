"""mPLUG-Owl3 configuration: one dataclass, and the reader / writer of the official config.json
(`mPLUGOwl3Config`: the HyperQwen2 fields at top level plus a nested SigLIP `vision_config`).

Two released code versions, one switch (`version`):
  "240728"  linear projector, gated hyper attention (separate cross-attention + sigmoid gate),
            MI-Rope at placeholder start + 1, a token sees images that start before it
  "241101"  Linear-GELU-Linear projector, fused hyper attention (one softmax over visual and
            text keys), MI-Rope at the placeholder start, a token sees images starting at it

Where config.json leaves a field out, the value is the official config class's default
(HyperQwen2Config: Qwen2-beta sizes; SiglipVisionConfig's), never our dataclass's. The official
file does not say which code version it belongs to: `owl_jax_version` does in the files we
write; otherwise the converter reads it off the checkpoint's projector keys (`version_hint`).
"""
from __future__ import annotations

import dataclasses
import json
import os

from owl_jax.decoder.hf_config import int_field
from owl_jax.decoder.llama import TextConfig
from owl_jax.encoders.siglip import SIGLIP_MEAN, SIGLIP_STD, SiglipConfig
from owl_jax.families import read_json

VERSIONS = ("240728", "241101")
_VERSION_KEY = "owl_jax_version"

# HyperQwen2Config.__init__ defaults (configuration_hyper_qwen2.py)
HYPER_QWEN2_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                            num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=None, hidden_act="silu",
                            max_position_embeddings=32768, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, rope_theta=10000.0,
                            use_sliding_window=False, hyper_layers=[1, 9, 17, 25])
# transformers' SiglipVisionConfig defaults
HF_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                          hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# mPLUGOwl3Config.default_vision_config (used when config.json has no vision_config)
OWL3_VISION = dict(hidden_size=1152, image_size=384, intermediate_size=4304,
                   num_attention_heads=16, num_hidden_layers=27, patch_size=14)

SIGLIP_SO400M_384 = SiglipConfig(**{k: OWL3_VISION[k] for k in OWL3_VISION})
QWEN2_7B = TextConfig(vocab_size=151851, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
                      bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                      stop_token_ids=(151643,), qkv_bias=True)


@dataclasses.dataclass(frozen=True)
class Owl3Config:
    """Defaults: mPLUG-Owl3-7B-240728."""
    vision: SiglipConfig = SIGLIP_SO400M_384
    text: TextConfig = QWEN2_7B
    hyper_layers: tuple[int, ...] = (1, 9, 17, 25)   # 1-based, as config.json
    version: str = "240728"
    vision_feature_layer: int = -2    # SigLIP hidden_states[-2], no post-LayerNorm
    image_mean: tuple[float, ...] = SIGLIP_MEAN
    image_std: tuple[float, ...] = SIGLIP_STD

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"version {self.version!r} is not supported; expected one of "
                             f"{list(VERSIONS)}")
        n = self.text.num_hidden_layers
        bad = [i for i in self.hyper_layers if not 1 <= i <= n]
        if bad:
            raise ValueError(f"hyper_layers {bad} are outside 1..{n} (they are 1-based)")
        if not self.text.qkv_bias:
            raise ValueError("mPLUG-Owl3's Qwen2 decoder has q/k/v biases (text.qkv_bias)")

    @property
    def projector(self) -> str:
        return "linear" if self.version == "240728" else "mlp2x_gelu"

    @property
    def fusion(self) -> str:
        return "gate" if self.version == "240728" else "fused"

    @property
    def image_tokens(self) -> int:
        """Sequence slots an image (tile) takes: one, the first token of its placeholder
        (images stay outside the sequence; the slot keeps its text token)."""
        return 1

    @property
    def tokens_per_image(self) -> int:
        """Visual keys per image (tile) in every hyper layer."""
        return self.vision.num_positions

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def replace(self, **kw) -> "Owl3Config":
        return dataclasses.replace(self, **kw)


def tiny(vocab_size: int = 256, version: str = "240728", **text_kw) -> Owl3Config:
    """Small, non-default sizes everywhere (GQA, rope theta, biases), for tests and demos: 4
    layers of which 1 and 3 (1-based) are hyper layers; a 3-layer SigLIP read at layer -2.
    Generation stops at eos and at bos (Qwen2's <|endoftext|>), as the official code."""
    text = {**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=512, rope_theta=50000.0, bos_token_id=vocab_size - 3,
                   eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 3, qkv_bias=True),
            **text_kw}
    text.setdefault("stop_token_ids", (text["bos_token_id"],))
    return Owl3Config(
        vision=SiglipConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=4, image_size=28, patch_size=14),
        text=TextConfig(**text),
        hyper_layers=(1, 3), version=version)


def from_dict(d: dict, where: str = "config.json", version: str | None = None) -> Owl3Config:
    """An official mPLUGOwl3Config dict -> Owl3Config. `version`: the code version when the
    dict does not record it (default 240728)."""
    c = {**HYPER_QWEN2_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise ValueError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    if c.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window is not supported")
    rope = c.get("rope_parameters") or {}   # transformers 5.x spelling
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope scaling {c.get('rope_scaling') or rope!r} is not "
                         f"supported")
    if "rope_theta" in rope:
        c["rope_theta"] = rope["rope_theta"]
    eos = c.get("eos_token_id", 151645)
    eos, *more = eos if isinstance(eos, list) else [eos]
    bos = c.get("bos_token_id", 151643)
    # the official `generate` stops at <|im_end|> (eos) and at <|endoftext|> (Qwen2's bos id)
    stops = tuple(dict.fromkeys(i for i in [*more, bos] if i != eos))
    text = TextConfig(
        vocab_size=int_field(c, "vocab_size", where),
        hidden_size=int_field(c, "hidden_size", where),
        intermediate_size=int_field(c, "intermediate_size", where),
        num_hidden_layers=int_field(c, "num_hidden_layers", where),
        num_attention_heads=int_field(c, "num_attention_heads", where),
        num_key_value_heads=c["num_key_value_heads"] or c["num_attention_heads"],
        max_position_embeddings=int_field(c, "max_position_embeddings", where),
        rms_norm_eps=float(c["rms_norm_eps"]), rope_theta=float(c["rope_theta"]),
        bos_token_id=bos, eos_token_id=eos, stop_token_ids=stops,
        pad_token_id=c.get("pad_token_id", bos) if c.get("pad_token_id") is not None else bos,
        qkv_bias=True, tie_word_embeddings=bool(c["tie_word_embeddings"]))
    v = {**HF_SIGLIP_DEFAULTS, **(d.get("vision_config") or OWL3_VISION)}
    vw = f"{where}: vision_config"
    if v["hidden_act"] != "gelu_pytorch_tanh":
        raise ValueError(f"{vw}.hidden_act {v['hidden_act']!r} is not supported")
    vision = SiglipConfig(**{k: int_field(v, k, vw) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "num_channels")}, layer_norm_eps=float(v["layer_norm_eps"]))
    version = str(d.get(_VERSION_KEY) or version or "240728")
    return Owl3Config(vision=vision, text=text, hyper_layers=tuple(int(i) for i in
                                                                   c["hyper_layers"]),
                      version=version)


def to_dict(cfg: Owl3Config) -> dict:
    """The official config.json layout (plus `owl_jax_version`)."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["mPLUGOwl3Model"],
        "model_type": "mplugowl3",
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers, "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "sliding_window": None, "use_sliding_window": False,
        "tie_word_embeddings": t.tie_word_embeddings, "use_cache": True,
        "vocab_size": t.vocab_size, "hyper_layers": list(cfg.hyper_layers),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads,
                          "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
                          "hidden_act": "gelu_pytorch_tanh"},
        _VERSION_KEY: cfg.version,
    }


def load(directory: str, version: str | None = None) -> Owl3Config:
    path = os.path.join(directory, "config.json")
    return from_dict(read_json(path), path, version)


def save(cfg: Owl3Config, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
