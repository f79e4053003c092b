"""`make demo`'s code path, in seconds: `python -m owl_jax.demo --quick [--family llava]` (a few
steps per stage), for every family the demo trains.

Checks what the full demo relies on, not its accuracy: the data really is in img2dataset /
official (mPLUG-Owl jsonl, LLaVA json) formats, the held-out split shares no image with the
training split, every stage writes an export the next one starts from and changes only what it
trains, the converted model answers exactly as the trained one, and the last line has the
promised form.
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


def test_family_table_and_recipes():
    """Every family of the demo has its model and three chained owl-train stages; the Owl
    demo's recipe spells no family (its command lines stay as they were)."""
    from owl_jax import families
    from owl_jax.configs import demo_shapes
    from owl_jax.demo import family as demo_family
    assert demo_family.names() == ["owl1", "llava", "minigpt4"]
    tokens = {"owl1": 9, "llava": 16, "minigpt4": 8}
    for name in demo_family.names():
        cfg = run.demo_model_config(640, name)
        assert families.of_config(cfg).name == name and cfg.image_tokens == tokens[name]
        assert cfg.vision.image_size == 32 and cfg.text.hidden_size == 128
        prev = None
        for stage in run.STAGES:
            arg = run.stage_arg(name, stage, "/tmp/d")
            assert arg.startswith(f"family={name},") == (name != "owl1")
            c = demo_shapes.get_config(arg)
            assert c.model.family == name
            assert c.init_from == (f"{prev}/export" if prev else "/tmp/d/init")
            prev = f"/tmp/d/runs/{stage}"
    llava = run.demo_model_config(640, "llava")
    assert llava.image_token_index == 640 and llava.text.vocab_size == 641
    # LLaVA's text warm-up is its vicuna_v1 template, ending where the text task adds EOS
    text = demo_family.get("llava").inference_text([("What is red?", "A red circle.")])
    assert text.endswith(" USER: What is red? ASSISTANT: A red circle.")
    # MiniGPT-4's: its chat template, each answer closed by "###"
    text = demo_family.get("minigpt4").inference_text([("What is red?", "A red circle.")])
    assert text.endswith(".###Human: What is red?###Assistant: A red circle.###")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["owl1", "llava", "minigpt4"])
def test_quick_demo_end_to_end(tmp_path, family):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "owl_jax.demo", "--quick", "--family", family,
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"demo accuracy: \d+\.\d% on 8 held-out images", lines[-1]), lines[-1]
    assert "round trip: 24/24 answers identical" in proc.stdout
    # stage 1 froze the LLM: every param owl-train counted as frozen came out bit-identical
    frozen = re.search(r"stage 1 changed [\d,]+ \S+ params and left the ([\d,]+) LLM params "
                       r"bit-identical", proc.stdout)
    assert frozen and int(frozen[1].replace(",", "")) > 0, proc.stdout[-3000:]
    assert f"; frozen {frozen[1]}\n" in proc.stdout
    # stage 2 left bit-identical what it does not train (Owl: all but LoRA; LLaVA: the ViT)
    kept = re.search(r"stage 2 changed [\d,]+ (\S+) params and left the ([\d,]+) (\S+) params",
                     proc.stdout)
    assert kept and f"; frozen {kept[2]}\n" in proc.stdout, proc.stdout[-3000:]
    assert (kept[1], kept[3]) == {"owl1": ("LoRA", "abstractor/LLM/queries/ViT"),
                                  "llava": ("LLM/projector", "ViT"),
                                  "minigpt4": ("LLM/llama_proj", "ViT/Q-Former")}[family]
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

    instruct = out / "data" / "instruct"
    if family == "owl1":
        # official instruction jsonl, images beside it
        recs = [json.loads(x) for x in (instruct / "instructions.jsonl").open()]
        assert recs and all(r["task_type"] == "llava_sft" for r in recs)
        assert recs[0]["text"].startswith(shapes.SYSTEM_PROMPT + "\nHuman: <image>\nHuman: ")
        assert (instruct / recs[0]["image"][0]).exists()
        text = [json.loads(x) for x in (out / "data" / "text" / "conversations.jsonl").open()]
        assert text and "image" not in text[0] and "\nAI: " in text[0]["text"]
    else:
        # LLaVA's json: `conversations` human / gpt, "<image>\n" first; text-only records
        recs = json.loads((instruct / "instructions.json").read_text())
        assert recs and (instruct / recs[0]["image"]).exists()
        conv = recs[0]["conversations"]
        assert [t["from"] for t in conv[:2]] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n")
        text = json.loads((out / "data" / "text" / "conversations.json").read_text())
        assert text and "image" not in text[0] and text[0]["conversations"][1]["from"] == "gpt"

    # every stage exported; Owl's stage 2 keeps LoRA unmerged, the round trip has it merged;
    # LLaVA's stage 2 trains the LLM itself
    for stage in ("warmup", "stage1", "stage2"):
        assert (out / "runs" / stage / "export" / "config.json").exists()
    stage2 = json.loads((out / "runs" / "stage2" / "export" / "owl_jax.json").read_text())
    assert stage2["family"] == family and bool(stage2["lora"]) == (family == "owl1")
    assert json.loads((out / "roundtrip" / "owl_jax.json").read_text())["lora"] is None
    if family == "owl1":
        assert (out / "torch" / "pytorch_model.bin").exists()
    elif family == "minigpt4":  # MiniGPT-4's release layout
        assert {"eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "pretrained_minigpt4.pth",
                "vicuna"} <= set(os.listdir(out / "torch"))
    else:
        assert (out / "torch" / "model.safetensors").exists()
        assert json.loads((out / "torch" / "config.json").read_text())["model_type"] == "llava"
