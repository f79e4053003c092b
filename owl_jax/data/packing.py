"""Samples -> training rows: padding one sample per row, or greedy packing of several.

A row is the unbatched form of the training batch contract (see docs/data.md / docs/text_data.md):
  input_ids int32 [L], targets int32 [L], loss_mask float32 [L], segment_ids int32 [L],
  positions int32 [L], pixel_values float32 [M, S, S, 3].
`stack_rows(rows)` makes the batch. Everything here is numpy, no jax.

A sample of n ids takes n - 1 slots: its inputs are ids[:-1] and its targets ids[1:]. The
final id (normally the last response's EOS) only ever appears as a target: as an input it
would predict nothing. This is the official layout (ids of length max_length + 1, the last
logit unused), so a row of L slots holds one official sample of max_length = L exactly, and
a target never crosses into the next sample by construction.
"""
from __future__ import annotations

import collections
import copy
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "pixel_values")


def sample_slots(sample: dict[str, Any]) -> int:
    """Row slots a sample occupies (its ids minus the final one)."""
    return len(sample["input_ids"]) - 1


def sample_images(sample: dict[str, Any]) -> int:
    return int(sample.get("num_images", 0))


def _check(sample: dict[str, Any], seq_len: int, max_images: int, image_size: int):
    n = sample_slots(sample)
    if n > seq_len:
        raise ValueError(f"sample needs {n} slots but rows have {seq_len}: make the task's "
                         f"max_length <= seq_len")
    k = sample_images(sample)
    if k > max_images:
        raise ValueError(f"sample has {k} images but rows hold {max_images}")
    if k and "images" in sample:
        shape = np.shape(sample["images"])
        if shape[0] < k or tuple(shape[1:]) != (image_size, image_size, 3):
            raise ValueError(f"sample images have shape {shape}, expected "
                             f"[>={k}, {image_size}, {image_size}, 3]")


def build_row(samples: Sequence[dict[str, Any]], seq_len: int, max_images: int,
              image_size: int) -> dict[str, np.ndarray]:
    """Lays samples out one after another in a row of `seq_len` slots (segments 1..k),
    padding the rest; their images go to pixel_values[0..] in order. Samples without an
    `images` array get zero pixels in their slots (the pipeline may fill them later)."""
    row = {
        "input_ids": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "pixel_values": np.zeros((max_images, image_size, image_size, 3), np.float32),
    }
    start, img = 0, 0
    for seg, s in enumerate(samples, start=1):
        _check(s, seq_len - start, max_images - img, image_size)
        ids = np.asarray(s["input_ids"], np.int32)
        n = len(ids) - 1
        end = start + n
        row["input_ids"][start:end] = ids[:-1]
        row["targets"][start:end] = np.maximum(ids[1:], 0)  # image slots are never trained
        row["loss_mask"][start:end] = np.asarray(s["loss_mask"], np.float32)[:n]
        row["segment_ids"][start:end] = seg
        row["positions"][start:end] = np.arange(n, dtype=np.int32)
        k = sample_images(s)
        if k and s.get("images") is not None:
            row["pixel_values"][img:img + k] = np.asarray(s["images"], np.float32)[:k]
        start, img = end, img + k
    return row


def pad_to_length(sample: dict[str, Any], seq_len: int, max_images: int,
                  image_size: int) -> dict[str, np.ndarray]:
    """One sample per row (segment 1), padded to seq_len. Raises ValueError when it does not
    fit (a configuration error: tasks cut samples to max_length; filter image counts with
    `fits`)."""
    return build_row([sample], seq_len, max_images, image_size)


