"""LLaMA SentencePiece tokenizer and chunk-wise prompt encoding.

The official code (transformers 4.28, `MplugOwlTokenizer(LlamaTokenizer)`, the slow
sentencepiece tokenizer) encodes text with `sp.encode(piece)` after splitting out the special
token strings `<s>`, `</s>`, `<unk>` (registered as no-split tokens by `from_pretrained`).
Every piece gets SentencePiece's dummy prefix "▁", so encoding is NOT additive: encoding
"a" and "b" separately differs from encoding "ab". Prompts are encoded chunk by chunk around
each `<image>`, and the training data code chunks further around `AI: ` and `\\nHuman: `; we
reproduce both exactly (see `encode_prompt` here and `owl_jax.data.tasks`).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import sentencepiece as spm

IMAGE_TOKEN = "<image>"

_IMAGE_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)})")


class OwlTokenizer:
    """A LLaMA `tokenizer.model` with the official special ids: unk 0, bos 1, eos 2, pad = unk."""

    def __init__(self, model_file: str):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        # LLaMA has no pad piece; mPLUG-Owl's special_tokens_map sets pad to <unk> (0).
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError(f"{model_file} defines no <s>/</s> ids: not a LLaMA-like model")
        self.vocab_size = self.sp.get_piece_size()
        self._special = {self.sp.id_to_piece(i): i
                         for i in (self.unk_id, self.bos_id, self.eos_id)}
        self._special_ids = frozenset(self._special.values()) | {self.pad_id}
        self._special_split = re.compile(
            "(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True))) + ")")

    @classmethod
    def from_dir(cls, path: str) -> "OwlTokenizer":
        """Loads `path/tokenizer.model` (a checkpoint or tokenizer directory)."""
        model = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{path} has no tokenizer.model")
        return cls(model)

    # ---------------------------------------------------------------------------------------
    # Encoding

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no BOS/EOS added, as the official slow LlamaTokenizer
        (`tokenizer(text, add_special_tokens=False)`): literal `<s>`, `</s>`, `<unk>` in the
        text become their ids, every other piece is `sp.encode`d on its own."""
        ids: list[int] = []
        for piece in self._special_split.split(text):
            if not piece:
                continue
            if piece in self._special:
                ids.append(self._special[piece])
            else:
                ids.extend(self.sp.encode(piece))
        return ids

    def encode_prompt(self, prompt: str, image_tokens: int,
                      num_images: int | None = None) -> list[int]:
        """[BOS] + each chunk of `re.split('(<image>)', prompt)` encoded on its own, with
        `image_tokens` ids of -1 for every `<image>` (the official `_tokenize_prompt`).

        If `num_images` is given, a different number of `<image>` in the prompt is an error.
        """
        if num_images is not None:
            found = prompt.count(IMAGE_TOKEN)
            if found != num_images:
                raise ValueError(f"prompt has {found} {IMAGE_TOKEN} but {num_images} images "
                                 f"were given: {prompt!r}")
        ids = [self.bos_id]
        for chunk in _IMAGE_SPLIT.split(prompt):
            if chunk == IMAGE_TOKEN:
                ids.extend([-1] * image_tokens)
            elif chunk:
                ids.extend(self.encode(chunk))
        return ids

    # ---------------------------------------------------------------------------------------
    # Decoding

    def decode(self, ids: Sequence[int], clean_up_tokenization_spaces: bool = False) -> str:
        """Text of `ids`, skipping special ids (unk/bos/eos/pad), image slots (< 0) and ids
        outside the vocabulary (a model's embedding table may be larger than the tokenizer).

        `clean_up_tokenization_spaces=True` applies transformers' old default clean-up
        (" ." -> "." etc.) that upstream's `decode(..., skip_special_tokens=True)` applied.
        """
        keep = [int(i) for i in ids
                if 0 <= int(i) < self.vocab_size and int(i) not in self._special_ids]
        text = self.sp.decode(keep)
        if clean_up_tokenization_spaces:
            text = clean_up_spaces(text)
        return text

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def pieces(self, text: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.encode(text)]

    def __repr__(self):
        return f"OwlTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (default on in 4.28 decode)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                 (" 're", "'re")):
        text = text.replace(a, b)
    return text
