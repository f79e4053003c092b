"""A synthetic "coloured shapes" dataset, written in the formats real training data comes in.

Every image shows one shape (circle, square, triangle, star) in one of six colours on a plain
white, black or gray background, at a random size, position and small rotation, with some
colour jitter and pixel noise. `sample(seed, index)` is a pure function of its arguments, so a
split is just a seed: the train and held-out splits use different seeds and never share an
image (tests check the pixels).

Writers:
- `write_webdataset`: img2dataset `--output_format webdataset` shards: `{shard:05d}.tar` with
  `{key}.jpg`, `{key}.txt`, `{key}.json` per sample (keys `shard * 10**oom + row`, zero padded),
  plus the `{shard:05d}.parquet` sidecar and `{shard:05d}_stats.json`, as img2dataset writes them.
- `write_instructions`: an instruction set in mPLUG-Owl's own jsonl format (`image`, `text`,
  `task_type`) with the images saved next to it, or in LLaVA's json format.
- `write_text_conversations`: the text-only warm-up conversations (`text_turns`) in either
  format.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tarfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {  # name -> base RGB; jittered per image
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 20),
    "purple": (140, 40, 190),
    "orange": (250, 135, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
# Shape radius (fraction of the image), rotation (degrees, +-), pixel noise (std, 0-255), and how
# far the centre moves (fraction of the room it has). Large, mostly central shapes: a ViT
# trained from scratch learns translation invariance slowly (measured: a 2-layer ViT + abstractor
# classifies held-out shapes 99% right after 800 steps with SHIFT 0.3, 96% with 0.5, 85% with 1.0).
RADIUS, ROTATION, NOISE, SHIFT = (0.25, 0.42), 20.0, 6.0, 0.4
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}

SYSTEM_PROMPT = ("The following is a conversation between a curious human and AI assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")

# The two questions the demo is scored on, and the caption prompt.
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is this?"
CAPTION_PROMPT = "Describe the image."

COLOUR_QUESTIONS = (COLOUR_QUESTION, "What color is the shape?", "Which colour is it?",
                    "What is the colour of the shape?")
SHAPE_QUESTIONS = (SHAPE_QUESTION, "What shape is shown?", "Which shape is in the picture?",
                   "What kind of shape is this?")
CAPTION_PROMPTS = (CAPTION_PROMPT, "What is in the picture?", "Describe this picture.")

_CAPTION_TEMPLATES = (  # {a} is the article that goes before the colour word
    "{a} {c} {s} on a {b} background",
    "{a} {c} {s} on a {b} background",
    "a picture of {a} {c} {s} on a {b} background",
    "{a} {c} {s} in front of a {b} background",
    "an image of {a} {c} {s} on {b}",
)


@dataclass(frozen=True)
class ShapeSample:
    index: int
    colour: str
    shape: str
    background: str
    caption: str
    image: Image.Image  # RGB, size x size


def caption_for(colour: str, shape: str, background: str, variant: int = 0) -> str:
    text = _CAPTION_TEMPLATES[variant % len(_CAPTION_TEMPLATES)]
    return text.format(a=_article(colour), c=colour, s=shape, b=background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def colour_answer(colour: str, variant: int = 0) -> str:
    return ("The shape is {}.", "It is {}.", "{}.")[variant % 3].format(colour).capitalize()


def shape_answer(shape: str, variant: int = 0) -> str:
    return ("It is {} {}.", "This is {} {}.", "{} {}.")[variant % 3].format(
        _article(shape), shape).capitalize()


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2) * r * 1.0,
                math.sin(angle + math.pi / 4 + k * math.pi / 2) * r * 1.0) for k in range(4)]
    elif shape == "triangle":
        pts = [(math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3) * r * 1.1,
                math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3) * r * 1.1) for k in range(3)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r * (1.1 if k % 2 == 0 else 0.45)
            a = angle - math.pi / 2 + k * math.pi / 5
            pts.append((math.cos(a) * rad, math.sin(a) * rad))
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [(cx + x, cy + y) for x, y in pts]


def _jitter(rgb, rng: random.Random, amount: int) -> tuple:
    return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in rgb)


def sample(seed: int, index: int, size: int = 64) -> ShapeSample:
    """The image and labels of sample `index` of the split `seed` (deterministic)."""
    rng = random.Random(f"shapes/{seed}/{index}")
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    background = rng.choice(sorted(BACKGROUNDS))
    scale = 4  # draw large and downsample: anti-aliased edges
    big = size * scale
    img = Image.new("RGB", (big, big), _jitter(BACKGROUNDS[background], rng, 10))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(*RADIUS) * big
    room = big / 2 - r * 1.1  # how far the centre may move before the shape leaves the image
    cx = big / 2 + rng.uniform(-1, 1) * room * SHIFT
    cy = big / 2 + rng.uniform(-1, 1) * room * SHIFT
    fill = _jitter(COLOURS[colour], rng, 18)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        angle = math.radians(rng.uniform(-ROTATION, ROTATION))
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    img = img.resize((size, size), Image.BILINEAR)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, NOISE, (size, size, 3))
    arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    caption = caption_for(colour, shape, background, rng.randrange(len(_CAPTION_TEMPLATES)))
    return ShapeSample(index, colour, shape, background, caption, Image.fromarray(arr))


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# img2dataset webdataset shards


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(out_dir: str, seed: int, n: int, per_shard: int = 1000, size: int = 64,
                     progress=None) -> list[str]:
    """Writes n samples of split `seed` as img2dataset webdataset shards. Returns tar paths.

    `progress(k)` is called after each sample (for a tqdm bar).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    oom_sps = max(1, math.ceil(math.log10(per_shard)))
    oom_shards = 5
    paths = []
    for shard in range((n + per_shard - 1) // per_shard):
        start = time.time()
        rows = []
        path = os.path.join(out_dir, f"{shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for row in range(min(per_shard, n - shard * per_shard)):
                s = sample(seed, shard * per_shard + row, size)
                key = str(shard * 10 ** oom_sps + row).zfill(oom_shards + oom_sps)
                jpg = jpeg_bytes(s.image)
                # colour / shape / background ride along as img2dataset's
                # `save_additional_columns` would carry them (input columns come first).
                meta = {"url": f"synthetic://shapes/{seed}/{s.index}.jpg", "caption": s.caption,
                        "colour": s.colour, "shape": s.shape, "background": s.background,
                        "key": key, "status": "success", "error_message": None,
                        "width": size, "height": size, "original_width": size,
                        "original_height": size, "exif": "{}",
                        "sha256": hashlib.sha256(jpg).hexdigest()}
                rows.append(meta)
                _add(tar, f"{key}.jpg", jpg, start)
                _add(tar, f"{key}.txt", s.caption.encode(), start)
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode(), start)
                if progress:
                    progress(1)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, f"{shard:05d}.parquet"))
        end = time.time()
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0,
                 "failed_to_resize": 0, "duration": end - start, "start_time": start,
                 "end_time": end, "status_dict": {"success": len(rows)}}
        with open(os.path.join(out_dir, f"{shard:05d}_stats.json"), "w") as f:
            json.dump(stats, f, indent=4)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Instruction data


