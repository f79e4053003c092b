"""`open_source(spec, **filters)`: iterate image-text examples from any supported source.

    stream = open_source("webdataset:/data/laion/{00000..00099}.tar", min_similarity=0.3)
    for ex in stream:            # {"key", "image": uint8 [H, W, 3] RGB, "text", **metadata}
        ...
    stream.samples, stream.skipped   # examples yielded, Counter of skip reasons

Skip reasons: img2dataset statuses of parquet rows (`failed_to_download`, ...), `missing_image`
(no image bytes), `missing_file` / `unreadable_file` (a local image file of a COCO source that
does not exist / cannot be read), `missing_caption`, the image decode reasons of `images.py`,
`filtered_<threshold>` (filters.py), `truncated_tar`, `corrupt_tar`, `corrupt_parquet`,
`corrupt_record`, `missing_shard` (a file named by a brace range that does not exist). Work is
split into units (one per input file, or chunks of a COCO annotation list) that
`owl-data convert` / `stats` run in parallel.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

import numpy as np

from owl_jax.data import images as imgs
from owl_jax.data.filters import FilterSpec
from owl_jax.data.sources_arrayrecord import ArrayRecordSamples, iter_arrayrecord
from owl_jax.data.sources_coco import iter_entries, load_entries, read_entry
from owl_jax.data.sources_parquet import iter_parquet
from owl_jax.data.sources_webdataset import TarIndex, iter_tar
from owl_jax.data.spec import (RawSample, Skipped, SourceError, Spec, expand_files,
                               output_names, parse_spec)

COCO_CHUNK = 5000


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independent piece of work: a shard file, or a chunk of COCO entries."""
    name: str
    kind: str
    path: str
    entries: tuple = ()


def as_spec(spec: str | Spec) -> Spec:
    return spec if isinstance(spec, Spec) else parse_spec(spec)


