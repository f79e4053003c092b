"""img2dataset webdataset shards: `{shard}.tar` with `{key}.jpg|png|webp`, `{key}.txt`,
`{key}.json` per successful sample, next to `{shard}.parquet` (metadata of every row, failures
included) and `{shard}_stats.json` (`successes`, `failed_to_download`, ...).

Members of one sample are consecutive in the tar; the key is the member name up to the first
dot of its base name (webdataset's rule). A truncated tar yields the samples before the cut and
one `truncated_tar` skip; a file that is no tar at all yields one `corrupt_tar` skip.
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Iterator

from owl_jax.data.spec import RawSample, Skipped

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def split_member(name: str) -> tuple[str, str]:
    """`dir/000010005.jpg` -> (`dir/000010005`, `jpg`)."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def assemble(key: str, parts: dict[str, bytes], where: str) -> RawSample | Skipped:
    """Builds a sample from its members {ext: bytes}."""
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8", "replace"))
            if not isinstance(meta, dict):
                meta = {"json": meta}
        except ValueError:
            meta = {}
    image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    text = None
    if "txt" in parts:
        text = parts["txt"].decode("utf-8", "replace")
    elif isinstance(meta.get("caption"), str):
        text = meta["caption"]
    meta.pop("key", None)
    return RawSample(key=str(key), image=parts.get(image_ext) if image_ext else None,
                     text=text, meta=meta, where=f"{where}:{key}")


def iter_tar(path: str) -> Iterator[RawSample | Skipped]:
    """Streams one shard (sequential reads only)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Skipped("unreadable_file", path, str(e))
        return
    key, parts, n = None, {}, 0
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|")
        except tarfile.TarError as e:
            yield Skipped("corrupt_tar", path, str(e))
            return
        cut = None
        try:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = split_member(member.name)
                if k != key and key is not None:
                    yield assemble(key, parts, path)
                    n += 1
                    parts = {}
                key = k
                data = tf.extractfile(member).read()
                if len(data) != member.size:  # stream mode returns short data silently
                    raise tarfile.ReadError(f"{member.name}: {len(data)} of {member.size} bytes")
                parts[ext] = data
            if dirty_tail(path, tf.offset):
                cut = "the file ends inside a tar header"
        except (tarfile.TarError, EOFError, OSError) as e:
            cut = str(e)
    if cut:
        # the sample being read when the data ended is lost; the ones before are fine
        yield Skipped("truncated_tar", f"{path}:{key}", f"after {n} samples: {cut}")
    elif key is not None:
        yield assemble(key, parts, path)


def dirty_tail(path: str, offset: int) -> bool:
    """True if bytes after `offset` (where tarfile stopped) are not the zero end-of-archive
    padding: tarfile silently stops at a header that the end of the file cuts."""
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            block = f.read(1 << 16)
            if not block:
                return False
            if block.strip(b"\0"):
                return True


def shard_stats(path: str) -> dict | None:
    """img2dataset's `{shard}_stats.json` next to a tar, if present."""
    stats = os.path.splitext(path)[0] + "_stats.json"
    try:
        with open(stats) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class TarIndex:
    """Random access to the samples of local tar shards: one header scan per shard, then each
    sample is a few seek + read calls. Truncated tails are dropped (and counted in
    `self.skipped`)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.entries: list[tuple[int, str, tuple[tuple[str, int, int], ...]]] = []
        self.skipped: dict[str, int] = {}
        for i, p in enumerate(self.paths):
            self._scan(i, p)

    def _scan(self, file_index: int, path: str):
        size = os.path.getsize(path)
        groups: dict[str, list] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, mode="r:") as tf:
                while True:
                    m = tf.next()
                    if m is None:
                        if dirty_tail(path, tf.offset):
                            raise tarfile.ReadError("the file ends inside a tar header")
                        break
                    if not m.isfile():
                        continue
                    k, ext = split_member(m.name)
                    if m.offset_data + m.size > size:
                        # data cut: this member's sample is lost, the ones before are fine
                        if k in groups:
                            groups.pop(k)
                            order.remove(k)
                        self._lost()
                        break
                    if k not in groups:
                        groups[k] = []
                        order.append(k)
                    groups[k].append((ext, m.offset_data, m.size))
        except (tarfile.TarError, EOFError, OSError):
            # a cut header: as in iter_tar, the sample being assembled is lost
            self._lost()
            if order:
                groups.pop(order.pop())
        for k in order:
            self.entries.append((file_index, k, tuple(groups[k])))

    def _lost(self):
        self.skipped["truncated_tar"] = self.skipped.get("truncated_tar", 0) + 1

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> RawSample | Skipped:
        file_index, key, members = self.entries[i]
        path = self.paths[file_index]
        parts = {}
        with open(path, "rb") as f:
            for ext, offset, size in members:
                f.seek(offset)
                parts[ext] = f.read(size)
        return assemble(key, parts, path)
