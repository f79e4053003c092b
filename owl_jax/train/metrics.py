"""Where training numbers go: TensorBoard event files, a JSON-lines log, console progress.

On a terminal, progress is a tqdm bar with log lines printed above it; otherwise (a log file, a
pipe, a SLURM job) each logged step is one plain line, so bars never interleave with the log.

Only process 0 writes. Files:
  WORKDIR/tensorboard/   tensorboardX event files (scalars `train/*`, `eval/*`, text `samples`)
  WORKDIR/metrics.jsonl  one JSON object per logged step ({"step", "split", ...}); after a
                         restart, steps after the restored checkpoint appear again (the later
                         line wins)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
                 enabled: bool | None = None, tensorboard: bool = True, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.tb = None
        self.bar = None
        self.jsonl = None
        self.total = total_steps
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            self.tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def scalars(self, step: int, values: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in values.items()}
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        self.jsonl.flush()
        if split == "train":
            shown = {k: (f"{clean[k]:.4g}" if isinstance(clean[k], float) else clean[k])
                     for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu") if k in clean}
            if self.bar is not None:
                self.bar.set_postfix(shown, refresh=False)
            else:
                self.log(f"step {step}/{self.total}: " +
                         " ".join(f"{k}={v}" for k, v in shown.items()))

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
        self.jsonl.write(json.dumps({"step": step, "split": tag, "text": text}) + "\n")
        self.jsonl.flush()
        self.log(f"[{tag} @ {step}]\n{text}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without the optional `import torch` it attempts
    at module level (2-3 s per process; we only log scalars and text). torch stays importable
    afterwards."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError for this import only
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _plain(v):
    v = np.asarray(jax.device_get(v))
    if v.ndim == 0:
        return v.item()
    return v.tolist()


class Throughput:
    """Tokens/s and MFU over the steps since the last call (wall clock, host side)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, num_devices: int,
                 peak_tflops_per_device: float | None):
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak = (peak_tflops_per_device or 0.0) * 1e12 * num_devices
        self.t0, self.steps = time.perf_counter(), 0

    def tick(self, n: int = 1) -> None:
        self.steps += n

    def read(self) -> dict:
        dt = time.perf_counter() - self.t0
        out = {}
        if self.steps and dt > 0:
            out["step_time_s"] = dt / self.steps
            out["tokens_per_s"] = self.tokens_per_step * self.steps / dt
            out["tflops_per_s"] = self.flops_per_step * self.steps / dt / 1e12
            if self.peak:
                out["mfu"] = self.flops_per_step * self.steps / dt / self.peak
        self.t0, self.steps = time.perf_counter(), 0
        return out
