"""A tiny Qwen2-style byte-level BPE `tokenizer.json`, trained here (tests, demos).

The same pipeline as Qwen2's file: NFC normalizer, Qwen2's split regex then byte-level
pre-tokenization, a BPE model over the 256 byte symbols, the byte-level decoder, and the added
special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (ids after the learned vocab).
"""
from __future__ import annotations

import json
import os

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = (
    "What is in the image? Describe the video in detail.",
    "A cat sits on a red mat next to a small dog. The dog is asleep.",
    "Cut to 2 rows 3 columns with a global view subimg(0,1)<|image|> global_view<|image|>",
    "<|video|> <|start_cut|>2*2 <|end_cut|> <|start_video_frame|> <|end_video_frame|>",
    "system user assistant The answer is 42. Is it? Yes, it is 1234567890 times.",
    "Ünïcödé text, emoji 🙂 and tabs\tand\nnewlines\r\n too.",
)


def write_tokenizer(directory: str, vocab_size: int = 400, config: bool = True) -> str:
    """Trains on CORPUS, writes directory/tokenizer.json (and a Qwen2-like
    tokenizer_config.json naming eos <|im_end|>, pad <|endoftext|>); returns the json's path."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    tok.add_special_tokens(list(SPECIALS))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    with open(path) as f:  # merges as "a b" strings, as Qwen2's file (older readers need it)
        spec = json.load(f)
    spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m)
                               for m in spec["model"]["merges"]]
    spec["model"].pop("ignore_merges", None)
    with open(path, "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    if config:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
                       "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                       "clean_up_tokenization_spaces": False, "model_max_length": 32768}, f)
    return path