def fits(sample: dict[str, Any], seq_len: int, max_images: int) -> bool:
    return 1 <= sample_slots(sample) <= seq_len and sample_images(sample) <= max_images


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows -> the batch dict ([B, ...] arrays)."""
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


class Packer:
    """Greedy next-fit packing: samples go into the current row while both the slots and the
    image slots last; the first sample that does not fit closes the row and opens the next.
    Order is preserved and at most one sample is held back, which keeps the state of a
    streaming packer small (see `PackIterDataset`).

        packer = Packer(seq_len, max_images_per_row, image_size)
        for s in samples: yield from packer.add(s)
        yield from packer.flush()

    Samples that can never fit a row (more images than a row holds, or no slot) are skipped
    and counted in `skipped`; one longer than seq_len is a configuration error (ValueError).
    """

    def __init__(self, seq_len: int, max_images_per_row: int, image_size: int):
        if seq_len < 1 or max_images_per_row < 0:
            raise ValueError(f"bad row shape: seq_len={seq_len}, "
                             f"max_images_per_row={max_images_per_row}")
        self.seq_len = seq_len
        self.max_images = max_images_per_row
        self.image_size = image_size
        self.pending: list[dict[str, Any]] = []
        self._used = 0
        self._images = 0
        self.skipped: collections.Counter = collections.Counter()
        self.rows = 0
        self.samples = 0
        self.filled_slots = 0

    def fits_now(self, sample: dict[str, Any]) -> bool:
        return (self._used + sample_slots(sample) <= self.seq_len
                and self._images + sample_images(sample) <= self.max_images)

    def add(self, sample: dict[str, Any] | None) -> list[dict[str, np.ndarray]]:
        """Adds a sample; returns the rows it closed (zero or one)."""
        if sample is None:
            return []
        n = sample_slots(sample)
        if n > self.seq_len:
            raise ValueError(f"sample needs {n} slots but rows have {self.seq_len}: make the "
                             f"task's max_length <= seq_len")
        if n < 1:
            self.skipped["empty"] += 1
            return []
        if sample_images(sample) > self.max_images:
            self.skipped["too_many_images"] += 1
            return []
        out = []
        if not self.fits_now(sample):
            out = self.flush()
        self.pending.append(sample)
        self._used += n
        self._images += sample_images(sample)
        return out

    def flush(self) -> list[dict[str, np.ndarray]]:
        """Closes the current row (if it holds anything) and returns it."""
        if not self.pending:
            return []
        row = build_row(self.pending, self.seq_len, self.max_images, self.image_size)
        self.rows += 1
        self.samples += len(self.pending)
        self.filled_slots += self._used
        self.pending, self._used, self._images = [], 0, 0
        return [row]

    def fill_ratio(self) -> float:
        """Fraction of emitted row slots that hold sample tokens."""
        return self.filled_slots / max(self.rows * self.seq_len, 1)


def pack(samples: Iterable[dict[str, Any] | None], seq_len: int, max_images_per_row: int,
         image_size: int, packer: Packer | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Streams packed rows from a stream of samples (None entries are ignored)."""
    packer = packer or Packer(seq_len, max_images_per_row, image_size)
    for s in samples:
        yield from packer.add(s)
    yield from packer.flush()


# -------------------------------------------------------------------------------------------
# grain: a checkpointable packing stage for IterDataset pipelines

import grain  # noqa: E402  (kept next to its only user)


class PackIterDataset(grain.IterDataset):
    """`Packer` as a grain IterDataset stage: parent yields samples (or None), this yields
    rows. Put it after the per-sample maps and before `.batch(B, batch_fn=stack_rows)`.

    Checkpointing: the state is the parent's state just before the first sample of the row
    being filled, so a restored iterator re-reads those samples and rebuilds the same row
    (grain pipelines are deterministic). Packing in worker processes (`mp_prefetch` after
    this stage) is fine; packing after `mp_prefetch` packs across workers.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, max_images_per_row: int,
                 image_size: int, packer_cls: type[Packer] = Packer):
        super().__init__(parent)
        self._args = (seq_len, max_images_per_row, image_size)
        self._packer_cls = packer_cls  # a Packer subclass may add fields to its rows

    def __iter__(self) -> "_PackIterator":
        return _PackIterator(self._parent.__iter__(), self._packer_cls(*self._args))

    def __str__(self) -> str:
        return "PackIterDataset(seq_len=%d, max_images_per_row=%d, image_size=%d)" % self._args


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, packer: Packer):
        super().__init__(parent)
        self.packer = packer
        self._row_start = copy.deepcopy(parent.get_state())
        self._exhausted = False

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._exhausted:
            before = copy.deepcopy(self._parent.get_state())
            try:
                sample = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            rows = self.packer.add(sample)
            if not self.packer.pending:
                self._row_start = copy.deepcopy(self._parent.get_state())
            elif len(self.packer.pending) == 1 and self.packer.pending[0] is sample:
                self._row_start = before
            if rows:
                return rows[0]
        rows = self.packer.flush()
        if rows:
            self._row_start = copy.deepcopy(self._parent.get_state())
            return rows[0]
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._row_start)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._row_start = copy.deepcopy(state["parent"])
        self.packer.pending, self.packer._used, self.packer._images = [], 0, 0
        self._exhausted = False