def conversation(s: ShapeSample, rng: random.Random) -> list[tuple[str, str]]:
    """One to three (question, answer) turns about the sample, in random order."""
    turns = [(rng.choice(COLOUR_QUESTIONS), colour_answer(s.colour, rng.randrange(3))),
             (rng.choice(SHAPE_QUESTIONS), shape_answer(s.shape, rng.randrange(3))),
             (rng.choice(CAPTION_PROMPTS), caption_for(s.colour, s.shape, s.background,
                                                      rng.randrange(5)).capitalize() + ".")]
    rng.shuffle(turns)
    return turns[:rng.choice((1, 2, 2, 3))]


def owl_text(turns: list[tuple[str, str]], with_image: bool = True) -> str:
    """The official training text: system line, `Human: <image>`, then the turns."""
    parts = [SYSTEM_PROMPT] + (["Human: <image>"] if with_image else [])
    for q, a in turns:
        parts += [f"Human: {q}", f"AI: {a}"]
    return "\n".join(parts)


def write_instructions(out_dir: str, seed: int, n: int, fmt: str = "owl", size: int = 64,
                       progress=None) -> str:
    """Writes n instruction records (images under out_dir/images/). Returns the file path.

    fmt="owl": mPLUG-Owl jsonl `{"image": ["images/x.jpg"], "text": ..., "task_type":
    "llava_sft"}`; fmt="llava": LLaVA json list with `conversations`. Image paths are relative
    to out_dir.
    """
    if fmt not in ("owl", "llava"):
        raise ValueError(f"instruction format must be 'owl' or 'llava', got {fmt!r}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(f"instructions/{seed}")
    records = []
    for i in range(n):
        s = sample(seed, i, size)
        rel = f"images/{seed}_{i:06d}.jpg"
        with open(os.path.join(out_dir, rel), "wb") as f:
            f.write(jpeg_bytes(s.image))
        turns = conversation(s, rng)
        if fmt == "owl":
            records.append({"image": [rel], "text": owl_text(turns), "task_type": "llava_sft"})
        else:
            conv = []
            for k, (q, a) in enumerate(turns):
                conv.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
                conv.append({"from": "gpt", "value": a})
            records.append({"id": f"{seed}_{i:06d}", "image": rel, "conversations": conv})
        if progress:
            progress(1)
    if fmt == "owl":
        path = os.path.join(out_dir, "instructions.jsonl")
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    else:
        path = os.path.join(out_dir, "instructions.json")
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
    return path


def text_turns(seed: int, n: int) -> list[list[tuple[str, str]]]:
    """Text-only (question, answer) exchanges, one per conversation: the LLM warm-up data.

    The question is about a shape the human describes in words, so the LLM learns the
    template, the answer phrasing and the colour/shape vocabulary before it ever sees an image.
    Each family renders them with its own template (`text_corpus`: mPLUG-Owl's).
    """
    rng = random.Random(f"text/{seed}")
    out = []
    for _ in range(n):
        c, s, b = rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(sorted(BACKGROUNDS))
        desc = caption_for(c, s, b, rng.randrange(5))
        kind = rng.randrange(3)
        if kind == 0:
            q, a = f"I see {desc}. {rng.choice(COLOUR_QUESTIONS)}", colour_answer(c, rng.randrange(3))
        elif kind == 1:
            q, a = f"I see {desc}. {rng.choice(SHAPE_QUESTIONS)}", shape_answer(s, rng.randrange(3))
        else:
            q, a = f"Write a caption for {c} {s} on {b}.", desc.capitalize() + "."
        out.append([(q, a)])
    return out


def text_corpus(seed: int, n: int) -> list[str]:
    """`text_turns` in the official mPLUG-Owl template (no image)."""
    return [owl_text(turns, with_image=False) for turns in text_turns(seed, n)]


def write_text_conversations(path: str, convs: list[list[tuple[str, str]]],
                             fmt: str = "owl") -> str:
    """Text-only conversations (no image) as an instruction file: fmt="owl": the official jsonl
    (`text`, `task_type` "quora_chat_sft"); fmt="llava": a LLaVA json list of records with
    `conversations` and no `image` (as the text-only records of LLaVA-1.5's mix665k)."""
    if fmt not in ("owl", "llava"):
        raise ValueError(f"instruction format must be 'owl' or 'llava', got {fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        if fmt == "owl":
            for turns in convs:
                f.write(json.dumps({"text": owl_text(turns, with_image=False),
                                    "task_type": "quora_chat_sft"}) + "\n")
        else:
            json.dump([{"id": f"text_{i:06d}", "conversations": [
                {"from": who, "value": v} for q, a in turns
                for who, v in (("human", q), ("gpt", a))]} for i, turns in enumerate(convs)],
                f, indent=1)
    return path
