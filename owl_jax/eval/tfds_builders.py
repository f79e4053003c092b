"""TFDS builders for the evaluation sets, built from local files into ArrayRecord, no TensorFlow.

    from owl_jax.eval import tfds_builders as tb
    tb.prepare("coco_caption", raw_dir="/data/coco", data_dir="/data/tfds")    # once
    ds = tb.load("coco_caption", "test", data_dir="/data/tfds")               # random access
    grain.MapDataset.source(ds)[0]   # {'image': b'\\xff\\xd8...', 'captions': [b'...'], ...}

Builders (the tfds name is what `tfds.data_source(name, ...)` takes):
  - `owl_coco_karpathy` (task coco_caption): Karpathy `dataset_coco.json` + COCO 2014 images.
    Configs `eval` (splits val, test; the default) and `full` (train, restval, val, test).
    One record per image: image, image/id (cocoid), image/filename, captions.
  - `owl_vqav2` (task vqav2): `v2_OpenEnded_mscoco_<sub>_questions.json`, the matching
    `v2_mscoco_<sub>_annotations.json` where one exists, and the COCO images. Configs `eval`
    (val, testdev, test: whichever question files are present) and `full` (+ train). One record
    per IMAGE with its questions (the images are stored once, not once per question); the ten
    human answers are a fixed [10] string tensor, all '' on unannotated splits.
  - `owl_eval_instructions` (task owleval): an OwlEval-style `questions.jsonl`
    ({"image": "1.jpg" or [...], "question_id", "question" or "instruction", ...}) + an image
    folder (`cases/`, `images/` or the directory itself). One record per question, split test.

Why no `tfds.features.Image`: encoding or decoding it needs TensorFlow. Images are stored as the
original encoded bytes in a scalar object Tensor feature, which tfds serialises and reads back
without TF (strings come back as `bytes`); decode them with `owl_jax.data.images.open_image`.
Every image is fully decoded once at build time; missing or corrupt images, and malformed
annotations, are skipped, counted in the dataset's `metadata.json` ("skipped": {reason: n}) and
logged with the file they came from.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from owl_jax.data.images import BadImage, open_image
from owl_jax.data.sources_coco import load_entries
from owl_jax.data.spec import Spec

log = logging.getLogger(__name__)

IMAGE_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)   # encoded image, any format
VQA_NUM_ANSWERS = 10
_MAX_LOGGED_SKIPS = 20


@dataclasses.dataclass
class SplitsConfig(tfds.core.BuilderConfig):
    splits: tuple[str, ...] = ()


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ArrayRecord by default; counts and logs what it skips; reads `dl_manager.manual_dir`."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        self._skipped = collections.Counter()
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds looks for checksum / metadata files next to the builder's source file; resolving
        # that path for a module inside a package needs the `importlib_resources` backport even
        # on Python >= 3.9 (tfds 4.9.10). These builders have no such files.
        return None

    def _skip(self, reason: str, where: str, detail: str = ""):
        self._skipped[reason] += 1
        if sum(self._skipped.values()) <= _MAX_LOGGED_SKIPS:
            log.warning("%s: skipped %s (%s)", self.name, where, reason + (f": {detail}" if detail else ""))

    def _read_image(self, path: str, where: str) -> bytes | None:
        """The file's bytes when it decodes as an image, else None (skipped and counted)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._skip("missing_image", where, str(e))
            return None
        try:
            open_image(data)
        except BadImage as e:
            self._skip(e.reason, where, e.detail)
            return None
        return data

    def _download_and_prepare(self, dl_manager, download_config=None):
        self._skipped.clear()
        super()._download_and_prepare(dl_manager, download_config)
        self.info.metadata["skipped"] = dict(self._skipped)
        if self._skipped:
            log.warning("%s: skipped %s", self.name, dict(self._skipped))

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=...) directly: `dataset_info_from_configs` would look for metadata
        # files next to this module.
        return tfds.core.DatasetInfo(builder=self, features=self._features(),
                                     description=self.__doc__, metadata=tfds.core.MetadataDict())


# ------------------------------------------------------------------------------------------
# COCO captions, Karpathy split
# ------------------------------------------------------------------------------------------

