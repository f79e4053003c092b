"""Metadata thresholds for LAION / COYO samples (the columns img2dataset kept).

Each threshold reads the first of its columns that the sample has:

| threshold             | columns (first present wins)                                    | keeps      |
|-----------------------|------------------------------------------------------------------|------------|
| min_similarity        | similarity (LAION), clip_similarity_vitb32 (COYO)                | value >= t |
| min_clip_similarity   | clip_similarity_vitl14 (COYO)                                    | value >= t |
| min_aesthetic         | aesthetic_score_laion_v2 (COYO), aesthetic, AESTHETIC_SCORE      | value >= t |
| max_watermark         | watermark_score (COYO), pwatermark (LAION-2B)                    | value <= t |
| max_nsfw              | nsfw_score_opennsfw2 (COYO), punsafe (LAION-2B)                  | value <= t |
| min_size              | the decoded image (min(height, width)); before decoding: width/height | >= t  |
| max_aspect_ratio      | the decoded image (long side / short side)                       | value <= t |

A threshold whose columns a sample does not have does not apply to it (so one filter spec can
serve LAION and COYO sources); a present but NaN / null value fails the threshold. Skipped
samples are counted as `filtered_<threshold>`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

_COLUMNS = {
    "min_similarity": ("similarity", "clip_similarity_vitb32"),
    "min_clip_similarity": ("clip_similarity_vitl14",),
    "min_aesthetic": ("aesthetic_score_laion_v2", "aesthetic", "AESTHETIC_SCORE"),
    "max_watermark": ("watermark_score", "pwatermark"),
    "max_nsfw": ("nsfw_score_opennsfw2", "punsafe"),
}

# (metavar, what a threshold skips): the help of owl-data's filter flags
HELP = {
    "min_similarity": ("T", "skip samples whose image-text CLIP similarity (LAION `similarity`, "
                            "COYO `clip_similarity_vitb32`) is below T"),
    "min_clip_similarity": ("T", "skip samples whose ViT-L/14 CLIP similarity (COYO "
                                 "`clip_similarity_vitl14`) is below T"),
    "min_aesthetic": ("T", "skip samples whose aesthetic score (COYO `aesthetic_score_laion_v2`, "
                           "`aesthetic`, `AESTHETIC_SCORE`) is below T"),
    "max_watermark": ("T", "skip samples whose watermark probability (COYO `watermark_score`, "
                           "LAION-2B `pwatermark`) is above T"),
    "max_nsfw": ("T", "skip samples whose NSFW probability (COYO `nsfw_score_opennsfw2`, "
                      "LAION-2B `punsafe`) is above T"),
    "min_size": ("PX", "skip images whose short side is below PX pixels"),
    "max_aspect_ratio": ("R", "skip images whose long side is more than R times the short side"),
}


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    min_similarity: float | None = None
    min_clip_similarity: float | None = None
    min_aesthetic: float | None = None
    max_watermark: float | None = None
    max_nsfw: float | None = None
    min_size: int | None = None
    max_aspect_ratio: float | None = None

    @classmethod
    def from_kwargs(cls, **kw) -> "FilterSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in kw.items() if v is not None})

    def active(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def check_meta(self, meta: dict[str, Any]) -> str | None:
        """The skip reason from the metadata alone, or None to keep."""
        for name, columns in _COLUMNS.items():
            limit = getattr(self, name)
            if limit is None:
                continue
            col = next((c for c in columns if c in meta), None)
            if col is None:
                continue
            value = _number(meta[col])
            if value is None or (value < limit if name.startswith("min") else value > limit):
                return f"filtered_{name}"
        if self.min_size is not None or self.max_aspect_ratio is not None:
            w, h = _number(meta.get("width")), _number(meta.get("height"))
            if w and h:
                return self.check_size(int(w), int(h))
        return None

    def check_size(self, width: int, height: int) -> str | None:
        if self.min_size is not None and min(width, height) < self.min_size:
            return "filtered_min_size"
        if self.max_aspect_ratio is not None and \
                max(width, height) > self.max_aspect_ratio * min(width, height):
            return "filtered_max_aspect_ratio"
        return None


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
