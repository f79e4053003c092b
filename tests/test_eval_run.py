"""The eval loop end to end with a fake generator: records -> prompts (with the right images) ->
answers -> metrics -> files. The fake reads each image's colour, so a prompt paired with the
wrong image shows up as a wrong answer. Answers come out in input order, OwlEval fields as they
came in, and `owl-eval --raw_dir` rebuilds when the raw files changed."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import owl_jax
from owl_jax.cli import eval as eval_cli
from owl_jax.eval import metrics, run, tfds_builders as tb
from owl_jax.families.owl1.template import build_prompt

COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 30, 230), "white": (250, 250, 250)}


class Result:
    def __init__(self, text):
        self.text = text


class FakeGenerator:
    """Captions / answers from the dominant colour of the first image and the question."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def color(img):
        mean = np.asarray(img, np.float32).reshape(-1, 3).mean(0)
        return min(COLORS, key=lambda c: np.abs(mean - COLORS[c]).sum())

    def generate(self, prompts, images, max_new_tokens=32, temperature=0.0, num_beams=1):
        assert len(prompts) == len(images)
        self.calls.append((list(prompts), max_new_tokens, temperature, num_beams))
        out = []
        for p, imgs in zip(prompts, images):
            assert p.count("<image>") == len(imgs)
            c = self.color(imgs[0])
            if "caption" in p:
                out.append(Result(f" a {c if c != 'white' else 'black'} square\nextra line"))
            elif "What color" in p:
                out.append(Result(c))
            elif "How many" in p:
                out.append(Result("One."))
            else:
                out.append(Result(f" answer {p.count(chr(10) + 'AI: ')} about {c} "))
        return out


def _jpeg(path, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (32, 32), COLORS[color]).save(path, "JPEG", quality=95)


