"""grain stages of the training pipeline that run in the main process, after the workers:
unchunking, counting dropped samples, packing / padding rows that carry uint8 pixels, and
building the batch (uint8 pixels copied into place).
"""
from __future__ import annotations

import collections

import grain
import numpy as np

from owl_jax.data import packing


class DropCounting(grain.IterDataset):
    """Skips {"drop": reason} markers and counts them into `counts` (this process)."""

    def __init__(self, parent: grain.IterDataset, counts: collections.Counter):
        super().__init__(parent)
        self._counts = counts

    def __iter__(self):
        return _DropCountingIterator(self._parent.__iter__(), self._counts)


class _DropCountingIterator(grain.DatasetIterator):
    def __init__(self, parent, counts):
        super().__init__(parent)
        self._counts = counts

    def __next__(self):
        while True:
            el = next(self._parent)
            reason = el.get("drop") if isinstance(el, dict) else "not_a_sample"
            if reason is None:
                return el
            self._counts[reason] += 1

    def get_state(self):
        return {"parent": self._parent.get_state(), "dropped": dict(self._counts)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._counts.clear()
        self._counts.update(state["dropped"])


class Unchunk(grain.IterDataset):
    """Chunks (lists of consecutive samples, one worker message each) -> samples, in order.
    The state is the parent's state before the current chunk plus the position in it."""

    def __iter__(self):
        return _UnchunkIterator(self._parent.__iter__())


class _UnchunkIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._chunk, self._pos, self._skip = [], 0, 0
        self._chunk_state = parent.get_state()

    def __next__(self):
        while self._pos >= len(self._chunk):
            self._chunk_state = self._parent.get_state()
            self._chunk = next(self._parent)
            self._pos, self._skip = self._skip, 0
        self._pos += 1
        return self._chunk[self._pos - 1]

    def get_state(self):
        if self._pos >= len(self._chunk) and not self._skip:
            return {"parent": self._parent.get_state(), "pos": 0}
        return {"parent": self._chunk_state, "pos": self._pos or self._skip}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._chunk_state = state["parent"]
        self._chunk, self._pos, self._skip = [], 0, state["pos"]


class ImagePacker(packing.Packer):
    """Packer whose rows also carry their samples' uint8 pixels (`row["pixels"]`, a list),
    which the batch function copies straight into the batch."""

    def flush(self):
        pixels = [s["pixels"] for s in self.pending]
        rows = super().flush()
        for row in rows:
            row["pixels"] = pixels
        return rows


def pack_with_pixels(parent, seq_len: int, max_images: int) -> packing.PackIterDataset:
    """Packing stage whose rows carry their samples' uint8 pixels; rows are laid out with
    image_size 0 (empty pixel_values placeholders, BatchRows builds the real ones)."""
    return packing.PackIterDataset(parent, seq_len, max_images, 0, packer_cls=ImagePacker)


def pad_row(sample, seq_len, max_images, image_size):
    row = packing.pad_to_length(sample, seq_len, max_images, image_size)
    row["pixels"] = [sample["pixels"]]
    return row


class BatchRows:
    """rows -> the batch dict. pixel_values [B, M, S, S, 3] stay uint8: the train step
    normalizes them on the device (`images.normalize_pixels`), which sends 4x fewer bytes to
    it and spares the host a float pass over every pixel. Unused image slots are zero."""

    def __init__(self, owl_cfg, max_images):
        self.size, self.max_images = owl_cfg.vision.image_size, max_images

    def __call__(self, rows):
        batch = {k: np.stack([r[k] for r in rows]) for k in packing.ROW_KEYS
                 if k != "pixel_values"}
        s = self.size
        pv = np.zeros((len(rows), self.max_images, s, s, 3), np.uint8)
        for b, row in enumerate(rows):
            j = 0
            for u8 in row["pixels"]:
                pv[b, j:j + len(u8)] = u8
                j += len(u8)
        batch["pixel_values"] = pv
        return batch
