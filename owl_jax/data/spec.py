"""Source spec strings and the records every source yields before decoding.

A spec names the kind of source and its files::

    webdataset:/data/laion/{00000..00099}.tar      img2dataset webdataset shards
    parquet:/data/coyo/*.parquet                    img2dataset parquet output (image bytes inside)
    arrayrecord:/data/converted                     shards written by `owl-data convert`
    coco:/data/annotations/captions_train2017.json?images=/data/train2017
    coco:/data/dataset_coco.json?images=/data/coco&split=train,restval
    instruct:/data/llava_instruct_150k.json?images=/data/train2017&format=llava
                                                    stage-2 conversations (training pipeline only)

The part after `kind:` is a pattern: `{00000..00099}` brace ranges (zero padding kept) and shell
globs, or a directory (all files of the kind's extension in it). Options follow a `?` as
`name=value` pairs joined by `&`.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

KINDS = ("webdataset", "parquet", "arrayrecord", "coco", "instruct")
DEFAULT_EXT = {"webdataset": ".tar", "parquet": ".parquet", "arrayrecord": ".array_record"}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class SourceError(ValueError):
    """A spec or a file that cannot be read at all (as opposed to one bad sample)."""


@dataclasses.dataclass
class RawSample:
    """One example as stored: the image still encoded."""
    key: str
    image: bytes | None
    text: str | None
    meta: dict[str, Any]
    where: str  # file (and member) the sample came from, for messages


@dataclasses.dataclass
class Skipped:
    """A sample (or a whole unreadable file) that was dropped, and why."""
    reason: str
    where: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: str
    pattern: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    def __str__(self) -> str:
        opts = "&".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kind}:{self.pattern}" + (f"?{opts}" if opts else "")


def parse_spec(spec: str) -> Spec:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise SourceError(f"source spec {spec!r}: must start with one of "
                          f"{', '.join(k + ':' for k in KINDS)}")
    pattern, _, query = rest.partition("?")
    if not pattern:
        raise SourceError(f"source spec {spec!r}: no file pattern after '{kind}:'")
    options = []
    for part in filter(None, query.split("&")):
        name, eq, value = part.partition("=")
        if not eq:
            raise SourceError(f"source spec {spec!r}: option {part!r} is not name=value")
        options.append((name, value))
    return Spec(kind, os.path.expanduser(pattern), tuple(options))


def expand_braces(pattern: str) -> list[str]:
    """`a{01..03}b` -> [a01b, a02b, a03b]; several ranges multiply; zero padding follows the
    first bound's width."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise SourceError(f"brace range {m.group(0)} in {pattern!r} is empty")
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def expand_files(spec: Spec) -> tuple[list[str], list[str]]:
    """Files the spec names, sorted within each pattern, and the explicitly named (brace range)
    files that do not exist (img2dataset shard numbering can have gaps)."""
    if os.path.isdir(spec.pattern):
        ext = DEFAULT_EXT.get(spec.kind)
        if ext is None:
            raise SourceError(f"{spec}: a {spec.kind} source needs a file, not a directory")
        files = sorted(glob.glob(os.path.join(glob.escape(spec.pattern), "*" + ext)))
        if not files:
            raise SourceError(f"{spec}: no *{ext} files in directory {spec.pattern}")
        return files, []
    files, missing = [], []
    for pat in expand_braces(spec.pattern):
        if glob.has_magic(pat):
            files += sorted(glob.glob(pat))
        elif os.path.exists(pat):
            files.append(pat)
        else:
            missing.append(pat)
    if not files:
        raise SourceError(f"{spec}: no files match {spec.pattern!r}"
                          + (f" (first missing: {missing[0]})" if missing else ""))
    return files, missing


def output_names(files: list[str]) -> list[str]:
    """Stable, unique output names for input files: the stem, or parent_stem on collisions."""
    stems = [os.path.basename(f).split(".")[0] for f in files]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{os.path.basename(os.path.dirname(os.path.abspath(f)))}_{s}_{i:05d}"
            for i, (f, s) in enumerate(zip(files, stems))]
