"""Stage-2 instruction data: LLaVA-Instruct, Alpaca, ShareGPT/Vicuna, Baize and the official
mPLUG-Owl jsonl, all read into one `Conversation` and written out in the official text form:

    {system}\\nHuman: <image>\\nHuman: {q1}\\nAI: {a1}\\nHuman: {q2}\\nAI: {a2}

(one `Human: <image>` line per image, right after the system line, as the official data has it).
A record that cannot be used is skipped with a reason and counted, never an exception:
`reader = InstructionReader('llava'); convs = list(reader(records)); reader.skipped`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator

from owl_jax.tokenizer import IMAGE_TOKEN

# The official mPLUG-Owl text form every format is read into (`Conversation.text`).
SYSTEM_PROMPT = ("The following is a conversation between a curious human and AI assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
HUMAN = "Human: "
AI = "AI: "

log = logging.getLogger(__name__)

FORMATS = ("llava", "sharegpt", "alpaca", "baize", "owl", "interleave")
# Default official `task_type` per source (the suffix after the last `_` selects the processor).
TASK_TYPES = {"llava": "llava_sft", "sharegpt": "sharegpt_chat_sft",
              "alpaca": "gpt4instruct_sft", "baize": "quora_chat_sft", "owl": "sft",
              "interleave": "interleave_sft"}
VIDEO_TOKEN = "<video>"
MAX_FRAMES = 16  # frames kept per video (mPLUG-Owl3's README loader)

_HUMAN_ROLES = {"human", "user"}
_AI_ROLES = {"gpt", "assistant", "ai", "chatgpt", "bard", "bing", "model"}
_TURN_SPLIT = re.compile(r"\n(Human|AI): ")
_BAIZE_SPLIT = re.compile(r"\[\|(Human|AI)\|\]")


class BadRecord(ValueError):
    """A record that cannot become a training conversation; `reason` is a short count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Conversation:
    """turns: (role, text) with role 'human' or 'ai'; an image is the human turn '<image>'.
    images: the record's image references (file names / paths), in order of their turns."""
    turns: tuple[tuple[str, str], ...]
    images: tuple[str, ...] = ()
    system: str = SYSTEM_PROMPT
    task_type: str = ""

    def text(self) -> str:
        """The official training text."""
        return self.system + "".join(
            "\n" + (HUMAN if role == "human" else AI) + text for role, text in self.turns)

    def to_official(self) -> dict[str, Any]:
        """A record of the official jsonl (`{"image": [...], "text": ..., "task_type": ...}`)."""
        return {"image": list(self.images), "text": self.text(), "task_type": self.task_type}


# -------------------------------------------------------------------------------------------
# Shared checks


def _require(rec: Any, *keys: str) -> dict:
    if not isinstance(rec, dict):
        raise BadRecord("not_a_dict", type(rec).__name__)
    missing = [k for k in keys if k not in rec]
    if missing:
        raise BadRecord("missing_field", ",".join(missing))
    return rec


