"""mPLUG-Owl3's tokenizer: Qwen2's byte-level BPE, read from the checkpoint's tokenizer.json.

Its added special tokens are `<|endoftext|>` (151643: bos / pad, and a terminator),
`<|im_start|>` (151644) and `<|im_end|>` (151645: eos). `<|image|>`, `<|video|>` and the 241101
markers (`<|start_cut|>`, ...) are not special: they are ordinary text, several BPE tokens.
"""
from __future__ import annotations

from owl_jax.hf_tokenizer import HFTokenizer

BOS, EOS, PAD = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"


def load(directory: str) -> HFTokenizer:
    """`directory/tokenizer.json`, its specials named by tokenizer_config.json when present."""
    return HFTokenizer.from_dir(directory, bos=BOS, eos=EOS, pad=PAD)
