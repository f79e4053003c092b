"""ArrayRecord shards written by `owl-data convert`, and their record layout.

One record per sample, written with `group_size:1` so that grain can read any record alone::

    b"OWR1" | uint32 little-endian N | N bytes of UTF-8 JSON {"key", "text", "meta"} | image bytes

The image stays encoded exactly as the source stored it (JPEG / PNG / WebP), unless conversion
had to re-encode it (non-RGB modes, or a requested maximum size; then `meta["reencoded"]` is
true). Metadata values are whatever JSON holds (NaN kept as NaN).
"""
from __future__ import annotations

import json
import struct
from typing import Iterator

from owl_jax.data.spec import RawSample, Skipped

MAGIC = b"OWR1"
# uncompressed: image bytes do not compress, and reading skips a zstd pass (~4 us a record)
WRITER_OPTIONS = "group_size:1,uncompressed"


def pack_record(sample: RawSample) -> bytes:
    header = json.dumps({"key": sample.key, "text": sample.text, "meta": sample.meta},
                        ensure_ascii=False, default=_jsonable).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + (sample.image or b"")


def unpack_record(data: bytes, where: str = "") -> RawSample | Skipped:
    try:
        if data[:4] != MAGIC:
            raise ValueError(f"bad magic {data[:4]!r}")
        (n,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8:8 + n].decode("utf-8"))
        image = data[8 + n:]
        key = str(header["key"])
        return RawSample(key=key, image=image or None, text=header.get("text"),
                         meta=header.get("meta") or {}, where=f"{where} (key {key})")
    except Exception as e:  # noqa: BLE001
        return Skipped("corrupt_record", where, f"{type(e).__name__}: {e}")


def _jsonable(v):
    """numpy scalars / arrays and bytes from parquet metadata."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    return str(v)


def iter_arrayrecord(path: str, chunk: int = 256) -> Iterator[RawSample | Skipped]:
    from array_record.python.array_record_module import ArrayRecordReader
    try:
        reader = ArrayRecordReader(path)
        n = reader.num_records()
    except Exception as e:  # noqa: BLE001
        yield Skipped("corrupt_arrayrecord", path, f"{type(e).__name__}: {e}")
        return
    try:
        for start in range(0, n, chunk):
            try:
                records = reader.read(list(range(start, min(n, start + chunk))))
            except Exception as e:  # noqa: BLE001
                yield Skipped("corrupt_arrayrecord", f"{path}:records {start}+", str(e))
                return
            for i, data in enumerate(records):
                yield unpack_record(data, f"{path}:record {start + i}")
    finally:
        reader.close()


def write_arrayrecord(path: str, records) -> int:
    """Writes packed records to `path` (the caller handles temp names); returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    n = 0
    try:
        for rec in records:
            writer.write(rec)
            n += 1
    finally:
        writer.close()
    return n


class ArrayRecordSamples:
    """Random access: `[i]` -> RawSample (or Skipped for a corrupt record)."""

    def __init__(self, paths: list[str]):
        # array_record's own source: grain's subclass only adds per-read tracing and metrics
        from array_record.python.array_record_data_source import ArrayRecordDataSource
        self.paths = list(paths)
        self._src = ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> RawSample | Skipped:
        return unpack_record(self._src[i], f"arrayrecord record {i}")
