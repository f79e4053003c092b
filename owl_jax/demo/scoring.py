"""Steps 7-8 of the demo: answers for the held-out images, and their score.

Scoring rule: an answer is right when the set of colour words it contains (red, green, blue,
yellow, purple, orange; whole words, any case) is exactly {the true colour} for the colour
question, and likewise the set of shape words (circle, square, triangle, star) for the shape
question. An image counts as correct when BOTH its answers are right. Captions are scored the
same way on both word sets and reported on a separate line.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile

from owl_jax.demo import shapes

COLOUR_WORDS = tuple(sorted(shapes.COLOURS))
SHAPE_WORDS = shapes.SHAPES


def words_in(text: str, vocab) -> set[str]:
    low = text.lower()
    return {w for w in vocab if re.search(rf"\b{w}\b", low)}


def heldout_images(shard_dir: str) -> list[tuple[dict, bytes]]:
    """(metadata json, jpg bytes) of every held-out sample, read back from its shards."""
    out = []
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".tar"):
            continue
        parts: dict[str, dict[str, bytes]] = {}
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                parts.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(parts):
            out.append((json.loads(parts[key]["json"]), parts[key]["jpg"]))
    return out


def answer_all(pipe, images, max_new_tokens: int = 16) -> dict[str, list[str]]:
    """Greedy answers of the three prompts for every image (one batched call per prompt)."""
    from PIL import Image
    from tqdm import tqdm

    pil = [Image.open(io.BytesIO(jpg)).convert("RGB") for _, jpg in images]
    out = {}
    prompts = {"colour": shapes.COLOUR_QUESTION, "shape": shapes.SHAPE_QUESTION,
               "caption": shapes.CAPTION_PROMPT}
    for name, q in tqdm(prompts.items(), desc="  generating", unit="prompt", leave=False):
        gens = pipe.generate([pipe.family.build_prompt(q)] * len(pil), [[im] for im in pil],
                             max_new_tokens=max_new_tokens, temperature=0.0)
        out[name] = [g.text.strip() for g in gens]
    return out


def score(images, answers) -> dict:
    truths = [truth(meta) for meta, _ in images]
    col = [words_in(a, COLOUR_WORDS) == {c} for a, (c, _) in zip(answers["colour"], truths)]
    shp = [words_in(a, SHAPE_WORDS) == {s} for a, (_, s) in zip(answers["shape"], truths)]
    cap = [words_in(a, COLOUR_WORDS) == {c} and words_in(a, SHAPE_WORDS) == {s}
           for a, (c, s) in zip(answers["caption"], truths)]
    both = [a and b for a, b in zip(col, shp)]
    n = max(len(truths), 1)
    return dict(n=len(truths), colour=sum(col) / n, shape=sum(shp) / n, caption=sum(cap) / n,
                both=sum(both) / n, correct=both)


def truth(meta: dict) -> tuple[str, str]:
    """(colour, shape) of a held-out sample, from its shard `.json`."""
    return meta["colour"], meta["shape"]