class OwlCocoKarpathy(_LocalFilesBuilder):
    """COCO captions on the Karpathy split, one record per image."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put `dataset_coco.json` (Karpathy splits) in the manual dir, with the COCO 2014 images "
        "at <manual_dir>/<filepath>/<filename> (train2014/, val2014/) or <manual_dir>/<filename>.")
    BUILDER_CONFIGS = [SplitsConfig(name="eval", splits=("val", "test")),
                       SplitsConfig(name="full", splits=("train", "restval", "val", "test"))]

    def _features(self):
        return tfds.features.FeaturesDict({
            "image": IMAGE_BYTES, "image/id": np.int64, "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text())})

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        ann = os.path.join(root, "dataset_coco.json")
        if not os.path.exists(ann):
            raise FileNotFoundError(f"{self.name}: no {ann}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        by_split = collections.defaultdict(list)
        spec = Spec("coco", ann, (("images", root), ("per", "image"),
                                  ("split", ",".join(self.builder_config.splits))))
        for entry in load_entries(spec):
            by_split[entry[3]["split"]].append(entry)
        if not by_split:
            raise ValueError(f"{self.name}: {ann} has no images in splits "
                             f"{self.builder_config.splits}")
        # A split with no entries is left out (tfds refuses to write an empty one).
        return {s: self._generate_examples(by_split[s]) for s in self.builder_config.splits
                if by_split[s]}

    def _generate_examples(self, entries):
        for key, path, _, meta in entries:
            where = f"{path} (cocoid {key})"
            captions = [c for c in meta["captions"] if c]
            if not captions:
                self._skip("missing_caption", where)
                continue
            data = self._read_image(path, where)
            if data is not None:
                yield key, {"image": data, "image/id": int(meta["image_id"]),
                            "image/filename": meta["file_name"], "captions": captions}


# ------------------------------------------------------------------------------------------
# VQAv2
# ------------------------------------------------------------------------------------------

# tfds split -> (file infix of the question / annotation json, COCO image folder)
VQA_SPLITS = {"train": ("train2014", "train2014"), "val": ("val2014", "val2014"),
              "testdev": ("test-dev2015", "test2015"), "test": ("test2015", "test2015")}


class OwlVqav2(_LocalFilesBuilder):
    """VQAv2, one record per image holding all of its questions."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put v2_OpenEnded_mscoco_<sub>_questions.json (+ v2_mscoco_<sub>_annotations.json for "
        "train2014 / val2014) in the manual dir, sub in train2014, val2014, test-dev2015, "
        "test2015, and the COCO images at <manual_dir>/<folder>/COCO_<folder>_<id:012d>.jpg "
        "(folders train2014, val2014, test2015).")
    BUILDER_CONFIGS = [SplitsConfig(name="eval", splits=("val", "testdev", "test")),
                       SplitsConfig(name="full", splits=("train", "val", "testdev", "test"))]

    def _features(self):
        return tfds.features.FeaturesDict({
            "image": IMAGE_BYTES, "image/id": np.int64, "image/filename": tfds.features.Text(),
            "questions": tfds.features.Sequence({
                "question_id": np.int64, "question": tfds.features.Text(),
                "answers": tfds.features.Tensor(shape=(VQA_NUM_ANSWERS,), dtype=np.object_),
                "answer_type": tfds.features.Text(), "question_type": tfds.features.Text(),
                "multiple_choice_answer": tfds.features.Text()})})

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        out = {}
        for split in self.builder_config.splits:
            sub, folder = VQA_SPLITS[split]
            qfile = os.path.join(root, f"v2_OpenEnded_mscoco_{sub}_questions.json")
            if os.path.exists(qfile):
                afile = os.path.join(root, f"v2_mscoco_{sub}_annotations.json")
                out[split] = self._generate_examples(
                    qfile, afile if os.path.exists(afile) else None, os.path.join(root, folder), folder)
        if not out:
            raise FileNotFoundError(f"{self.name}: no question file for splits "
                                    f"{self.builder_config.splits} in {root}. "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return out

    def _generate_examples(self, qfile, afile, image_dir, folder):
        questions = _read_json(qfile)["questions"]
        answers = {a["question_id"]: a for a in _read_json(afile)["annotations"]} if afile else None
        by_image = collections.defaultdict(list)
        for q in questions:
            qid = q.get("question_id")
            ann = {} if answers is None else answers.get(qid)
            if ann is None:
                self._skip("missing_annotation", f"{qfile} question_id {qid}")
                continue
            human = ([a.get("answer", "") for a in ann.get("answers", [])] if answers is not None
                     else [""] * VQA_NUM_ANSWERS)
            if len(human) != VQA_NUM_ANSWERS:
                self._skip("bad_annotation", f"{afile} question_id {qid}",
                           f"{len(human)} answers, expected {VQA_NUM_ANSWERS}")
                continue
            by_image[q["image_id"]].append({
                "question_id": qid, "question": q["question"], "answers": np.array(human, object),
                "answer_type": ann.get("answer_type", ""), "question_type": ann.get("question_type", ""),
                "multiple_choice_answer": ann.get("multiple_choice_answer", "")})
        for image_id, qs in sorted(by_image.items()):
            name = f"COCO_{folder}_{image_id:012d}.jpg"
            path = os.path.join(image_dir, name)
            data = self._read_image(path, f"{path} (image_id {image_id}, {len(qs)} questions)")
            if data is None:
                continue
            yield image_id, {"image": data, "image/id": image_id, "image/filename": name,
                             "questions": sorted(qs, key=lambda q: q["question_id"])}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


# ------------------------------------------------------------------------------------------
# OwlEval-style instruction list
# ------------------------------------------------------------------------------------------

class OwlEvalInstructions(_LocalFilesBuilder):
    """Open-ended instructions over images (OwlEval), answered by the model for human rating."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put questions.jsonl (one {\"image\": name or [names], \"question_id\": int, "
        "\"question\" (or \"instruction\"): str} per line) in the manual dir, with the images in "
        "<manual_dir>/cases/, <manual_dir>/images/ or the manual dir itself (OwlEval layout).")

    def _features(self):
        return tfds.features.FeaturesDict({
            "question_id": np.int64, "question": tfds.features.Text(),
            "images": tfds.features.Sequence(IMAGE_BYTES),
            "image/filenames": tfds.features.Sequence(tfds.features.Text()),
            "ability": tfds.features.Text(), "category": tfds.features.Sequence(tfds.features.Text())})

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        qfile = os.path.join(root, "questions.jsonl")
        if not os.path.exists(qfile):
            found = sorted(f for f in os.listdir(root) if f.endswith(".jsonl"))
            if len(found) != 1:
                raise FileNotFoundError(f"{self.name}: no questions.jsonl in {root} (and "
                                        f"{len(found)} other .jsonl files: {found[:5]})")
            qfile = os.path.join(root, found[0])
        image_dirs = [d for d in (os.path.join(root, "cases"), os.path.join(root, "images"), root)
                      if os.path.isdir(d)]
        return {"test": self._generate_examples(qfile, image_dirs)}

    def _generate_examples(self, qfile, image_dirs):
        with open(qfile, encoding="utf-8") as f:
            lines = f.readlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{qfile}:{lineno}"
            try:
                rec = json.loads(line)
                question = rec.get("question", rec.get("instruction"))
                names = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self._skip("bad_record", where, f"{type(e).__name__}: {e}")
                continue
            if not isinstance(question, str) or not question.strip():
                self._skip("missing_question", where)
                continue
            images = []
            for name in names:
                path = next((os.path.join(d, name) for d in image_dirs
                             if os.path.exists(os.path.join(d, name))), os.path.join(image_dirs[0], name))
                images.append(self._read_image(path, f"{path} ({where})"))
            if any(im is None for im in images):
                continue
            category = rec.get("category", rec.get("type", []))
            qid = int(rec.get("question_id", lineno))
            yield qid, {"question_id": qid, "question": question, "images": images,
                        "image/filenames": [str(n) for n in names],
                        "ability": str(rec.get("ability", "")),
                        "category": [str(c) for c in (category if isinstance(category, list) else [category])]}


# ------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------

BUILDERS = {"coco_caption": OwlCocoKarpathy, "vqav2": OwlVqav2, "owleval": OwlEvalInstructions}


def tfds_name(task: str, config: str | None = None) -> str:
    """'owl_coco_karpathy/eval' etc.: the name `tfds.data_source` / `tfds.builder` take."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(BUILDERS)}")
    cls = BUILDERS[task]
    if not cls.BUILDER_CONFIGS:
        return cls.name
    names = [c.name for c in cls.BUILDER_CONFIGS]
    if config is not None and config not in names:
        raise ValueError(f"{cls.name} has no config {config!r}; one of {names}")
    return f"{cls.name}/{config or names[0]}"


def prepare(task: str, raw_dir: str, data_dir: str, config: str | None = None):
    """Builds the task's dataset from the local files in `raw_dir` into `data_dir` (a no-op when
    it is already there). Returns the builder."""
    b = tfds.builder(tfds_name(task, config), data_dir=data_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
    return b


def load(task: str, split: str, data_dir: str, config: str | None = None):
    """Random-access source (len, [i]) of a prepared split, via `tfds.data_source`."""
    return tfds.data_source(tfds_name(task, config), split=split, data_dir=data_dir, download=False)
