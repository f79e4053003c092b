"""Model families: what is particular to each model, behind one seam.

Each family lives in `owl_jax/families/<name>/` (config.py, model.py, processor.py, ...) and
exposes `FAMILY`, a `Family`. Generic code (checkpoints, the API, the generation engine, the
trainer, the converters' CLI, eval) calls only these fields, and finds the family of a config
(`of_config`), of a checkpoint directory (`of_checkpoint`: its owl_jax.json names it; older
directories, written before families existed, are owl1) or by name (`get`, a recipe's
`config.model.family`). Nothing outside `families/` branches on a family name.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

NAMES = ("owl1", "llava", "minigpt4", "owl3")
DECODER = "language_model"  # every family's decoder submodule / param subtree
DEFAULT = "owl1"  # the family of checkpoints that do not name one


@dataclasses.dataclass(frozen=True)
class Family:
    """What generic code may ask of a family.

    name              as recorded in checkpoints and recipes
    config_type       the frozen dataclass of its model config (has `.text`, the decoder's
                      TextConfig, `.image_tokens` slots per image, `.image_size`)
    load_config(dir)  its official / HF config.json (and preprocessor_config.json) -> config
    save_config(cfg, dir)
    tiny(**text_kw)   a small config with non-default sizes (tests, demos)
    model             the linen Module class: model(cfg, dtype=, param_dtype=, scan_layers=,
                      remat_policy=, lora=, lora_targets=); it has __call__(input_ids,
                      pixel_values, segment_ids, positions, deterministic), encode_images,
                      embed(ids, image_embeds), prompt_inputs(ids, pixel_values, positions)
                      -> (embeddings, visual context), embed_tokens, decode, head, and its
                      decoder as `language_model` (owl_jax.decoder.llama.Llama over cfg.text)
    dummy_inputs(cfg) (input_ids, pixel_values [1, 1, H, W, 3]) that create every parameter
    processor(tokenizer, cfg)  prompts + images -> {input_ids (-1 at image slots),
                      attention_mask, pixel_values}; `.image(img)`; `.encode(prompt)` -> ids
    build_prompt(question_or_turns, n_images)  the family's chat template
    image_flops(cfg)  [(name, top-level param names, owl_jax.train.flops.ModuleFlops per
                      image)] of its image path, in order (the trainer's MFU accounting)
    samples           training samples for the data pipeline: `caption(tok, text, seq_len,
                      image_tokens, prompt, template)`, `conversation(tok, Conversation,
                      seq_len, image_tokens, template)` -> (sample, drop reason) as
                      owl_jax.data.tasks; `pixels(img, cfg, augment, rng)` -> uint8 [S, S, 3]
    demo              the module holding its `DEMO` (owl_jax.demo.family.DemoFamily), or None
    converter         the module `owl-convert` runs for it (its CLI_FLAGS, is_source, cli_run:
                      see owl_jax.convert.cli), or None
    tokenizer(dir)    its tokenizer from a checkpoint or tokenizer directory (FileNotFoundError
                      naming the file when the directory has none); None: the LLaMA
                      SentencePiece `tokenizer.model` (owl_jax.tokenizer.OwlTokenizer)
    """
    name: str
    config_type: type
    load_config: Callable[[str], Any]
    save_config: Callable[[Any, str], None]
    tiny: Callable[..., Any]
    model: type
    dummy_inputs: Callable[[Any], tuple]
    processor: Callable[..., Any]
    build_prompt: Callable[..., str]
    image_flops: Callable[[Any], list]
    samples: Any
    demo: str | None = None
    converter: str | None = None
    tokenizer: Callable[[str], Any] | None = None

    def load_tokenizer(self, directory: str):
        """The family's tokenizer from `directory` (FileNotFoundError when it holds none)."""
        if self.tokenizer is not None:
            return self.tokenizer(directory)
        from owl_jax.tokenizer import OwlTokenizer
        return OwlTokenizer.from_dir(directory)


def get(name: str) -> Family:
    if name not in NAMES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"owl_jax.families.{name}").FAMILY


def of_config(cfg) -> Family:
    for name in NAMES:
        family = get(name)
        if isinstance(cfg, family.config_type):
            return family
    raise TypeError(f"{type(cfg).__name__} is not the config of a known family ({NAMES})")


def read_json(path: str) -> dict:
    """A config file's JSON, with errors that name the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def name_of_checkpoint(directory: str) -> str:
    """The family an owl_jax checkpoint directory records (owl1 when it names none)."""
    path = os.path.join(directory, "owl_jax.json")
    if not os.path.isfile(path):
        return DEFAULT
    with open(path) as f:
        return json.load(f).get("family", DEFAULT)


def of_checkpoint(directory: str) -> Family:
    return get(name_of_checkpoint(directory))
