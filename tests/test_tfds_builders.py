"""The eval TFDS builders build ArrayRecord datasets from tiny local folders, without TensorFlow,
and read back through `tfds.data_source` and a grain MapDataset; `prepare` says what it does and
rebuilds when the raw files changed."""
import json
import os
import time

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from owl_jax.data.images import open_image
from owl_jax.eval import raw_files, tfds_builders as tb
from owl_jax.testing.shards import encode, natural_image, write_coco


def _jpeg(path, seed, size=(40, 32)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(natural_image(np.random.default_rng(seed), *size), "JPEG", quality=90))


def _skipped(builder):
    with open(os.path.join(builder.data_dir, "metadata.json")) as f:
        return json.load(f)["skipped"]


def test_coco_karpathy_eval_splits(tmp_path):
    raw, data_dir = str(tmp_path / "coco"), str(tmp_path / "tfds")
    # 8 images cycling train/restval/val/test; image 0 (train) is missing on disk.
    manifest = write_coco(raw, n_images=8, captions_per_image=3, karpathy=True)
    kimages = json.load(open(manifest["annotations"]))["images"]
    # Corrupt one val image: it must be skipped and counted, not crash the build.
    bad = next(im for im in kimages if im["split"] == "val")
    with open(os.path.join(raw, bad["filepath"], bad["filename"]), "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")

    b = tb.prepare("coco_caption", raw, data_dir)
    assert _skipped(b) == {"undecodable_image": 1}

    for split in ("val", "test"):
        ds = tfds.data_source("owl_coco_karpathy/eval", split=split, data_dir=data_dir)
        want = {im["cocoid"]: im for im in kimages if im["split"] == split and im is not bad}
        assert len(ds) == len(want)
        items = list(grain.MapDataset.source(ds).map(
            lambda r: (int(r["image/id"]), [c.decode() for c in r["captions"]], open_image(r["image"]))))
        for cocoid, captions, img in items:
            assert captions == [s["raw"] for s in want[cocoid]["sentences"]]
            with open(os.path.join(raw, "train2014", want[cocoid]["filename"]), "rb") as f:
                assert img.size == open_image(f.read()).size
        assert sorted(i[0] for i in items) == sorted(want)
    with pytest.raises(Exception):
        tfds.data_source("owl_coco_karpathy/eval", split="train", data_dir=data_dir)


def _vqa_folder(root):
    qs = [{"image_id": 1, "question": "What color is it?", "question_id": 10},
          {"image_id": 1, "question": "How many dogs?", "question_id": 11},
          {"image_id": 2, "question": "Is it sunny?", "question_id": 20},
          {"image_id": 3, "question": "Where is this?", "question_id": 30},   # image missing
          {"image_id": 2, "question": "Odd annotation?", "question_id": 21}]  # 9 answers
    anns = [{"question_id": 10, "image_id": 1, "answers": [{"answer": "red", "answer_id": i + 1} for i in range(10)],
             "answer_type": "other", "question_type": "what color is the", "multiple_choice_answer": "red"},
            {"question_id": 11, "image_id": 1, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 4 + ["3"] * 6)],
             "answer_type": "number", "question_type": "how many", "multiple_choice_answer": "3"},
            {"question_id": 20, "image_id": 2, "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)],
             "answer_type": "yes/no", "question_type": "is it", "multiple_choice_answer": "yes"},
            {"question_id": 30, "image_id": 3, "answers": [{"answer": "park", "answer_id": i + 1} for i in range(10)],
             "answer_type": "other", "question_type": "where is", "multiple_choice_answer": "park"},
            {"question_id": 21, "image_id": 2, "answers": [{"answer": "no", "answer_id": i + 1} for i in range(9)],
             "answer_type": "yes/no", "question_type": "is it", "multiple_choice_answer": "no"}]
    os.makedirs(root, exist_ok=True)
    json.dump({"questions": qs}, open(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), "w"))
    json.dump({"annotations": anns}, open(os.path.join(root, "v2_mscoco_val2014_annotations.json"), "w"))
    json.dump({"questions": [{"image_id": 7, "question": "What is this?", "question_id": 70}]},
              open(os.path.join(root, "v2_OpenEnded_mscoco_test-dev2015_questions.json"), "w"))
    for image_id, folder in ((1, "val2014"), (2, "val2014"), (7, "test2015")):
        _jpeg(os.path.join(root, folder, f"COCO_{folder}_{image_id:012d}.jpg"), image_id)


