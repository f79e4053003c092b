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
from grain.python import SharedMemoryArray

from owl_jax.data import packing


class ProcessShare(grain.MapDataset):
    """This process's share of a random-access source, globally shuffled and repeated, in one
    stage (grain's shuffle / slice / slice / repeat / source chain costs as much per sample as
    decoding a tenth of an image, mostly in per-read tracing and metrics).

    Index i reads, in epoch e = i // share (share = len(seq) // count), the source element
    perm_e(index + (i % share) * count): processes take strided, disjoint, equal shares of
    each epoch's permutation. perm_e is grain's Feistel `index_shuffle` (4 rounds, seed + e),
    so for sources of 2**16 samples or more this is exactly
        MapDataset.source(seq).shuffle(seed)[:share * count][index::count].repeat(num_epochs)
    Below 2**16 one `index_shuffle` costs 10-50 us (it walks a larger domain), so there perm_e
    is numpy's `default_rng([seed, e]).permutation(len(seq))`, computed once per epoch."""

    SMALL = 1 << 16

    def __init__(self, seq, seed: int, index: int, count: int, num_epochs: int | None):
        super().__init__()
        self._seq, self._n = seq, len(seq)
        self._seed, self._index, self._count = int(seed), index, count
        self.share = self._n // count
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {num_epochs}")
        self._len = (sys.maxsize if num_epochs is None else num_epochs * self.share) \
            if self.share else 0
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        epoch, r = divmod(int(i), self.share)
        j = self._index + r * self._count
        if self._n >= self.SMALL:
            return self._seq[int(grain.experimental.index_shuffle(
                j, max_index=self._n - 1, seed=(self._seed + epoch) % 2**32, rounds=4))]
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._n).tolist()
            self._epoch = epoch
        return self._seq[self._perm[j]]

    def __str__(self) -> str:
        return (f"ProcessShare(n={self._n}, share={self.share}, process {self._index} of "
                f"{self._count})")


