"""Train a tiny LLaMA-like SentencePiece tokenizer in about a second, for tests and demos.

The model has the same layout as the LLaMA tokenizer mPLUG-Owl ships: BPE, `<unk>`=0, `<s>`=1,
`</s>`=2, no pad piece (pad is `<unk>`), byte fallback for anything unseen, a dummy-prefix "▁",
identity normalization and whitespace kept as is. Only the vocabulary is small.
"""
from __future__ import annotations

import io
import json
import os
import random

import sentencepiece as spm

from owl_jax.data.conversation import SYSTEM_PROMPT

_WORDS = (
    "the a an of to in on at with and or but is are was were be been it this that these those "
    "what where when who why how which image picture photo shows man woman dog cat bus car red "
    "white blue green black street table person people sitting standing holding there here "
    "color colors describe detail details answer question please can you tell me about some "
    "many one two three four five big small left right front back next near under over water "
    "sky tree grass building window food plate kitchen room bed train plane boat horse bird"
).split()


def default_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-ish text that contains the official template's words."""
    rng = random.Random(seed)
    out = [SYSTEM_PROMPT, "Human: <image>", "Human: What is in the image?", "AI: "]
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        end = rng.choice([".", "?", "!", ","])
        line = " ".join(words) + end
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 2023)}"
        out.append(rng.choice(["Human: ", "AI: ", ""]) + line)
    return out


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 512, texts=None) -> str:
    """Trains the model and writes tokenizer.model, tokenizer_config.json and
    special_tokens_map.json into out_dir (as the hub checkpoints have them). Returns the
    path of tokenizer.model. Deterministic: the same inputs give the same bytes.

    vocab_size must exceed 259 + the number of distinct characters (256 byte pieces + 3
    specials are always present).
    """
    texts = list(texts) if texts is not None else default_corpus()
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        max_sentencepiece_length=16, num_threads=1, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    special = {name: {"content": tok, "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False}
               for name, tok in (("bos_token", "<s>"), ("eos_token", "</s>"),
                                 ("unk_token", "<unk>"), ("pad_token", "<unk>"))}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 2048, "legacy": True, "sp_model_kwargs": {},
              **{k: v["content"] for k, v in special.items()}}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path