def test_vqav2_grouped_by_image(tmp_path):
    raw, data_dir = str(tmp_path / "vqa"), str(tmp_path / "tfds")
    _vqa_folder(raw)
    b = tb.prepare("vqav2", raw, data_dir)
    assert set(b.info.splits) == {"val", "testdev"}     # no test2015 question file
    assert _skipped(b) == {"missing_image": 1, "bad_annotation": 1}

    val = tb.load("vqav2", "val", data_dir)
    recs = {int(r["image/id"]): r for r in grain.MapDataset.source(val)}
    assert sorted(recs) == [1, 2]
    q1 = recs[1]["questions"]
    assert [int(x) for x in q1["question_id"]] == [10, 11]
    assert [int(x) for x in q1["index"]] == [0, 1]      # positions in the question file
    assert [x.decode() for x in q1["question"]] == ["What color is it?", "How many dogs?"]
    assert [a.decode() for a in q1["answers"][1]] == ["2"] * 4 + ["3"] * 6
    assert [x.decode() for x in q1["answer_type"]] == ["other", "number"]
    assert [int(x) for x in recs[2]["questions"]["question_id"]] == [20]
    open_image(recs[1]["image"])

    test = tb.load("vqav2", "testdev", data_dir)
    assert len(test) == 1 and [a.decode() for a in test[0]["questions"]["answers"][0]] == [""] * 10


def test_owleval_instructions(tmp_path):
    raw, data_dir = tmp_path / "owleval", str(tmp_path / "tfds")
    for i in (1, 2, 3):
        _jpeg(str(raw / "cases" / f"{i}.jpg"), i)
    lines = [{"image": "1.jpg", "question_id": 1, "question": "What is funny?", "ability": "a,b",
              "category": ["single_turn", "multi_turn"]},
             {"image": "1.jpg", "question_id": 2, "question": "Why?", "category": ["multi_turn"]},
             {"image": ["2.jpg", "3.jpg"], "question_id": 3, "instruction": "Compare them."},
             {"image": "404.jpg", "question_id": 4, "question": "Missing image?"}]
    (raw / "questions.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines[:2]) + "\n{not json\n"
        + "\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    b = tb.prepare("owleval", str(raw), data_dir)
    assert _skipped(b) == {"bad_record": 1, "missing_image": 1}

    ds = tfds.data_source("owl_eval_instructions", split="test", data_dir=data_dir)
    recs = {int(r["question_id"]): r for r in grain.MapDataset.source(ds)}
    assert sorted(recs) == [1, 2, 3]
    assert recs[3]["question"].decode() == "Compare them."
    assert [n.decode() for n in recs[3]["image/filenames"]] == ["2.jpg", "3.jpg"]
    assert [open_image(b).size for b in recs[3]["images"]] == [(40, 32), (40, 32)]
    assert json.loads(recs[2]["category"]) == ["multi_turn"]
    assert json.loads(recs[1]["ability"]) == "a,b" and json.loads(recs[3]["ability"]) is None
    assert [int(recs[q]["index"]) for q in (1, 2, 3)] == [0, 1, 3]    # line 2 is the bad one


def test_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("nothing here")
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        tb.prepare("coco_caption", str(tmp_path / "empty"), str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="raw dir .*/nowhere is not a directory"):
        tb.prepare("coco_caption", str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="unknown task"):
        tb.tfds_name("gqa")


def _owleval_folder(raw, questions=("What is funny?", "Why?")):
    for i in (1, 2):
        _jpeg(str(raw / "cases" / f"{i}.jpg"), i)
    (raw / "questions.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.jpg", "question_id": i, "question": q}) + "\n"
        for i, q in enumerate(questions, 1)))


