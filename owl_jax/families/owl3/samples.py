"""mPLUG-Owl3's training samples, laid out as its processor's training mode lays them out
(`build_text_qwen` + `encode_text_sft` with inference_mode off):

chat (conversations; captions with template "owl3_chat"):
    "<|im_start|>system\\n<|im_end|>"                    (or the record's own system text)
    "\\n<|im_start|>user\\n{content}<|im_end|>"            per user turn, split at every <|image|>
    "\\n<|im_start|>assistant\\n"                          untrained
    "{answer}<|im_end|>"  "<|endoftext|>"                 trained
plain (captions, the default: the processor's prompt_style "plain"):
    "{prompt with its <|image|>s}"  "{caption}"  "<|endoftext|>"   only the last two train

Every chunk is tokenized on its own, an `<|image|>` chunk too (ordinary BPE text); the first
token of each placeholder becomes a media slot (`model.media_id`, a negative id that keeps its
token), so images never enter the sequence: a sample's images are its media slots, in order.
No BOS (Qwen2 has none). Greedy truncation chunk by chunk to seq_len + 1 ids; a placeholder is
never cut (one that does not fit ends the sample). A sample with nothing trained is dropped.

Images of a conversation: the `<image>` turns of a record (LLaVA-style, all before the first
question) become placeholders at the start of the next user turn, then a newline (as
`build_prompt` asks); `<image>` tags inside a user turn (interleaved / multi-image records, or a
video's frames, read with the instruction format `interleave`) stay where they are.
"""
from __future__ import annotations

from owl_jax.data import images
from owl_jax.data.conversation import SYSTEM_PROMPT
from owl_jax.data.tasks import make_sample
from owl_jax.families.owl3.model import media_id

IMAGE = "<|image|>"
RECORD_IMAGE = "<image>"   # how instruction records mark an image
IM_START, IM_END, EOD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TEMPLATES = ("", "owl3_plain", "owl3_chat")


def chat_chunks(messages) -> list[tuple[str, int]]:
    """(text, label) chunks of [(role, content)] in the chat template (training mode)."""
    out: list[tuple[str, int]] = []
    if not messages or messages[0][0] != "system":
        out.append((f"{IM_START}system\n{IM_END}", 0))
    for role, content in messages:
        if role == "system":
            out.append((f"{IM_START}system\n{content}{IM_END}", 0))
        elif role == "user":
            out += [(c, 0) for c in _split_images(f"\n{IM_START}user\n{content}{IM_END}")]
        elif role == "assistant":
            out += [(f"\n{IM_START}assistant\n", 0), (f"{content}{IM_END}", 1), (EOD, 1)]
        else:
            raise ValueError(f"unknown role {role!r}: expected system, user or assistant")
    return out


def plain_chunks(prompt: str, text: str) -> list[tuple[str, int]]:
    return [(c, 0) for c in _split_images(prompt)] + [(text, 1), (EOD, 1)]


def _split_images(text: str) -> list[str]:
    parts = text.split(IMAGE)
    out = [parts[0]]
    for p in parts[1:]:
        out += [IMAGE, p]
    return out


def encode_chunks(tok, chunks, limit: int):
    """(ids, labels) of at most `limit` ids; placeholders become media slots, never cut."""
    ids: list[int] = []
    labels: list[int] = []
    for text, label in chunks:
        if len(ids) >= limit:
            break
        if text == IMAGE:
            slot = tok.encode(IMAGE)
            if len(ids) + len(slot) > limit:
                break
            ids += [media_id(slot[0])] + list(slot[1:])
            labels += [label] * len(slot)
            continue
        new = tok.encode(text)[:limit - len(ids)] if text else []
        ids += new
        labels += [label] * len(new)
    return ids, labels


def sample_of(tok, chunks, seq_len: int):
    """(sample, "") or (None, reason): the tasks convention, one media slot per image."""
    ids, labels = encode_chunks(tok, chunks, seq_len + 1)
    if len(ids) < 2:
        return None, "prompt_too_long"
    sample = make_sample(ids, labels, 1)
    sample["num_images"] = sum(1 for t in ids if t < 0)
    if not sample["loss_mask"].any():
        return None, "no_trained_tokens"
    return sample, ""


def caption(tok, text: str, seq_len: int, image_tokens: int, prompt: str = "",
            template: str = ""):
    """An image-text pair: one image, then the caption. `prompt` may place the image (its
    `<|image|>` or `<image>`); without one, the image comes first."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown mPLUG-Owl3 caption template {template!r}; known: "
                         f"{', '.join(repr(t) for t in TEMPLATES)}")
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        return None, "empty_text"
    prompt = (prompt or "").replace(RECORD_IMAGE, IMAGE)
    if IMAGE not in prompt:
        prompt = IMAGE + ("\n" + prompt if prompt and template == "owl3_chat" else prompt)
    if prompt.count(IMAGE) != 1:
        raise ValueError(f"a caption prompt places one image, got {prompt!r}")
    if template == "owl3_chat":
        chunks = chat_chunks([("user", prompt), ("assistant", text)])
    else:
        chunks = plain_chunks(prompt, text)
    return sample_of(tok, chunks, seq_len)


def messages_of(conv) -> list[tuple[str, str]] | None:
    """A Conversation as chat messages (None when its turns do not alternate); `<image>` turns
    go before the next question, inline `<image>` tags become `<|image|>` in place."""
    out: list[tuple[str, str]] = []
    if conv.system and conv.system != SYSTEM_PROMPT:   # mPLUG-Owl's default: Owl3 has none
        out.append(("system", conv.system))
    pending = 0
    for role, text in conv.turns:
        if role == "human" and text == RECORD_IMAGE:
            pending += 1
            continue
        if (role == "human") != (sum(r == "user" for r, _ in out) ==
                                 sum(r == "assistant" for r, _ in out)):
            return None
        if role == "human":
            body = text.replace(RECORD_IMAGE, IMAGE)
            if pending:
                body, pending = IMAGE * pending + "\n" + body, 0
            out.append(("user", body))
        else:
            out.append(("assistant", text))
    if pending:
        return None
    return out


def conversation(tok, conv, seq_len: int, image_tokens: int, template: str = ""):
    """An instruction record (`owl_jax.data.conversation.Conversation`) in the chat template;
    only the assistant turns (with their <|im_end|> and <|endoftext|>) train."""
    if template not in ("", "owl3_chat"):
        raise ValueError(f"mPLUG-Owl3 conversations use its chat template, not {template!r}")
    msgs = messages_of(conv)
    if msgs is None:
        return None, "bad_turn_order"
    if sum(c.count(IMAGE) for r, c in msgs if r == "user") != len(conv.images) or any(
            IMAGE in c for r, c in msgs if r != "user"):
        return None, "image_count_mismatch"
    if not any(r == "assistant" and c.strip() for r, c in msgs):
        return None, "empty_text"
    return sample_of(tok, chat_chunks(msgs), seq_len)


def pixels(img, cfg, augment: bool, rng=None):
    """uint8 [S, S, 3]: the processor's bicubic square resize (`cut_enable=False`: one view per
    image; mPLUG-Owl3 does not augment). Normalization ((x - 0.5) / 0.5) runs on the device."""
    return images.resize_square(img, cfg.vision.image_size)
