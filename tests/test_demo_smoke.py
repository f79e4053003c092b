"""`make demo`'s code path, in seconds: `python -m owl_jax.demo --quick` (a few steps per stage).

Checks what the full demo relies on, not its accuracy: the data really is in img2dataset /
official formats, the held-out split shares no image with the training split, every stage
writes an export the next one starts from, the converted model answers exactly as the trained
one, and the last line has the promised form.
"""
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from owl_jax.demo import run, scoring, shapes


def test_shapes_are_deterministic_and_splits_disjoint():
    a, b = shapes.sample(7, 3), shapes.sample(7, 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    train = {np.asarray(shapes.sample(run.TRAIN_SEED, i).image).tobytes() for i in range(300)}
    held = {np.asarray(shapes.sample(run.HELDOUT_SEED, i).image).tobytes() for i in range(300)}
    assert len(train) == 300 and len(held) == 300 and not train & held
    # The caption names the drawn colour and shape, and the pixels agree on the colour.
    for i in range(40):
        s = shapes.sample(run.HELDOUT_SEED, i)
        assert scoring.words_in(s.caption, scoring.COLOUR_WORDS) == {s.colour}
        assert scoring.words_in(s.caption, scoring.SHAPE_WORDS) == {s.shape}
        px = np.asarray(s.image, np.float32).reshape(-1, 3)
        bg = np.asarray(shapes.BACKGROUNDS[s.background], np.float32)
        fg = px[np.abs(px - bg).sum(1) > 90].mean(0)  # pixels far from the background
        nearest = min(shapes.COLOURS, key=lambda c: np.abs(fg - shapes.COLOURS[c]).sum())
        assert nearest == s.colour, (i, s.colour, fg)


def test_scoring_rule():
    assert scoring.words_in("The shape is Red.", scoring.COLOUR_WORDS) == {"red"}
    assert scoring.words_in("It is a star.", scoring.SHAPE_WORDS) == {"star"}
    assert scoring.words_in("a starred redhead", scoring.COLOUR_WORDS + scoring.SHAPE_WORDS) == set()
    images = [({"colour": "red", "shape": "star"}, b""), ({"colour": "blue", "shape": "circle"}, b"")]
    res = scoring.score(images, {"colour": ["red.", "It is red or blue."],
                             "shape": ["It is a star.", "A circle."],
                             "caption": ["a red star on gray", "a blue square"]})
    assert res["colour"] == 0.5 and res["shape"] == 1.0 and res["both"] == 0.5
    assert res["caption"] == 0.5 and res["correct"] == [True, False]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "owl_jax.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"demo accuracy: \d+\.\d% on 8 held-out images", lines[-1]), lines[-1]
    assert "round trip: 24/24 answers identical" in proc.stdout
    # stage 1 froze the LLM: every param owl-train counted as frozen came out bit-identical
    frozen = re.search(r"left the ([\d,]+) LLM params bit-identical", proc.stdout)
    assert frozen and int(frozen[1].replace(",", "")) > 0, proc.stdout[-3000:]
    assert f"; frozen {frozen[1]}\n" in proc.stdout
    for k in range(1, 9):
        assert f"[{k}/8]" in proc.stdout

    # img2dataset webdataset layout: {key}.jpg/.txt/.json per sample, parquet + stats sidecars
    shard = out / "data" / "shapes_train" / "00000.tar"
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        first = names[0].split(".")[0]
        assert names[:3] == [f"{first}.jpg", f"{first}.txt", f"{first}.json"]
        assert len(first) == 9 and first.isdigit()
        meta = json.loads(tar.extractfile(f"{first}.json").read())
        txt = tar.extractfile(f"{first}.txt").read().decode()
        img = Image.open(io.BytesIO(tar.extractfile(f"{first}.jpg").read()))
    assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])
    assert meta["caption"] == txt and meta["status"] == "success" and meta["key"] == first
    assert (out / "data" / "shapes_train" / "00000.parquet").exists()
    stats = json.loads((out / "data" / "shapes_train" / "00000_stats.json").read_text())
    assert stats["successes"] == stats["count"] == len(names) // 3

    # official instruction jsonl, images beside it
    recs = [json.loads(x) for x in (out / "data" / "instruct" / "instructions.jsonl").open()]
    assert recs and all(r["task_type"] == "llava_sft" for r in recs)
    assert recs[0]["text"].startswith(shapes.SYSTEM_PROMPT + "\nHuman: <image>\nHuman: ")
    assert (out / "data" / "instruct" / recs[0]["image"][0]).exists()

    # every stage exported; stage 2 keeps LoRA unmerged, the round trip has it merged
    for stage in ("warmup", "stage1", "stage2"):
        assert (out / "runs" / stage / "export" / "config.json").exists()
    assert json.loads((out / "runs" / "stage2" / "export" / "owl_jax.json").read_text())["lora"]
    assert json.loads((out / "roundtrip" / "owl_jax.json").read_text())["lora"] is None
    assert (out / "torch" / "pytorch_model.bin").exists()
