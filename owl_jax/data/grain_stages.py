"""grain stages of the training pipeline: the shuffled per-process share of a source (before
the workers), and what runs in the main process after them: unchunking, counting dropped
samples, packing / padding rows that carry uint8 pixels, and building the batch (uint8 pixels
copied into place).
"""
from __future__ import annotations

import collections
import sys

import grain
import numpy as np

from owl_jax.data import packing


class ProcessShare(grain.MapDataset):
    """This process's share of a random-access source, globally shuffled and repeated: the
    same elements in the same order as grain's
        MapDataset.source(seq).shuffle(seed)[:share * count][index::count].repeat(num_epochs)
    (Feistel `index_shuffle`, 4 rounds, seed + epoch per epoch; share = len(seq) // count),
    in one stage instead of five, without grain's per-read metrics, which cost as much per
    sample as the whole mapping. For sources under 2**16 samples, where one `index_shuffle`
    costs 10-50 us, the epoch's mapping is computed once and kept (at most 2**16 ints)."""

    CACHE_BELOW = 1 << 16

    def __init__(self, seq, seed: int, index: int, count: int, num_epochs: int | None):
        super().__init__()
        self._seq, self._n = seq, len(seq)
        self._seed, self._index, self._count = int(seed), index, count
        self.share = self._n // count
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {num_epochs}")
        self._len = (sys.maxsize if num_epochs is None else num_epochs * self.share) \
            if self.share else 0
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self._len

    def _source_index(self, epoch: int, r: int) -> int:
        return int(grain.experimental.index_shuffle(
            self._index + r * self._count, max_index=self._n - 1,
            seed=(self._seed + epoch) % 2**32, rounds=4))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        epoch, r = divmod(int(i), self.share)
        if self._n >= self.CACHE_BELOW:
            return self._seq[self._source_index(epoch, r)]
        if epoch != self._epoch:
            self._order = [self._source_index(epoch, k) for k in range(self.share)]
            self._epoch = epoch
        return self._seq[self._order[r]]

    def __str__(self) -> str:
        return (f"ProcessShare(n={self._n}, share={self.share}, process {self._index} of "
                f"{self._count})")


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