def source_units(spec: str | Spec) -> tuple[list[Unit], list[str]]:
    """(units, missing files) for a spec."""
    spec = as_spec(spec)
    if spec.kind == "instruct":
        raise SourceError(f"{spec}: instruction data is read by the training pipeline only "
                          f"(owl_jax.data.pipeline); it holds no image-text pairs to convert")
    if spec.kind == "coco":
        entries = load_entries(spec)
        n = max(1, -(-len(entries) // COCO_CHUNK))
        return [Unit(f"coco-{i:05d}", "coco", spec.pattern,
                     tuple(entries[i * COCO_CHUNK:(i + 1) * COCO_CHUNK])) for i in range(n)], []
    files, missing = expand_files(spec)
    return [Unit(name, spec.kind, f) for name, f in zip(output_names(files), files)], missing


def iter_unit(unit: Unit) -> Iterator[RawSample | Skipped]:
    if unit.kind == "webdataset":
        return iter_tar(unit.path)
    if unit.kind == "parquet":
        return iter_parquet(unit.path)
    if unit.kind == "arrayrecord":
        return iter_arrayrecord(unit.path)
    if unit.kind == "coco":
        return iter_entries(list(unit.entries))
    raise SourceError(f"unknown source kind {unit.kind!r}")


@dataclasses.dataclass
class Checks:
    """What turns a RawSample into an example, or into a skip reason."""
    filters: FilterSpec = FilterSpec()
    require_text: bool = True
    max_pixels: int | None = None

    def check_raw(self, raw: RawSample | Skipped) -> str | None:
        if isinstance(raw, Skipped):
            return raw.reason
        if not raw.image:
            return "missing_image"
        if self.require_text and not (isinstance(raw.text, str) and raw.text.strip()):
            return "missing_caption"
        return self.filters.check_meta(raw.meta)

    def open_image(self, raw: RawSample):
        """(PIL RGB image, stored format, stored mode) of a sample that passed check_raw;
        raises BadImage (also for the size filters)."""
        img, fmt, mode = imgs.open_image_info(raw.image, self.max_pixels)
        reason = self.filters.check_size(img.width, img.height)
        if reason:
            raise imgs.BadImage(reason, f"{img.width}x{img.height}")
        return img, fmt, mode


def example_dict(raw: RawSample, image) -> dict[str, Any]:
    return {**raw.meta, "key": raw.key, "text": raw.text, "image": image}


class SampleStream:
    """Iterable of example dicts; counts what it skipped (reason -> count) and keeps one
    example location per reason in `skip_examples`."""

    def __init__(self, spec: Spec, units: list[Unit], missing: list[str], checks: Checks,
                 decode: bool = True):
        self.spec, self.units, self.checks, self.decode = spec, units, checks, decode
        self.missing = missing
        self.samples = 0
        self.skipped: collections.Counter = collections.Counter()
        self.skip_examples: dict[str, str] = {}

    def _skip(self, reason: str, where: str, detail: str = ""):
        self.skipped[reason] += 1
        self.skip_examples.setdefault(reason, f"{where}: {detail}" if detail else where)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for path in self.missing:
            self._skip("missing_shard", path)
        for unit in self.units:
            for raw in iter_unit(unit):
                reason = self.checks.check_raw(raw)
                if reason:
                    self._skip(reason, raw.where, getattr(raw, "detail", ""))
                    continue
                image = None
                if self.decode:
                    try:
                        image = np.asarray(self.checks.open_image(raw)[0])
                    except imgs.BadImage as e:
                        self._skip(e.reason, raw.where, e.detail)
                        continue
                self.samples += 1
                yield example_dict(raw, image if self.decode else raw.image)


def open_source(spec: str | Spec, *, decode: bool = True, require_text: bool = True,
                max_pixels: int | None = None, **filters) -> SampleStream:
    """Examples of a source spec (see spec.py), with metadata thresholds (filters.py).
    With decode=False, `image` holds the encoded bytes and images are not checked."""
    spec = as_spec(spec)
    units, missing = source_units(spec)
    checks = Checks(FilterSpec.from_kwargs(**filters), require_text, max_pixels)
    return SampleStream(spec, units, missing, checks, decode)


class CocoSamples:
    def __init__(self, entries):
        self.entries = list(entries)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        return read_entry(self.entries[i])


def load_conversations(spec: Spec, lost: collections.Counter) -> list:
    """Stage-2 conversations of `instruct:FILE[?format=llava|sharegpt|alpaca|baize|owl|auto]
    [&images=DIR]` (files of a brace range / glob are concatenated); unusable records are
    counted into `lost` by reason."""
    from owl_jax.data.conversation import InstructionReader
    files, missing = expand_files(spec)
    if missing:
        lost["missing_shard"] += len(missing)
    reader = InstructionReader(spec.option("format", "auto"), image_root=spec.option("images"))
    convs = [c for f in files for c in reader.read(f)]
    lost.update(reader.skipped)
    return convs


def random_access(spec: str | Spec):
    """A picklable sequence `[i] -> RawSample | Skipped` for the training pipeline, plus a
    Counter of what was lost while indexing (truncated tars, missing shards)."""
    spec = as_spec(spec)
    lost: collections.Counter = collections.Counter()
    if spec.kind == "coco":
        return CocoSamples(load_entries(spec)), lost
    if spec.kind == "instruct":
        return load_conversations(spec, lost), lost
    files, missing = expand_files(spec)
    if missing:
        lost["missing_shard"] += len(missing)
    if spec.kind == "arrayrecord":
        return ArrayRecordSamples(files), lost
    if spec.kind == "webdataset":
        index = TarIndex(files)
        lost.update(index.skipped)
        return index, lost
    raise SourceError(f"{spec}: {spec.kind} sources are read as streams only; convert them with "
                      f"`owl-data convert {spec} OUT_DIR` and train on arrayrecord:OUT_DIR")