def _string(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise BadRecord("bad_type", f"{what} is {type(v).__name__}, not str")
    return v


def _images_of(rec: dict) -> tuple[str, ...]:
    imgs = rec.get("image")
    if imgs is None or imgs == "" or imgs == []:
        return ()
    if isinstance(imgs, str):
        return (imgs,)
    if isinstance(imgs, (list, tuple)) and all(isinstance(i, str) and i for i in imgs):
        return tuple(imgs)
    raise BadRecord("bad_type", "image must be a file name or a list of them")


def _finish(turns: list[tuple[str, str]], images: tuple[str, ...], system: str,
            task_type: str, inline: bool = False) -> Conversation:
    """Drops a trailing unanswered human turn, checks alternation, answers and images.
    inline: `<image>` tags may stand inside human turns (interleaved records)."""
    while turns and turns[-1][0] == "human" and turns[-1][1] != IMAGE_TOKEN:
        turns.pop()  # nothing to train on after the last answer
    dialog = [t for t in turns if t != ("human", IMAGE_TOKEN)]
    if not any(role == "ai" for role, _ in dialog):
        raise BadRecord("no_response")
    for i, (role, text) in enumerate(dialog):
        if role != ("human" if i % 2 == 0 else "ai"):
            raise BadRecord("not_alternating", f"turn {i} is {role}")
        if not text.strip():
            raise BadRecord("empty_turn", f"turn {i}")
        if IMAGE_TOKEN in text and not (inline and role == "human"):
            raise BadRecord("image_count_mismatch", f"{IMAGE_TOKEN} inside turn {i}")
    n_tags = (sum(t.count(IMAGE_TOKEN) for _, t in turns) if inline else
              sum(1 for t in turns if t == ("human", IMAGE_TOKEN)))
    if n_tags != len(images):
        raise BadRecord("image_count_mismatch", f"{n_tags} {IMAGE_TOKEN} for {len(images)} images")
    return Conversation(tuple(turns), images, system, task_type)


def _role(v: Any) -> str:
    r = str(v).strip().lower()
    if r in _HUMAN_ROLES:
        return "human"
    if r in _AI_ROLES:
        return "ai"
    raise BadRecord("bad_role", repr(v))


def _messages_of(rec: dict) -> Any:
    if "conversations" in rec:
        return rec["conversations"]
    if "messages" in rec:
        return rec["messages"]
    raise BadRecord("missing_field", "conversations")


def _message_turns(msgs: Any) -> list[tuple[str, str]]:
    """[{from, value}] (LLaVA / ShareGPT) or [{role, content}] (OpenAI style) -> turns."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("missing_field", "conversations is empty or not a list")
    turns = []
    for m in msgs:
        if not isinstance(m, dict):
            raise BadRecord("bad_type", "a turn is not a dict")
        role = m.get("from", m.get("role"))
        value = m.get("value", m.get("content"))
        if role is None or value is None:
            raise BadRecord("missing_field", "turn needs from/value (or role/content)")
        turns.append((role, _string(value, "turn value")))
    # FastChat drops leading turns that are not the human's (system prompts, a greeting).
    while turns and str(turns[0][0]).strip().lower() not in _HUMAN_ROLES:
        turns.pop(0)
    return [(_role(r), v) for r, v in turns]


# -------------------------------------------------------------------------------------------
# Parsers: record -> Conversation (or BadRecord)


def parse_llava(rec: Any, task_type: str = TASK_TYPES["llava"]) -> Conversation:
    """LLaVA-Instruct: `<image>` may sit at either end of the first human turn; like LLaVA's
    own preprocessing we strip it there and put the image first, as its own `Human: <image>`
    line (the official mPLUG-Owl layout)."""
    images = _images_of(_require(rec))
    turns = _message_turns(_messages_of(rec))
    n_tags = sum(t.count(IMAGE_TOKEN) for _, t in turns)
    if n_tags != len(images):
        raise BadRecord("image_count_mismatch", f"{n_tags} {IMAGE_TOKEN} for {len(images)} images")
    if images:
        role, text = turns[0]
        if role != "human" or IMAGE_TOKEN not in text:
            raise BadRecord("image_count_mismatch", f"{IMAGE_TOKEN} not in the first human turn")
        turns[0] = ("human", text.replace(IMAGE_TOKEN, "").strip())
        turns = [("human", IMAGE_TOKEN)] * len(images) + turns
    return _finish(turns, images, SYSTEM_PROMPT, task_type)


def parse_sharegpt(rec: Any, task_type: str = TASK_TYPES["sharegpt"]) -> Conversation:
    """ShareGPT / Vicuna (FastChat): text only; roles human/gpt (also user/assistant)."""
    turns = _message_turns(_messages_of(_require(rec)))
    if any(IMAGE_TOKEN in t for _, t in turns):
        raise BadRecord("image_count_mismatch", f"{IMAGE_TOKEN} in a text-only record")
    return _finish(turns, (), SYSTEM_PROMPT, task_type)


def parse_alpaca(rec: Any, task_type: str = TASK_TYPES["alpaca"]) -> Conversation:
    """Alpaca: instruction (+ "\\n" + input when non-empty) -> one Human turn; output -> AI."""
    rec = _require(rec, "instruction", "output")
    instruction = _string(rec["instruction"], "instruction").strip()
    extra = _string(rec.get("input") or "", "input").strip()
    output = _string(rec["output"], "output").strip()
    question = f"{instruction}\n{extra}" if extra else instruction
    return _finish([("human", question), ("ai", output)], (), SYSTEM_PROMPT, task_type)


def parse_baize(rec: Any, task_type: str = TASK_TYPES["baize"]) -> Conversation:
    """Baize: `input` = "The conversation between human and AI assistant.\\n[|Human|] q\\n[|AI|] a
    ...\\n[|Human|] " . Baize's own header is replaced by the official system line; the empty
    trailing Human turn (an artefact of Baize's data) is dropped."""
    rec = _require(rec, "input")
    parts = _BAIZE_SPLIT.split(_string(rec["input"], "input"))
    if len(parts) < 3:
        raise BadRecord("no_response", "no [|Human|]/[|AI|] markers")
    turns = [("human" if role == "Human" else "ai", text.strip())
             for role, text in zip(parts[1::2], parts[2::2])]
    return _finish(turns, (), SYSTEM_PROMPT, task_type)


def parse_owl(rec: Any, task_type: str | None = None) -> Conversation:
    """The official jsonl record. Its text is kept byte for byte (`text()` gives it back)."""
    rec = _require(rec, "text")
    text = _string(rec["text"], "text")
    images = _images_of(rec)
    parts = _TURN_SPLIT.split(text)
    turns = [("human" if role == "Human" else "ai", t) for role, t in zip(parts[1::2], parts[2::2])]
    if not any(role == "ai" for role, _ in turns):
        raise BadRecord("no_response")
    n_tags = text.count(IMAGE_TOKEN)
    if n_tags != len(images):
        raise BadRecord("image_count_mismatch", f"{n_tags} {IMAGE_TOKEN} for {len(images)} images")
    tt = rec.get("task_type") if task_type is None else task_type
    return Conversation(tuple(turns), images, parts[0], str(tt or TASK_TYPES["owl"]))


def sample_frames(frames: list, max_frames: int = MAX_FRAMES) -> list:
    """At most max_frames of a video's frames, uniformly: frame int(i * gap + gap / 2) with
    gap = n / max_frames (mPLUG-Owl3's README loader)."""
    n = len(frames)
    if n <= max_frames:
        return list(frames)
    gap = n / max_frames
    return [frames[int(i * gap + gap / 2)] for i in range(max_frames)]


def parse_interleave(rec: Any, task_type: str = TASK_TYPES["interleave"]) -> Conversation:
    """Multi-image, interleaved and video records (LLaVA-Interleave, Mantis, MMDU,
    video-instruction data) in LLaVA's keys: `image` a list, its `<image>` tags kept where they
    stand in any human turn (the text between images matters to a model that reads where each
    image sits). `video`: a list of frame files; its `<video>` tag becomes one `<image>` per
    frame (at most MAX_FRAMES, `sample_frames`). A record holds images or a video."""
    images = _images_of(_require(rec))
    turns = _message_turns(_messages_of(rec))
    video = rec.get("video")
    if video is not None:
        if not isinstance(video, (list, tuple)) or not video or not all(
                isinstance(f, str) and f for f in video):
            raise BadRecord("bad_type", "video must be a list of frame files")
        if images:
            raise BadRecord("image_count_mismatch", "a record with both images and a video")
        n_video = sum(t.count(VIDEO_TOKEN) for _, t in turns)
        if n_video != 1:
            raise BadRecord("image_count_mismatch", f"{n_video} {VIDEO_TOKEN} for one video")
        images = tuple(sample_frames(list(video)))
        turns = [(r, t.replace(VIDEO_TOKEN, IMAGE_TOKEN * len(images))) for r, t in turns]
    return _finish(turns, images, SYSTEM_PROMPT, task_type, inline=True)


PARSERS = {"llava": parse_llava, "sharegpt": parse_sharegpt, "alpaca": parse_alpaca,
           "baize": parse_baize, "owl": parse_owl, "interleave": parse_interleave}


def detect_format(rec: Any) -> str:
    """Guesses the format of one record from its keys."""
    if isinstance(rec, dict):
        if "conversations" in rec or "messages" in rec:
            return "llava" if rec.get("image") else "sharegpt"
        if "instruction" in rec and "output" in rec:
            return "alpaca"
        if "input" in rec and "[|Human|]" in str(rec.get("input")):
            return "baize"
        if "text" in rec:
            return "owl"
    raise BadRecord("unknown_format", f"keys {sorted(rec)[:8] if isinstance(rec, dict) else rec!r}")


# -------------------------------------------------------------------------------------------
# Reading files and counting what was skipped


def read_records(path: str) -> Iterator[Any]:
    """Records of a .json file (a list) or a .jsonl file (one per line). An unparsable jsonl
    line yields a `BadRecord('bad_json')` in its place, so it gets counted, not raised."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instruction data file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[" and not path.endswith(".jsonl"):
            data = json.load(f)
            yield from data
            return
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord("bad_json", f"{path} line {i + 1}: {e}")


class InstructionReader:
    """Turns records of one format (or 'auto') into Conversations, counting the skipped ones.

    `skipped` is a Counter of reasons, `kept` the number of conversations yielded. The first
    `log_first` skips of each reason are logged with the record's position.
    """

    def __init__(self, fmt: str = "auto", task_type: str | None = None,
                 image_root: str | None = None, log_first: int = 3):
        if fmt != "auto" and fmt not in PARSERS:
            raise ValueError(f"unknown instruction format {fmt!r}; known: {FORMATS} or 'auto'")
        self.fmt = fmt
        self.task_type = task_type
        self.image_root = image_root
        self.log_first = log_first
        self.skipped: collections.Counter = collections.Counter()
        self.kept = 0

    def parse(self, rec: Any, where: str = "") -> Conversation | None:
        try:
            if isinstance(rec, BadRecord):
                raise rec
            fmt = detect_format(rec) if self.fmt == "auto" else self.fmt
            parser = PARSERS[fmt]
            conv = parser(rec) if self.task_type is None else parser(rec, self.task_type)
        except BadRecord as e:
            self.skipped[e.reason] += 1
            if self.skipped[e.reason] <= self.log_first:
                log.warning("skipping instruction record %s: %s", where, e)
            return None
        if self.image_root:
            conv = dataclasses.replace(conv, images=tuple(
                os.path.join(self.image_root, i) for i in conv.images))
        self.kept += 1
        return conv

    def __call__(self, records: Iterable[Any], where: str = "record") -> Iterator[Conversation]:
        for i, rec in enumerate(records):
            conv = self.parse(rec, f"{where} #{i}")
            if conv is not None:
                yield conv

    def read(self, path: str) -> Iterator[Conversation]:
        return self(read_records(path), where=path)

    def summary(self) -> dict[str, Any]:
        return {"kept": self.kept, "skipped": dict(self.skipped)}


def write_official_jsonl(convs: Iterable[Conversation], path: str) -> int:
    """Writes conversations as the official mPLUG-Owl jsonl; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c.to_official(), ensure_ascii=False) + "\n")
            n += 1
    return n
