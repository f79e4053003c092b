"""A byte-level BPE tokenizer read from an HF `tokenizer.json` (Qwen2's and its peers').

It is HF `tokenizers` itself, so ids equal those of transformers' fast tokenizer loaded from
the same file: the added tokens of the file (Qwen2: `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`) are matched first, the text between them goes through the file's normalizer,
pre-tokenizer and BPE model. Nothing is added around the text (Qwen2's tokenizer adds no BOS),
so a prompt may be encoded chunk by chunk as the official processors do.

The special ids (bos / eos / pad) are named by `tokenizer_config.json` when the directory has
one (its `bos_token`, `eos_token`, `pad_token`), else by the defaults the loader is given.
Decoding skips the file's special tokens, negative ids (media slots) and ids past the
vocabulary (a model's embedding table may be larger: Qwen2's has 151851 rows for 151646 ids).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer

FILE = "tokenizer.json"


def _token_name(value):
    """tokenizer_config.json writes a token as a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """`encode(text) -> ids` (nothing added), `decode(ids) -> text`, `bos_id`, `eos_id`,
    `pad_id`, `vocab_size` (ids the file defines, added tokens included), `token_id(text)`."""

    def __init__(self, path: str, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.model_file = path
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        added = self.tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        names = self._config_names(os.path.dirname(path))
        self.bos_token = names.get("bos_token", bos)
        self.eos_token = names.get("eos_token", eos)
        self.pad_token = names.get("pad_token", pad) or self.eos_token
        self.bos_id = self._id_or_none(self.bos_token, "bos")
        self.eos_id = self._id_or_none(self.eos_token, "eos")
        self.pad_id = self._id_or_none(self.pad_token, "pad")
        if self.eos_id is None:
            raise ValueError(f"{path}: no eos token (tokenizer_config.json names none and no "
                             f"default was given)")
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @staticmethod
    def _config_names(directory: str) -> dict:
        path = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        out = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            name = _token_name(config.get(key))
            if name:
                out[key] = name
        return out

    def _id_or_none(self, token: str | None, what: str):
        if token is None:
            return None
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.model_file}: the {what} token {token!r} is not in the "
                             f"vocabulary")
        return i

    @classmethod
    def from_dir(cls, directory: str, **defaults) -> "HFTokenizer":
        path = os.path.join(directory, FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no {FILE}")
        return cls(path, **defaults)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry (a special token's text, or a raw BPE piece)."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a token of {self.model_file}")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size
                and not (skip_special_tokens and int(i) in self._special_ids)]
        return self.tok.decode(keep, skip_special_tokens=False)

    def pieces(self, text: str) -> list[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def __repr__(self):
        return f"HFTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"