def _coco(raw, cocoids=(100, 101, 102, 103)):
    images = []
    for i, cocoid in enumerate(cocoids):
        c = list(COLORS)[i % len(COLORS)]
        name = f"COCO_val2014_{i:012d}.jpg"
        _jpeg(os.path.join(raw, "val2014", name), c)
        images.append({"filepath": "val2014", "filename": name, "imgid": i, "split": "test",
                       "cocoid": cocoid, "sentences": [{"raw": f"A {c} square."},
                                                        {"raw": f"a square that is {c}"}]})
    with open(os.path.join(raw, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)


def test_coco_caption_loop(tmp_path):
    raw, data_dir = str(tmp_path / "coco"), str(tmp_path / "tfds")
    _coco(raw)
    tb.prepare("coco_caption", raw, data_dir)
    fake = FakeGenerator()
    result = run.evaluate(fake, "coco_caption", tb.load("coco_caption", "test", data_dir),
                          batch_size=3, progress=False)
    # 4 images in batches of 3: the last call is padded to 3 prompts, its padding dropped.
    assert [len(c[0]) for c in fake.calls] == [3, 3]
    assert fake.calls[0][0][0] == build_prompt(run.CocoCaption.prompt, 1)
    assert fake.calls[0][1:] == (30, 0.0, 1)
    hyps = {100: "a red square", 101: "a green square", 102: "a blue square", 103: "a black square"}
    refs = {100 + i: [f"A {c} square.", f"a square that is {c}"]
            for i, c in enumerate(["red", "green", "blue", "white"])}
    assert {r["image_id"]: r["caption"] for r in result.rows} == hyps
    want = metrics.caption_metrics(refs, hyps)
    assert {k: result.metrics[k] for k in want} == pytest.approx(want)
    assert 0 < want["CIDEr"] < 10    # the wrong "black" caption costs something

    paths = run.write_results(result, str(tmp_path / "out"))
    preds = json.load(open(paths["predictions"]))
    assert sorted(preds, key=lambda p: p["image_id"]) == [
        {"image_id": k, "caption": v} for k, v in sorted(hyps.items())]
    assert json.load(open(paths["metrics"]))["CIDEr"] == pytest.approx(want["CIDEr"])


def _vqa(raw, images=((1, "red"), (2, "blue"))):
    qs, anns = [], []
    for image_id, c in images:
        _jpeg(os.path.join(raw, "val2014", f"COCO_val2014_{image_id:012d}.jpg"), c)
        for k, (q, answers, atype) in enumerate([("What color is it?", [c] * 10, "other"),
                                                 ("How many squares?", ["1"] * 2 + ["2"] * 8, "number")]):
            qid = 10 * image_id + k
            qs.append({"image_id": image_id, "question": q, "question_id": qid})
            anns.append({"question_id": qid, "image_id": image_id, "answer_type": atype,
                         "question_type": q.split()[0].lower(), "multiple_choice_answer": answers[-1],
                         "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
    json.dump({"questions": qs}, open(os.path.join(raw, "v2_OpenEnded_mscoco_val2014_questions.json"), "w"))
    json.dump({"annotations": anns}, open(os.path.join(raw, "v2_mscoco_val2014_annotations.json"), "w"))


def test_vqav2_loop(tmp_path):
    raw, data_dir = str(tmp_path / "vqa"), str(tmp_path / "tfds")
    _vqa(raw)
    tb.prepare("vqav2", raw, data_dir)
    result = run.evaluate(FakeGenerator(), "vqav2", tb.load("vqav2", "val", data_dir),
                          batch_size=3, progress=False)
    # Colour questions answered right (1.0); "One." -> "1" matches 2 of 10 humans:
    # leaving out a "1" (2 ways) -> 1/3, leaving out a "2" (8 ways) -> 2/3 -> 0.6.
    acc = {r["question_id"]: r["accuracy"] for r in result.rows}
    assert acc == pytest.approx({10: 1.0, 11: 0.6, 20: 1.0, 21: 0.6})
    assert result.metrics["accuracy"] == pytest.approx(80.0)
    assert result.metrics["per_answer_type"] == {"number": 60.0, "other": 100.0}
    assert sorted(result.predictions, key=lambda p: p["question_id"]) == [
        {"question_id": 10, "answer": "red"}, {"question_id": 11, "answer": "One."},
        {"question_id": 20, "answer": "blue"}, {"question_id": 21, "answer": "One."}]


def _write_questions(raw, lines):
    with open(os.path.join(raw, "questions.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")


def _owleval(raw):
    _jpeg(os.path.join(raw, "cases", "1.jpg"), "green")
    _jpeg(os.path.join(raw, "cases", "2.jpg"), "blue")
    lines = [{"image": "1.jpg", "question_id": 1, "question": "What is this?", "ability": "a",
              "category": ["single_turn", "multi_turn"]},
             {"image": "1.jpg", "question_id": 2, "question": "Why?", "ability": "a,e",
              "category": ["multi_turn"]},
             {"image": "2.jpg", "question_id": 3, "question": "Write a poem.", "ability": "d",
              "category": ["single_turn"]}]
    _write_questions(raw, lines)
    return lines


def test_owleval_multi_turn_and_cli(tmp_path, monkeypatch):
    raw, data_dir, out = str(tmp_path / "owleval"), str(tmp_path / "tfds"), str(tmp_path / "out")
    _owleval(raw)
    fake = FakeGenerator()
    monkeypatch.setattr(owl_jax, "load_pretrained", lambda path: fake, raising=False)
    # Not prepared yet and no --raw_dir: a clear error, exit code 2.
    assert eval_cli.main(["--ckpt", "ckpts/my-owl", "--task", "owleval", "--data_dir", data_dir,
                          "--out", out]) == 2
    assert eval_cli.main(["--ckpt", "ckpts/my-owl", "--task", "owleval", "--data_dir", data_dir,
                          "--raw_dir", raw, "--out", out, "--batch_size", "4",
                          "--max_new_tokens", "64"]) == 0
    # Turn 1 of both conversations in one call, then the follow-up after the model's own answer.
    (first, *_), (second, *_) = fake.calls
    assert first[:2] == [build_prompt("What is this?", 1), build_prompt("Write a poem.", 1)]
    assert second[0] == build_prompt(["What is this?", "answer 1 about green", "Why?"], 1)
    rows = [json.loads(line) for line in open(os.path.join(out, "answers.jsonl"))]
    assert {r["question_id"]: r["answer"] for r in rows} == {
        1: "answer 1 about green", 3: "answer 1 about blue", 2: "answer 2 about green"}
    assert all(r["model_id"] == "my-owl" and r["rating"] is None for r in rows)
    assert rows[0]["image"] == "1.jpg" and rows[0]["category"] == ["single_turn", "multi_turn"]
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["num_answers"] == 3 and m["generation"]["max_new_tokens"] == 64
    assert not os.path.exists(os.path.join(out, "predictions.json"))


def _cli(tmp_path, *flags):
    return eval_cli.main(["--ckpt", "ckpts/my-owl", "--task", "owleval",
                          "--data_dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "out"),
                          *flags])


def _answers(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]


def test_cli_rebuilds_when_raw_files_change(tmp_path, monkeypatch, capsys):
    raw = str(tmp_path / "owleval")
    lines = _owleval(raw)
    fake = FakeGenerator()
    monkeypatch.setattr(owl_jax, "load_pretrained", lambda path: fake, raising=False)
    assert _cli(tmp_path, "--raw_dir", raw) == 0
    out = capsys.readouterr().out
    assert "Preparing owl_eval_instructions from local files in " + raw in out
    assert "Downloading and preparing" not in out
    lines[2]["question"] = "Write a song."
    _write_questions(raw, lines)
    fake.calls.clear()
    assert _cli(tmp_path, "--raw_dir", raw) == 0
    assert ("owl_eval_instructions: raw files changed since the cached build (questions.jsonl): "
            "rebuilding") in capsys.readouterr().out
    assert build_prompt("Write a song.", 1) in fake.calls[0][0]
    assert [r["question"] for r in _answers(tmp_path)] == ["What is this?", "Why?", "Write a song."]
    # Unchanged raw files: the build is used as it is, and the run says so.
    assert _cli(tmp_path, "--raw_dir", raw) == 0
    assert "raw files in " + raw + " unchanged" in capsys.readouterr().out
    # A wrong --raw_dir: a clear error, exit code 2, the build left alone.
    assert _cli(tmp_path, "--raw_dir", raw + "-typo") == 2
    assert "raw dir " + raw + "-typo is not a directory" in capsys.readouterr().err
    assert _cli(tmp_path) == 0


def test_answers_follow_question_order(tmp_path, monkeypatch):
    # 24 single-turn questions, question_ids neither in file order nor in tfds's order.
    raw = str(tmp_path / "owleval")
    for c in ("red", "green", "blue"):
        _jpeg(os.path.join(raw, "cases", f"{c}.jpg"), c)
    qids = [(7 * i) % 24 + 1 for i in range(24)]
    _write_questions(raw, [{"image": f"{list(COLORS)[q % 3]}.jpg", "question_id": q,
                            "question": f"Question {q}?", "category": ["single_turn"]}
                           for q in qids])
    monkeypatch.setattr(owl_jax, "load_pretrained", lambda path: FakeGenerator(), raising=False)
    assert _cli(tmp_path, "--raw_dir", raw, "--batch_size", "5") == 0
    stored = [int(r["question_id"]) for r in tb.load("owleval", "test", str(tmp_path / "tfds"))]
    assert stored != qids and qids != sorted(qids)      # the check below can fail
    rows = _answers(tmp_path)
    assert [r["question_id"] for r in rows] == qids
    assert all(r["question"] == f"Question {r['question_id']}?" for r in rows)


def test_vqa_and_coco_answers_in_input_order(tmp_path):
    # VQA: questions of 8 images listed image by image, images not in id order.
    raw, data_dir = str(tmp_path / "vqa"), str(tmp_path / "tfds")
    image_ids = [5, 2, 8, 1, 7, 3, 6, 4]
    _vqa(raw, [(i, list(COLORS)[i % 3]) for i in image_ids])
    tb.prepare("vqav2", raw, data_dir)
    source = tb.load("vqav2", "val", data_dir)
    assert [int(r["image/id"]) for r in source] != image_ids
    result = run.evaluate(FakeGenerator(), "vqav2", source, batch_size=3, progress=False)
    want = [10 * i + k for i in image_ids for k in (0, 1)]
    assert [r["question_id"] for r in result.rows] == want
    assert [p["question_id"] for p in result.predictions] == want
    paths = run.write_results(result, str(tmp_path / "out"))
    assert [json.loads(line)["question_id"] for line in open(paths["answers"])] == want
    # COCO: 12 images, cocoids not in file order.
    raw = str(tmp_path / "coco")
    cocoids = [(5 * i) % 12 + 100 for i in range(12)]
    _coco(raw, cocoids)
    tb.prepare("coco_caption", raw, data_dir)
    source = tb.load("coco_caption", "test", data_dir)
    assert [int(r["image/id"]) for r in source] != cocoids
    result = run.evaluate(FakeGenerator(), "coco_caption", source, batch_size=5, progress=False)
    assert [p["image_id"] for p in result.predictions] == cocoids


def test_owleval_category_and_ability_as_given(tmp_path):
    raw, data_dir = str(tmp_path / "owleval"), str(tmp_path / "tfds")
    _jpeg(os.path.join(raw, "cases", "1.jpg"), "green")
    _jpeg(os.path.join(raw, "cases", "2.jpg"), "blue")
    lines = [{"image": "1.jpg", "question_id": 1, "question": "What?", "ability": ["a", "b"],
              "category": ["single_turn", "multi_turn"]},
             {"image": "1.jpg", "question_id": 2, "question": "Why?", "ability": "a,e",
              "category": "abc"},
             {"image": "2.jpg", "question_id": 3, "question": "Who?", "category": ["x"]},
             {"image": "2.jpg", "question_id": 4, "question": "Where?"}]
    _write_questions(raw, lines)
    tb.prepare("owleval", raw, data_dir)
    fake = FakeGenerator()
    result = run.evaluate(fake, "owleval", tb.load("owleval", "test", data_dir), progress=False)
    assert [(r["ability"], r["category"]) for r in result.rows] == [
        (["a", "b"], ["single_turn", "multi_turn"]), ("a,e", "abc"), (None, ["x"]), (None, None)]
    # A one-string category is a category name: "abc" (no single_turn) makes question 2 a
    # follow-up of question 1 on the same image.
    assert build_prompt(["What?", "answer 1 about green", "Why?"], 1) in fake.calls[1][0]
