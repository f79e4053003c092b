"""TFDS builders for the evaluation sets, built from local files into ArrayRecord, no TensorFlow.

    from owl_jax.eval import tfds_builders as tb
    tb.prepare("coco_caption", raw_dir="/data/coco", data_dir="/data/tfds")    # as needed
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

Every record holds `index`, its position in the raw annotation / question file (for VQAv2, each
question's), so results can be put back in the input order: tfds stores records shuffled.
Each build also records the raw files it read, by size and content hash (`raw_files.py`), and
`prepare` rebuilds a dataset whose raw files changed since.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from owl_jax.data.images import BadImage, open_image
from owl_jax.data.sources_coco import load_entries
from owl_jax.data.spec import Spec
from owl_jax.eval import raw_files

log = logging.getLogger(__name__)

IMAGE_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)   # encoded image, any format
VQA_NUM_ANSWERS = 10
_MAX_LOGGED_SKIPS = 20


@dataclasses.dataclass
class SplitsConfig(tfds.core.BuilderConfig):
    splits: tuple[str, ...] = ()


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ArrayRecord by default; counts and logs what it skips; reads `dl_manager.manual_dir` and
    records every file read there in the build's `raw_files.json`."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records hold `index` (input order); raw_files.json; OwlEval "
                              "`ability` and `category` as JSON text of the input values."}

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        self._skipped = collections.Counter()
        self._raw = raw_files.Recorder()
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
            data = self._raw.read(path)
        except OSError as e:
            self._skip("missing_image", where, str(e))
            return None
        try:
            open_image(data)
        except BadImage as e:
            self._skip(e.reason, where, e.detail)
            return None
        return data

    def _read_json(self, path: str):
        try:
            return json.loads(self._raw.read(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None

    def _download_and_prepare(self, dl_manager, download_config=None):
        self._skipped.clear()
        self._raw = raw_files.Recorder()
        super()._download_and_prepare(dl_manager, download_config)
        self.info.metadata["skipped"] = dict(self._skipped)
        if self._skipped:
            log.warning("%s: skipped %s", self.name, dict(self._skipped))
        # self.data_dir is the build's temporary folder here, renamed once the build succeeds.
        self._raw.save(str(dl_manager.manual_dir), os.fspath(self.data_dir))

    def _log_download_bytes(self):
        # tfds prints "Downloading and preparing ..." here; nothing is downloaded (`prepare`
        # says what it does instead).
        pass

    def _log_download_done(self):
        counts = ", ".join(f"{s.name} {s.num_examples}" for s in self.info.splits.values())
        print(f"{self.name}: built {counts} records in {self.data_dir}", flush=True)

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
            "index": np.int64, "image": IMAGE_BYTES, "image/id": np.int64,
            "image/filename": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text())})

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        ann = os.path.join(root, "dataset_coco.json")
        if not self._raw.exists(ann):
            raise FileNotFoundError(f"{self.name}: no {ann}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        self._raw.read(ann)     # recorded; load_entries parses it
        by_split = collections.defaultdict(list)
        spec = Spec("coco", ann, (("images", root), ("per", "image"),
                                  ("split", ",".join(self.builder_config.splits))))
        for index, entry in enumerate(load_entries(spec)):     # in file order
            by_split[entry[3]["split"]].append((index, entry))
        if not by_split:
            raise ValueError(f"{self.name}: {ann} has no images in splits "
                             f"{self.builder_config.splits}")
        # A split with no entries is left out (tfds refuses to write an empty one).
        return {s: self._generate_examples(by_split[s]) for s in self.builder_config.splits
                if by_split[s]}

    def _generate_examples(self, entries):
        for index, (key, path, _, meta) in entries:
            where = f"{path} (cocoid {key})"
            captions = [c for c in meta["captions"] if c]
            if not captions:
                self._skip("missing_caption", where)
                continue
            data = self._read_image(path, where)
            if data is not None:
                yield key, {"index": index, "image": data, "image/id": int(meta["image_id"]),
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
                "index": np.int64, "question_id": np.int64, "question": tfds.features.Text(),
                "answers": tfds.features.Tensor(shape=(VQA_NUM_ANSWERS,), dtype=np.object_),
                "answer_type": tfds.features.Text(), "question_type": tfds.features.Text(),
                "multiple_choice_answer": tfds.features.Text()})})

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        out = {}
        for split in self.builder_config.splits:
            sub, folder = VQA_SPLITS[split]
            qfile = os.path.join(root, f"v2_OpenEnded_mscoco_{sub}_questions.json")
            if self._raw.exists(qfile):
                afile = os.path.join(root, f"v2_mscoco_{sub}_annotations.json")
                out[split] = self._generate_examples(
                    qfile, afile if self._raw.exists(afile) else None, os.path.join(root, folder),
                    folder)
        if not out:
            raise FileNotFoundError(f"{self.name}: no question file for splits "
                                    f"{self.builder_config.splits} in {root}. "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return out

    def _generate_examples(self, qfile, afile, image_dir, folder):
        questions = self._read_json(qfile)["questions"]
        answers = ({a["question_id"]: a for a in self._read_json(afile)["annotations"]} if afile
                   else None)
        by_image = collections.defaultdict(list)
        for index, q in enumerate(questions):
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
                "index": index, "question_id": qid, "question": q["question"],
                "answers": np.array(human, object),
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
        # ability and category: JSON text of the line's values (a string, a list, ... or null),
        # so the answer file can give them back as they were.
        return tfds.features.FeaturesDict({
            "index": np.int64, "question_id": np.int64, "question": tfds.features.Text(),
            "images": tfds.features.Sequence(IMAGE_BYTES),
            "image/filenames": tfds.features.Sequence(tfds.features.Text()),
            "ability": tfds.features.Text(), "category": tfds.features.Text()})

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        qfile = os.path.join(root, "questions.jsonl")
        if not self._raw.exists(qfile):
            found = sorted(f for f in os.listdir(root) if f.endswith(".jsonl"))
            if len(found) != 1:
                raise FileNotFoundError(f"{self.name}: no questions.jsonl in {root} (and "
                                        f"{len(found)} other .jsonl files: {found[:5]})")
            qfile = os.path.join(root, found[0])
        image_dirs = [d for d in (os.path.join(root, "cases"), os.path.join(root, "images"), root)
                      if os.path.isdir(d)]
        return {"test": self._generate_examples(qfile, image_dirs)}

    def _generate_examples(self, qfile, image_dirs):
        text = io.TextIOWrapper(io.BytesIO(self._raw.read(qfile)), encoding="utf-8")
        lines = text.readlines()
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
                             if self._raw.exists(os.path.join(d, name))),
                            os.path.join(image_dirs[0], name))
                images.append(self._read_image(path, f"{path} ({where})"))
            if any(im is None for im in images):
                continue
            qid = int(rec.get("question_id", lineno))
            yield qid, {"index": lineno - 1, "question_id": qid, "question": question,
                        "images": images, "image/filenames": [str(n) for n in names],
                        "ability": _json(rec.get("ability")),
                        "category": _json(rec.get("category", rec.get("type")))}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


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
    """Builds the task's dataset from the local files in `raw_dir` into `data_dir`. A build
    already there is kept when the raw files it read are unchanged (same presence, size and
    contents, see `raw_files`) and rebuilt otherwise. Prints which. Returns the builder."""
    name = tfds_name(task, config)
    if not os.path.isdir(raw_dir):      # before a cached build is judged stale against nothing
        raise FileNotFoundError(f"{name}: raw dir {raw_dir} is not a directory")
    b = tfds.builder(name, data_dir=data_dir)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if b.data_path.exists():    # what download_and_prepare would reuse
        changed = raw_files.changes(os.fspath(b.data_dir), raw_dir)
        if changed == []:
            print(f"{name}: raw files in {raw_dir} unchanged: using the build in {b.data_dir}",
                  flush=True)
            return b
        print(f"{name}: {_why_rebuild(changed)}: rebuilding", flush=True)
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS     # replaces the build
    print(f"Preparing {name} from local files in {raw_dir} -> {b.data_dir}", flush=True)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=raw_dir, download_mode=mode))
    return b


def _why_rebuild(changed: list[str] | None) -> str:
    if changed is None:
        return "the cached build has no record of the raw files it was built from"
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"raw files changed since the cached build ({shown})"


def load(task: str, split: str, data_dir: str, config: str | None = None):
    """Random-access source (len, [i]) of a prepared split, via `tfds.data_source`."""
    return tfds.data_source(tfds_name(task, config), split=split, data_dir=data_dir, download=False)