class Chunks(grain.MapDataset):
    """Consecutive elements in lists of `size` (the last one shorter), like
    `MapDataset.batch(size, batch_fn=list)`, but fetched through the parents' `_getitems`,
    so each map stage runs over the whole chunk before the next stage starts (grain's batch
    does that only behind an experiment flag)."""

    def __init__(self, parent: grain.MapDataset, size: int):
        super().__init__(parent)
        self._size = size
        n = len(parent)
        self._len = n if n >= sys.maxsize else -(-n // size)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, c):
        if isinstance(c, slice):
            return self.slice(c)
        start = int(c) * self._size
        stop = min(start + self._size, len(self._parent))
        return list(self._parent._getitems(list(range(start, stop))))  # noqa: SLF001

    def __str__(self) -> str:
        return f"Chunks({self._size})"


def stack_pixels(chunk: list) -> dict:
    """Worker side of the transfer: a chunk's uint8 pixels in one array, allocated in shared
    memory, which grain sends by name. A list of per-sample arrays is pickled through the
    worker's pipe in 64 KiB writes, which cost the worker and the main process ~10% of the
    decoding work between them; a plain array would be copied into shared memory."""
    pixels = [s["pixels"] for s in chunk if "pixels" in s]
    n = sum(len(p) for p in pixels)
    if n:
        stacked = SharedMemoryArray((n, *pixels[0].shape[1:]), np.uint8)
        np.concatenate(pixels, out=stacked)
    else:  # only text-only or dropped samples: empty pixels, of the samples' shape
        stacked = np.concatenate(pixels) if pixels else np.zeros((0,), np.uint8)
    return {"samples": [{k: v for k, v in s.items() if k != "pixels"} for s in chunk],
            "counts": [len(s["pixels"]) if "pixels" in s else -1 for s in chunk],
            "pixels": stacked}


def unstack_pixels(chunk):
    """Main side: `stack_pixels`' output -> the list of samples, each with its pixels as a
    view of the chunk's array (no copy); a plain list (no workers) passes through."""
    if isinstance(chunk, list):
        return chunk
    start = 0
    for s, k in zip(chunk["samples"], chunk["counts"]):
        if k >= 0:
            s["pixels"] = chunk["pixels"][start:start + k]
            start += k
    return chunk["samples"]


class Samples(grain.IterDataset):
    """Chunks (lists of consecutive samples, or `stack_pixels` of them: one worker message
    each) -> samples in order, skipping {"drop": reason} markers and counting them into
    `counts` (this process).

    With `batch_size`, yields `batch_fn(list of batch_size samples)` instead (the last partial
    batch is dropped): one stage instead of unchunk / count / batch, because grain wraps
    every stage's __next__ in tracing and timing that costs as much per sample as the work.
    The state is the parent's state before the current chunk, the position in that chunk and
    the drop counts; it is taken between batches.

    `max_run` consecutive drops (no sample in between) raise `stall(run_counts)`, the error to
    raise (a source that drops everything would otherwise be read forever, printing nothing)."""

    def __init__(self, parent: grain.IterDataset, counts: collections.Counter,
                 batch_size: int | None = None, batch_fn=None, max_run: int = 0, stall=None):
        super().__init__(parent)
        self._counts, self._batch_size, self._batch_fn = counts, batch_size, batch_fn
        self._max_run, self._stall = max_run, stall

    def __iter__(self):
        return _SamplesIterator(self._parent.__iter__(), self._counts, self._batch_size,
                                self._batch_fn, self._max_run, self._stall)


class _SamplesIterator(grain.DatasetIterator):
    def __init__(self, parent, counts, batch_size, batch_fn, max_run=0, stall=None):
        super().__init__(parent)
        self._counts, self._batch_size, self._batch_fn = counts, batch_size, batch_fn
        self._max_run, self._stall = max_run, stall
        self._chunk, self._pos, self._skip = [], 0, 0
        self._chunk_state = parent.get_state()

    def _sample(self):
        run: collections.Counter = collections.Counter()  # drops since the last sample
        while True:
            while self._pos >= len(self._chunk):
                self._chunk_state = self._parent.get_state()
                self._chunk = unstack_pixels(next(self._parent))
                self._pos, self._skip = self._skip, 0
            el = self._chunk[self._pos]
            self._pos += 1
            reason = el.get("drop") if isinstance(el, dict) else "not_a_sample"
            if reason is None:
                return el
            self._counts[reason] += 1
            run[reason] += 1
            if self._max_run and run.total() >= self._max_run:
                raise self._stall(run)

    def __next__(self):
        if self._batch_size is None:
            return self._sample()
        return self._batch_fn([self._sample() for _ in range(self._batch_size)])

    def get_state(self):
        if self._pos >= len(self._chunk) and not self._skip:
            state = {"parent": self._parent.get_state(), "pos": 0}
        else:
            state = {"parent": self._chunk_state, "pos": self._pos or self._skip}
        return {**state, "dropped": dict(self._counts)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._chunk_state = state["parent"]
        self._chunk, self._pos, self._skip = [], 0, state["pos"]
        self._counts.clear()
        self._counts.update(state["dropped"])


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


class BatchSamples:
    """Without packing: samples -> the batch dict directly, one sample per row (segment 1,
    positions 0.., padding 0), laid out as `packing.pad_to_length` + `BatchRows` would, but
    written straight into the [B, ...] arrays: no per-row arrays to build and stack."""

    def __init__(self, owl_cfg, seq_len, max_images):
        self.size, self.seq_len, self.max_images = owl_cfg.vision.image_size, seq_len, max_images
        self.positions = np.arange(seq_len, dtype=np.int32)

    def __call__(self, samples):
        B, L, M, s = len(samples), self.seq_len, self.max_images, self.size
        ids, targets = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
        mask = np.zeros((B, L), np.float32)
        seg, pos = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
        pv = np.zeros((B, M, s, s, 3), np.uint8)
        for b, sample in enumerate(samples):
            x = sample["input_ids"]
            n = len(x) - 1
            k = len(sample["pixels"])
            if n > L or k > M:
                raise ValueError(f"sample needs {n} slots and {k} images but rows have {L} "
                                 f"and {M}: make the task's max_length <= seq_len")
            ids[b, :n] = x[:-1]
            targets[b, :n] = x[1:]
            mask[b, :n] = sample["loss_mask"][:n]
            seg[b, :n] = 1
            pos[b, :n] = self.positions[:n]
            if k:
                pv[b, :k] = sample["pixels"]
        np.maximum(targets, 0, out=targets)  # image slots are never trained
        return {"input_ids": ids, "targets": targets, "loss_mask": mask, "segment_ids": seg,
                "positions": pos, "pixel_values": pv}


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
