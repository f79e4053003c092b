"""A synthetic, learnable, checkpointable stream of training batches (docs/data.md contract).

For dry runs, benchmarks and tests that must not depend on files. Example i of the dataset is
an image of a flat colour class c(i) plus noise and the "caption" of that class (a fixed token
sequence per class), so the loss falls when the model learns to read the image.

Order: epoch e visits the examples in permutation(seed, e). Global batch s holds stream
positions [s*B, (s+1)*B); process p of P gets rows [p*B/P, (p+1)*B/P) of it, so the global
batch is the same whatever the process count. State: {"position": examples consumed}.
"""
from __future__ import annotations

import numpy as np

NUM_CLASSES = 8


class SyntheticBatches:
    def __init__(self, *, num_examples: int, global_batch: int, seq_len: int, image_size: int,
                 image_tokens: int, vocab_size: int, text_len: int = 16,
                 max_images_per_row: int = 1, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over "
                             f"{process_count} processes")
        if 1 + image_tokens + text_len + 1 > seq_len:
            raise ValueError(f"seq_len {seq_len} cannot hold an image ({image_tokens} slots) and "
                             f"{text_len} caption tokens")
        self.n, self.b, self.l = num_examples, global_batch, seq_len
        self.local = global_batch // process_count
        self.p = process_index
        self.s, self.t, self.v = image_size, image_tokens, vocab_size
        self.text_len, self.m, self.seed = text_len, max(1, max_images_per_row), seed
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        cls_rng = np.random.default_rng([seed, 12345])
        # Caption tokens per class: ids in [3, vocab) (0 pad, 1 bos, 2 eos).
        self.captions = cls_rng.integers(3, vocab_size, (NUM_CLASSES, text_len))
        self.colors = cls_rng.uniform(0.1, 0.9, (NUM_CLASSES, 3)).astype(np.float32)
        self.position = 0

    # -- state ---------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_examples": self.n}

    def set_state(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("num_examples") != self.n:
            raise ValueError(f"synthetic data state {state} is for another dataset "
                             f"(seed {self.seed}, {self.n} examples)")
        self.position = int(state["position"])

    # -- data ----------------------------------------------------------------------------
    def example_index(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.n)[k])

    def example(self, i: int) -> dict:
        c = i % NUM_CLASSES
        rng = np.random.default_rng([self.seed, 777, i])
        img = self.colors[c] + 0.05 * rng.standard_normal((self.s, self.s, 3)).astype(np.float32)
        ids = [1] + [-1] * self.t + list(self.captions[c][: 1 + i % self.text_len]) + [2]
        n = len(ids)
        row = np.zeros(self.l, np.int32)
        row[:n] = ids
        targets = np.zeros(self.l, np.int32)
        targets[: n - 1] = row[1:n]
        mask = np.zeros(self.l, np.float32)
        mask[self.t: n - 1] = 1.0  # predict every caption token and the EOS, never the slots
        seg = np.zeros(self.l, np.int32)
        seg[:n] = 1
        pos = np.where(seg > 0, np.arange(self.l), 0).astype(np.int32)
        px = np.zeros((self.m, self.s, self.s, 3), np.float32)
        px[0] = (img - self.mean) / self.std
        return dict(input_ids=row, targets=targets, loss_mask=mask, segment_ids=seg,
                    positions=pos, pixel_values=px, example_id=np.int64(i))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.position + self.p * self.local
        rows = [self.example(self.example_index(start + r)) for r in range(self.local)]
        self.position += self.b
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def close(self):
        pass
