"""What the demo does differently for each model family: a `DemoFamily` in the family's folder
(`owl_jax/families/<name>/demo.py`, named by `Family.demo`), and the tiny towers the demo's
models share."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from owl_jax import families

Turns = list  # [(question, answer), ...]

# The pipeline settings every demo stage shares (the recipes add sources, packing, template).
COMMON_DATA = dict(kind="pipeline", augment=False, workers=0, threads=2, seed=0)


def warmup_stage(c, a, p: dict, fmt: str, **data) -> None:
    """The text warm-up every family's demo starts with: the LLM alone, on the text-only
    conversations (instruction format `fmt`) and the plain-text lines, packed; `data` adds the
    family's own pipeline settings (its template)."""
    c.trainable = ("language_model/.*",)
    c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 30
    c.batch.global_size = max(a.batch // 2, 1)
    c.batch.seq_len = 128
    c.data = dict(COMMON_DATA, packing=True, **data, sources=[
        dict(spec=f"instruct:{p['text_conversations']}?format={fmt}", weight=1.0),
        dict(spec=f"webdataset:{p['text_shards']}", task="text", weight=1.0),
    ])


def instruction_source(p: dict, fmt: str) -> dict:
    """Stage 2's source: the demo's instruction set with its images."""
    return dict(spec=f"instruct:{p['instructions']}?format={fmt}&images={p['instruct_dir']}")


@dataclasses.dataclass(frozen=True)
class DemoFamily:
    """title             the model's name in the demo's messages
    model_config(vocab) the demo's tiny model for a tokenizer of `vocab` pieces
    render(turns, with_image=True)  a conversation as training text, in the family's template
    inference_text(turns)  a warm-up conversation as the model reads it at inference
    keyword_line(keywords, caption)  a warm-up text line
    stage_titles        {stage: what it trains, in words}
    stage(c, a, p)      sets the owl-train config `c` of stage `a.stage` (configs/demo_shapes.py
                        args `a`, the demo's paths `p`): what trains, lr, data, template
    steps               {stage: default optimizer steps}
    instruction_format  the format of its instruction files (owl_jax.data.conversation)
    part_names          {top-level param name: a word} for the frozen-parts report
    connector(cfg)      the image path between the ViT and the LLM, in words
    convert_args        extra `owl-convert jax-to-torch` flags for the round trip
    """
    title: str
    model_config: Callable[[int], Any]
    render: Callable[..., str]
    inference_text: Callable[[Turns], str]
    keyword_line: Callable[[str, str], str]
    stage_titles: dict
    stage: Callable[..., None]
    steps: dict
    instruction_format: str
    part_names: dict
    connector: Callable[[Any], str]
    convert_args: tuple = ()


def names() -> list[str]:
    """The families that have a demo."""
    return [n for n in families.NAMES if families.get(n).demo]


def get(name: str) -> DemoFamily:
    module = families.get(name).demo
    if not module:
        raise ValueError(f"family {name!r} has no demo; families with one: {', '.join(names())}")
    return importlib.import_module(module).DEMO


def vision(**kw):
    """The demo's ViT: 96 wide, 32 px images in 8 px patches (16 patches)."""
    from owl_jax.encoders.vit import VisionConfig
    return VisionConfig(hidden_size=96, intermediate_size=384, num_attention_heads=4,
                        image_size=32, patch_size=8, **kw)


def text(vocab_size: int):
    """The demo's LLM: 2 layers, 128 wide."""
    from owl_jax.decoder.llama import TextConfig
    return TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
