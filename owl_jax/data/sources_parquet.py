"""Parquet files that hold the image bytes: img2dataset `--output_format parquet` (one row per
input row, failures included with `status` != "success" and a null image; the image column is
named after the encode format, `jpg` by default; the caption is `txt`), and plain image-text
parquet files (`image` as bytes or as the HF {bytes, path} struct, `text` / `caption`).

Rows whose `status` is not "success" are skipped and counted under their status
(`failed_to_download`, `failed_to_resize`, ...).
"""
from __future__ import annotations

import os
from typing import Iterator

import pyarrow.parquet as pq

from owl_jax.data.spec import RawSample, Skipped

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes")
TEXT_COLUMNS = ("txt", "caption", "text", "TEXT")


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # HF datasets Image feature
        value = value.get("bytes")
    return bytes(value) if value else None


def iter_parquet(path: str, batch_rows: int = 256) -> Iterator[RawSample | Skipped]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad footer
        yield Skipped("corrupt_parquet", path, f"{type(e).__name__}: {e}")
        return
    names = pf.schema_arrow.names
    image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
    text_col = next((c for c in TEXT_COLUMNS if c in names), None)
    if image_col is None:
        yield Skipped("no_image_column", path, f"columns {names} have none of {IMAGE_COLUMNS}")
        return
    stem = os.path.basename(path).split(".")[0]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for rec in batch.to_pylist():
                where = f"{path}:row {row}"
                key = rec.pop("key", None)
                key = str(key) if key is not None else f"{stem}_{row:09d}"
                row += 1
                status = rec.get("status")
                if status is not None and status != "success":
                    yield Skipped(str(status), f"{where} (key {key})", rec.get("error_message") or "")
                    continue
                image = _image_bytes(rec.pop(image_col))
                text = rec.pop(text_col) if text_col else None
                yield RawSample(key=key, image=image, text=text, meta=rec, where=f"{where} (key {key})")
    except Exception as e:  # noqa: BLE001 - a corrupt row group ends this file, not the run
        yield Skipped("corrupt_parquet", f"{path}:row {row}", f"{type(e).__name__}: {e}")
