"""Training samples: text (+ image slots) -> token ids and a loss mask, one sample at a time.

A sample is a dict:
  input_ids  int32 [n]   BOS first, a run of `image_tokens` ids of -1 per image;
  loss_mask  float32 [n] aligned to TARGETS: loss_mask[i] = 1 iff ids[i + 1] is trained, so
                         loss_mask[n - 1] = 0 (the last token predicts nothing);
  num_images int         image runs in input_ids (after truncation).

`max_length` has the official meaning: a sample holds at most max_length + 1 ids (the official
code pads to max_length + 1 and trains max_length targets), i.e. max_length slots once packed.

Each family's `samples` module makes its caption and conversation samples with `make_sample`
(its own template and masking); plain text (`text_sample`) is the same for all.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def make_sample(ids: list[int], labels: list[int], image_tokens: int) -> dict[str, Any]:
    # (lists until the end: a handful of small numpy ops cost more than the lists, per sample)
    # Target alignment: position i is trained when the token it predicts (i + 1) is labelled;
    # image slots never are.
    mask = [lab if t >= 0 else 0 for lab, t in zip(labels[1:], ids[1:])]
    mask.append(0)
    # Images are never cut, so slots / image_tokens counts them (adjacent images included).
    num_images = ids.count(-1) // image_tokens if image_tokens else 0
    return {"input_ids": np.array(ids, np.int32), "loss_mask": np.array(mask, np.float32),
            "num_images": num_images}


def text_sample(tok, text: str, max_length: int) -> tuple[dict[str, Any] | None, str]:
    """Plain language-model text (no template): [BOS] + text + [EOS], every token trained."""
    text = text if isinstance(text, str) else ""
    if not text.strip():
        return None, "empty_text"
    ids = [tok.bos_id] + tok.encode(text)[:max_length - 1] + [tok.eos_id]
    return make_sample(ids, [0] + [1] * (len(ids) - 1), 0), ""
