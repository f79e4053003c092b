"""LLaVA training samples: a conversation or a caption -> ids with image slots and a loss mask,
labelled exactly as LLaVA's `preprocess_v1` / `preprocess_plain` (`llava/train/train.py`).

The reference labels the compact form of a sample, with ONE id (-200) per image, then the
model widens each -200 into the image's features (their labels ignored) and cuts the sequence
to `model_max_length` ids. Stage 2 (two-style templates, `preprocess_v1`):
  1. the conversation text (templates.render) is tokenized: `tokenizer_image_token` when the
     record has an image, else the plain tokenizer call cut to model_max_length;
  2. labels = ids; BOS is masked (cur = 1);
  3. the text is split on "</s>" into rounds, each round on " ASSISTANT: " (a round that does
     not split in two ends the loop); with the same tokenizer call as in 1,
       round_len = len(ids(round)): its BOS stands for the "</s>" the split removed;
       instruction_len = len(ids(part0 + " ASSISTANT: ")) - 2: BOS and the "▁" that the
       trailing space becomes on its own (in the full text it joins the answer's first word);
     labels[cur : cur + instruction_len] are masked and cur += round_len;
  4. everything from cur on is masked; if cur < model_max_length and cur differs from the
     number of ids that are not the pad id (unk, 0), the whole sample is masked (the
     reference's "tokenization mismatch" warning). Here that sample is dropped instead.
  Net effect: each answer and its closing "</s>" train; system, user turns (image included)
  and the "ASSISTANT:" tags do not. The tokenizer is the legacy slow LLaMA tokenizer (an
  `OwlTokenizer`); the reference subtracts 1 more per round after the first only for a
  non-legacy tokenizer, which this code does not model.
Stage 1 (`preprocess_plain`): "<image>" + caption + "\\n" (no EOS), the first
len(tokenizer_image_token("<image>")) = 2 ids (BOS, the image) masked.

Samples use the convention of `owl_jax.data.tasks` (its docstring): input_ids with
`image_tokens` ids of -1 per image, loss_mask aligned to targets (loss_mask[i] = 1 iff
input_ids[i + 1] trains), num_images; at most seq_len + 1 ids, so a sample fills one row of
seq_len slots and LLaVA's model_max_length M is seq_len = M - 1. Images are never cut: one
that does not fit ends the sample. A sample with nothing left to train is dropped.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from owl_jax.families.llava import templates
from owl_jax.families.llava.templates import IMAGE_TOKEN

IGNORE = -100  # LLaVA's IGNORE_INDEX
IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX: the one id of an image in the compact form

_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "ai"}


class _Drop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -------------------------------------------------------------------------------------------
# Tokenization as the reference calls it


def image_token_ids(tok, text: str) -> list[int]:
    """`tokenizer_image_token`: BOS, then each chunk between "<image>"s encoded on its own (so
    each starts with a fresh "▁"), one IMAGE id between consecutive chunks."""
    ids = [tok.bos_id]
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE)
        ids += tok.encode(chunk)
    return ids


def _text_ids(tok, text: str) -> list[int]:
    """`tokenizer(text).input_ids` of the slow LLaMA tokenizer: BOS + the text."""
    return [tok.bos_id] + tok.encode(text)


# -------------------------------------------------------------------------------------------
# Labels in the compact form


def v1_labels(tok, conversation: str, has_image: bool, model_max_length: int,
              template: str | templates.Template = "vicuna_v1"
              ) -> tuple[list[int], list[int], bool]:
    """`preprocess_v1` on one rendered conversation -> (ids, labels, ok), compact form (IMAGE
    for an image, IGNORE for masked labels). ok is False where the reference masks the whole
    sample for a tokenization mismatch (labels are then all IGNORE)."""
    t = templates.get(template)
    if t.style != "two":
        raise ValueError(f"training masks exist for the two-style templates (vicuna_v1, "
                         f"llava_v1) and plain, not {t.name}")
    count = image_token_ids if has_image else _text_ids
    ids = count(tok, conversation)
    if not has_image:
        ids = ids[:model_max_length]
    labels = list(ids)
    n = len(ids)

    def mask(start: int, stop: int):
        for j in range(max(start, 0), min(stop, n)):
            labels[j] = IGNORE

    total = sum(1 for i in ids if i != tok.pad_id)
    tag = t.answer_tag
    cur = 1
    mask(0, cur)
    for rnd in conversation.split(t.sep2):
        if not rnd:
            break
        parts = rnd.split(tag)
        if len(parts) != 2:
            break
        round_len = len(count(tok, rnd))
        instruction_len = len(count(tok, parts[0] + tag)) - 2
        mask(cur, cur + instruction_len)
        cur += round_len
    mask(cur, n)
    if cur < model_max_length and cur != total:
        return ids, [IGNORE] * n, False
    return ids, labels, True


def plain_labels(tok, caption: str) -> tuple[list[int], list[int]]:
    """`preprocess_plain`: "<image>" + caption + "\\n", the BOS and the image masked."""
    ids = image_token_ids(tok, IMAGE_TOKEN + caption + templates.TEMPLATES["plain"].sep)
    head = len(image_token_ids(tok, IMAGE_TOKEN))
    return ids, [IGNORE] * head + ids[head:]


def to_sample(ids: Sequence[int], labels: Sequence[int], seq_len: int,
              image_tokens: int) -> tuple[Optional[dict[str, Any]], str]:
    """Compact (ids, labels) -> (sample, "") or (None, reason): each IMAGE widened to
    `image_tokens` slots of -1 (never trained), cut to seq_len + 1 ids before any image that
    does not fit whole."""
    limit = seq_len + 1
    out_ids: list[int] = []
    out_labels: list[int] = []
    for i, lab in zip(ids, labels):
        if i == IMAGE:
            if len(out_ids) + image_tokens > limit:
                break
            out_ids += [-1] * image_tokens
            out_labels += [IGNORE] * image_tokens
        elif len(out_ids) < limit:
            out_ids.append(i)
            out_labels.append(lab)
        else:
            break
    mask = [float(lab != IGNORE) for lab in out_labels[1:]] + [0.0]
    if not any(mask):
        return None, "no_trained_tokens"
    return {"input_ids": np.array(out_ids, np.int32), "loss_mask": np.array(mask, np.float32),
            "num_images": out_ids.count(-1) // image_tokens if image_tokens else 0}, ""


# -------------------------------------------------------------------------------------------
# Records -> messages


def _image_first(value: str) -> str:
    """`preprocess_multimodal`: a turn holding "<image>" loses every one of them and starts
    with a single "<image>\\n" instead."""
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


def _turn(t: Any) -> tuple[str, Any]:
    if isinstance(t, dict):
        return t.get("from", t.get("role")), t.get("value", t.get("content"))
    if isinstance(t, (tuple, list)) and len(t) == 2:
        return t[0], t[1]
    raise _Drop("bad_type")


def conversation_messages(conv: Any) -> tuple[list[str], bool]:
    """(messages alternating user / assistant, has_image) as LLaVA's dataset prepares them from

    - a LLaVA record {"image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}
      (LLaVA-Instruct, the 665K mix with its text-only records, LCS-558K): has_image when it
      names an image; then every turn holding "<image>" is rewritten to start with it;
    - an `owl_jax.data.conversation.Conversation` (its ("human", "<image>") turns become the
      "<image>\\n" lines of the next human turn; has_image when it has images);
    - a list of turns: strings alternating user / assistant, (role, text) pairs or
      {"from", "value"} dicts; has_image when a turn holds "<image>".

    A first turn that is not the user's is dropped (once, as the reference does). Raises
    _Drop(reason) for records the reference could not use."""
    if hasattr(conv, "turns") and hasattr(conv, "images"):
        raw, pending = [], 0
        for role, text in conv.turns:
            if role in _USER_ROLES and text == IMAGE_TOKEN:
                pending += 1
                continue
            if pending and role in _USER_ROLES:
                text, pending = (IMAGE_TOKEN + "\n") * pending + text, 0
            raw.append((role, text))
        has_image, rewrite = bool(conv.images), False
    else:
        if isinstance(conv, dict):
            turns = conv.get("conversations")
            has_image = bool(conv.get("image"))
            if not isinstance(turns, list):
                raise _Drop("missing_field")
        else:
            turns = list(conv)
            has_image = None
        if turns and all(isinstance(t, str) for t in turns):
            raw = [("human" if k % 2 == 0 else "gpt", t) for k, t in enumerate(turns)]
        else:
            raw = [_turn(t) for t in turns]
        if has_image is None:
            has_image = any(isinstance(v, str) and IMAGE_TOKEN in v for _, v in raw)
        rewrite = has_image
    if not raw:
        raise _Drop("empty_text")
    roles = []
    for role, value in raw:
        r = str(role).strip().lower()
        if r not in _USER_ROLES | _ASSISTANT_ROLES:
            raise _Drop("bad_role")
        if not isinstance(value, str):
            raise _Drop("bad_type")
        roles.append(0 if r in _USER_ROLES else 1)
    values = [v for _, v in raw]
    if roles[0] != 0:
        roles, values = roles[1:], values[1:]
    if not values:
        raise _Drop("empty_text")
    if any(r != k % 2 for k, r in enumerate(roles)):
        raise _Drop("not_alternating")
    if rewrite:
        values = [_image_first(v) if IMAGE_TOKEN in v else v for v in values]
    return values, has_image


# -------------------------------------------------------------------------------------------
# What the data pipeline calls


def caption_sample(tok, caption: str, seq_len: int, image_tokens: int
                   ) -> tuple[Optional[dict[str, Any]], str]:
    """Stage-1 pair (the `plain` template): [BOS] + image slots + caption + "\\n", loss on the
    caption and its newline (LLaVA trains no EOS in stage 1). An empty caption is dropped."""
    if not isinstance(caption, str) or not caption.strip():
        return None, "empty_text"
    return to_sample(*plain_labels(tok, caption), seq_len, image_tokens)


def conversation_sample(tok, conv: Any, seq_len: int, image_tokens: int,
                        template: str | templates.Template = "vicuna_v1"
                        ) -> tuple[Optional[dict[str, Any]], str]:
    """One stage-2 conversation -> (sample, "") or (None, reason), labelled as
    `preprocess_v1` does. `conv` is a conversation text already rendered with the template
    (has_image when it holds "<image>"), or anything `conversation_messages` reads.
    template="plain": the record is a stage-1 pair (a human turn with "<image>", the caption
    as the answer; or the caption text itself) and `caption_sample` labels it."""
    t = templates.get(template)
    try:
        if t.style == "plain":
            if not isinstance(conv, str):
                values, _ = conversation_messages(conv)
                if len(values) != 2 or IMAGE_TOKEN not in values[0]:
                    raise _Drop("image_count_mismatch")
                conv = values[1]
            return caption_sample(tok, conv, seq_len, image_tokens)
        if isinstance(conv, str):
            text, has_image = conv, IMAGE_TOKEN in conv
        else:
            values, has_image = conversation_messages(conv)
            text = templates.render(values, t)
        ids, labels, ok = v1_labels(tok, text, has_image, seq_len + 1, t)
    except _Drop as e:
        return None, e.reason
    if not ok:
        return None, "tokenization_mismatch"
    return to_sample(ids, labels, seq_len, image_tokens)