def _questions(data_dir):
    return sorted(r["question"].decode() for r in tb.load("owleval", "test", data_dir))


def test_prepare_says_what_it_does(tmp_path, capsys):
    raw, data_dir = tmp_path / "owleval", str(tmp_path / "tfds")
    _owleval_folder(raw)
    b = tb.prepare("owleval", str(raw), data_dir)
    out = capsys.readouterr().out
    # Nothing is downloaded: our own line instead of tfds's "Downloading and preparing dataset".
    assert f"Preparing owl_eval_instructions from local files in {raw} -> {b.data_dir}\n" in out
    assert f"owl_eval_instructions: built test 2 records in {b.data_dir}\n" in out
    assert "Download" not in out and "download" not in out
    tb.prepare("owleval", str(raw), data_dir)
    assert capsys.readouterr().out == (f"owl_eval_instructions: raw files in {raw} unchanged: "
                                       f"using the build in {b.data_dir}\n")


def test_rebuilds_when_raw_files_change(tmp_path, capsys):
    raw, data_dir = tmp_path / "owleval", str(tmp_path / "tfds")
    _owleval_folder(raw)
    tb.prepare("owleval", str(raw), data_dir)
    # Same size, same mtime, new contents: rebuilt.
    qfile = raw / "questions.jsonl"
    st = os.stat(qfile)
    qfile.write_text(qfile.read_text().replace("funny", "sunny"))
    os.utime(qfile, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(qfile).st_size == st.st_size
    capsys.readouterr()
    tb.prepare("owleval", str(raw), data_dir)
    out = capsys.readouterr().out
    assert "owl_eval_instructions: raw files changed since the cached build (questions.jsonl): " \
           "rebuilding\n" in out and "Preparing owl_eval_instructions" in out
    assert _questions(data_dir) == ["What is sunny?", "Why?"]
    # A new mtime on the same contents is no change.
    os.utime(raw / "cases" / "1.jpg")
    tb.prepare("owleval", str(raw), data_dir)
    assert "unchanged" in capsys.readouterr().out
    # A question whose image was missing (skipped) comes in once the image appears.
    with open(qfile, "a") as f:
        f.write(json.dumps({"image": "3.jpg", "question_id": 3, "question": "And this?"}) + "\n")
    tb.prepare("owleval", str(raw), data_dir)
    assert _questions(data_dir) == ["What is sunny?", "Why?"]
    _jpeg(str(raw / "cases" / "3.jpg"), 3)
    tb.prepare("owleval", str(raw), data_dir)
    assert "raw files changed since the cached build (cases/3.jpg)" in capsys.readouterr().out
    assert _questions(data_dir) == ["And this?", "What is sunny?", "Why?"]


def test_unchanged_files_are_not_reread(tmp_path, monkeypatch, capsys):
    # Files older than RACY_NS get their stat recorded; with the margin at 0 these fresh ones do.
    monkeypatch.setattr(raw_files, "RACY_NS", 0)
    hashed = []
    hash_file = raw_files.hash_file
    monkeypatch.setattr(raw_files, "hash_file", lambda p: hashed.append(p) or hash_file(p))
    raw, data_dir = tmp_path / "owleval", str(tmp_path / "tfds")
    _owleval_folder(raw)
    tb.prepare("owleval", str(raw), data_dir)
    tb.prepare("owleval", str(raw), data_dir)
    assert hashed == [] and "unchanged" in capsys.readouterr().out
    # A write keeping size and mtime still moves ctime, so the file is hashed and the change seen
    # (the pause: file-system clocks can be as coarse as a few ms).
    time.sleep(0.05)
    qfile = raw / "questions.jsonl"
    st = os.stat(qfile)
    qfile.write_text(qfile.read_text().replace("Why?", "How?"))
    os.utime(qfile, ns=(st.st_atime_ns, st.st_mtime_ns))
    tb.prepare("owleval", str(raw), data_dir)
    assert hashed == [str(qfile)] and "rebuilding" in capsys.readouterr().out
    assert _questions(data_dir) == ["How?", "What is funny?"]
