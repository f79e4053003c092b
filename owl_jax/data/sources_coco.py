"""COCO captions with a local image folder.

Two annotation formats are recognised by their content:
  - `captions_train2017.json` style: `images[] {id, file_name, ...}` + `annotations[] {image_id,
    caption}`; images are read from `images=DIR/file_name`.
  - MiniGPT-4's cc_sbu_align `filter_cap.json`: `annotations[] {image_id, caption}` and no
    images list; images are read from `images=DIR/{image_id}.jpg`.
  - Karpathy `dataset_coco.json`: `images[] {filepath, filename, split, cocoid, sentences[] {raw}}`;
    images are read from `images=DIR/filepath/filename` (or `DIR/filename` when that exists).
    `split=train,restval` keeps those Karpathy splits (default: all).
Option `per=caption` (default) yields one sample per caption; `per=image` one per image with
the first caption as `text` and all of them in `captions`. An image file that does not exist is
skipped as `missing_file` (detail "image file not found: PATH").
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from owl_jax.data.images import BadImage, read_image_file
from owl_jax.data.spec import RawSample, Skipped, SourceError, Spec

# entry: (key, image path, caption, meta)
Entry = tuple[str, str, str, dict]


def load_entries(spec: Spec) -> list[Entry]:
    path = spec.pattern
    images_dir = spec.option("images")
    if images_dir is None:
        raise SourceError(f"{spec}: a coco source needs ?images=IMAGE_DIR")
    per = spec.option("per", "caption")
    if per not in ("caption", "image"):
        raise SourceError(f"{spec}: per must be caption or image, not {per!r}")
    splits = spec.option("split")
    splits = set(splits.split(",")) if splits else None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"{spec}: cannot read annotation file {path}: {e}") from None
    if isinstance(data, dict) and "images" not in data and \
            isinstance(data.get("annotations"), list):  # cc_sbu_align: {image_id}.jpg
        data = dict(data, images=[{"id": i, "file_name": f"{i}.jpg"} for i in
                                  dict.fromkeys(a.get("image_id") for a in data["annotations"])])
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{path}: not a COCO captions or Karpathy json (no images list)")
    if "annotations" in data:
        return _official(data, images_dir, per, path)
    return _karpathy(data, images_dir, per, splits, path)


def _official(data, images_dir, per, path) -> list[Entry]:
    images = {im["id"]: im for im in data["images"]}
    by_image: dict = {}
    for ann in data["annotations"]:
        if ann.get("image_id") not in images:
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for image_id in sorted(by_image):
        im = images[image_id]
        file = os.path.join(images_dir, im["file_name"])
        anns = sorted(by_image[image_id], key=lambda a: a.get("id", 0))
        base = {"image_id": image_id, "file_name": im["file_name"],
                "width": im.get("width"), "height": im.get("height")}
        out += _entries(str(image_id), file, [(a.get("id"), a.get("caption")) for a in anns],
                        base, per)
    return out


def _karpathy(data, images_dir, per, splits, path) -> list[Entry]:
    out = []
    for im in data["images"]:
        if splits is not None and im.get("split") not in splits:
            continue
        file = os.path.join(images_dir, im.get("filepath", ""), im["filename"])
        flat = os.path.join(images_dir, im["filename"])
        if not os.path.exists(file) and os.path.exists(flat):
            file = flat  # when neither exists, the skip names the documented DIR/filepath path
        image_id = im.get("cocoid", im.get("imgid"))
        base = {"image_id": image_id, "file_name": im["filename"], "split": im.get("split")}
        sents = [(s.get("sentid"), s.get("raw")) for s in im.get("sentences", [])]
        out += _entries(str(image_id), file, sents, base, per)
    return out


def _entries(key, file, captions, base, per) -> list[Entry]:
    if per == "image":
        texts = [c for _, c in captions]
        return [(key, file, texts[0] if texts else None, {**base, "captions": texts})]
    return [(f"{key}_{cid}", file, text, {**base, "caption_id": cid}) for cid, text in captions]


def read_entry(entry: Entry) -> RawSample | Skipped:
    """The sample of one entry; a missing image file is skipped as `missing_file`, an
    unreadable one as `unreadable_file`."""
    key, file, text, meta = entry
    where = f"{file} (key {key})"
    try:
        image = read_image_file(file)
    except BadImage as e:
        return Skipped(e.reason, where, e.detail)
    return RawSample(key=key, image=image, text=text, meta=dict(meta), where=where)


def iter_entries(entries: list[Entry]) -> Iterator[RawSample | Skipped]:
    for e in entries:
        yield read_entry(e)
