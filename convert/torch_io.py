"""Streaming reads and writes of PyTorch checkpoints: `.bin` (torch pickle, zip format) and
safetensors, single-file or sharded with an HF index json.

Reading never materialises a whole state dict: `.bin` files are opened with
`torch.load(mmap=True, weights_only=True)` (tensors stay in the page cache until touched) and
safetensors are read tensor by tensor. Writing fills one shard at a time.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import pickle
import pickletools
import re
import zipfile
from typing import Iterator

import ml_dtypes
import numpy as np

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
LAYOUTS = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)  # lookup order, as HF


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file / keys at fault."""


def checkpoint_problems(where: str, problems: list[str]) -> CheckpointError:
    """One error listing a checkpoint's problems (the first 25, then how many more)."""
    shown = "\n  ".join(problems[:25])
    more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
    return CheckpointError(f"{where}: {len(problems)} problem(s):\n  {shown}{more}")


def _torch():
    import torch  # imported lazily: the JAX side never needs torch
    return torch


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def return_freed_memory_promptly() -> None:
    """glibc only: serve allocations >= 1 MiB with their own mmap, so that every converted
    tensor that is freed goes back to the OS at once. (By default glibc raises its mmap
    threshold after large frees and then keeps freed tensors in the heap, which showed up as
    ~15 % extra peak RSS in benchmarks/convert_memory.py.) Process-wide and harmless."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def release_pages(tensor) -> None:
    """Drops the resident pages of a tensor that lives in a private, read-only file mapping
    (`torch.load(mmap=True)`), once it has been copied out. Untouched file pages are simply
    re-read if accessed again, so this only keeps the process's RSS near one tensor instead of
    the whole file. Only whole pages inside the tensor's storage are dropped."""
    if _LIBC is None:
        return
    storage = tensor.untyped_storage()
    start, n = storage.data_ptr(), storage.nbytes()
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + n) // _PAGE * _PAGE
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


# --------------------------------------------------------------------------------------------
# dtypes


def torch_to_numpy(t) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 becomes ml_dtypes.bfloat16 (same bits)."""
    torch = _torch()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(x: np.ndarray):
    """A tensor sharing `x`'s memory (bfloat16 via its bits)."""
    torch = _torch()
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def np_dtype(name: str) -> np.dtype:
    """'float32' | 'float16' | 'bfloat16' (also torch / safetensors spellings) -> numpy dtype."""
    n = str(name).lower().replace("torch.", "")
    table = {"float32": np.float32, "fp32": np.float32, "f32": np.float32,
             "float16": np.float16, "fp16": np.float16, "f16": np.float16, "half": np.float16,
             "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
             "float64": np.float64, "f64": np.float64, "int64": np.int64, "i64": np.int64,
             "int32": np.int32, "i32": np.int32}
    if n not in table:
        raise ValueError(f"unsupported dtype {name!r}")
    return np.dtype(table[n])


# --------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str
    file: str


def find_layout(directory: str) -> tuple[str, list[str]]:
    """Returns (layout file name, weight files in read order). Raises naming what was sought."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    for name in LAYOUTS:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        if not name.endswith(".index.json"):
            return name, [path]
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid index json ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{path} names shard files that do not exist: {missing}")
        return name, [os.path.join(directory, f) for f in files]
    raise CheckpointError(f"{directory}: no weights found (looked for {', '.join(LAYOUTS)})")


class _File:
    """One weight file, opened lazily; `tensors()` yields (key, torch tensor) one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.is_safetensors = path.endswith(".safetensors")

    def _load_bin(self):
        """(state dict, whether it is memory-mapped)."""
        try:
            return self._torch_load()
        except pickle.UnpicklingError as e:
            if _legacy_pickles_complete(self.path):
                raise CheckpointError(_refused(self.path, e)) from None
            detail = "the pickle ends early"
        except Exception as e:  # noqa: BLE001 - zip / EOF errors of many kinds
            detail = ": ".join(filter(None, (type(e).__name__, _plain(str(e)))))
        raise CheckpointError(f"{self.path}: unreadable or truncated torch checkpoint "
                              f"({detail})")

    def _torch_load(self):
        torch = _torch()
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as e:
            if not ("mmap" in str(e) and "zipfile" in str(e).lower()):
                raise
        # legacy (pre-1.6, non-zip) format: cannot be memory-mapped
        return torch.load(self.path, map_location="cpu", weights_only=True), False

    def _open_safetensors(self):
        from safetensors import safe_open
        try:
            return safe_open(self.path, framework="pt")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: unreadable or truncated safetensors file "
                                  f"({type(e).__name__}: {e})") from None

    def infos(self) -> list[TensorInfo]:
        if self.is_safetensors:
            with self._open_safetensors() as f:
                out = []
                for k in f.keys():
                    s = f.get_slice(k)
                    out.append(TensorInfo(k, tuple(s.get_shape()), str(s.get_dtype()), self.path))
                return out
        sd, _ = self._load_bin()
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.path}: holds a {type(sd).__name__}, not a state dict")
        out = []
        for k, v in sd.items():
            if not hasattr(v, "shape"):
                raise CheckpointError(f"{self.path}: entry {k!r} is a {type(v).__name__}, "
                                      f"not a tensor")
            out.append(TensorInfo(k, tuple(v.shape), str(v.dtype).replace("torch.", ""),
                                  self.path))
        return out

    def tensors(self, keys=None) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (key, numpy array). The array may view a memory map whose pages are dropped
        as soon as the consumer asks for the next tensor: copy what you keep."""
        if self.is_safetensors:
            yield from self._safetensors_arrays(keys)
            return
        sd, mapped = self._load_bin()
        for k in list(sd):
            t = sd.pop(k)  # drop our reference as we go
            if keys is None or k in keys:
                yield k, torch_to_numpy(t)
                if mapped:
                    release_pages(t)
            del t
        del sd

    def _safetensors_arrays(self, keys):
        """Plain reads at the header's offsets into fresh arrays: no memory map, so reading a
        shard never holds more than the current tensor (safe_open has validated the header)."""
        with self._open_safetensors():
            pass
        with open(self.path, "rb") as f:
            (n,) = np.frombuffer(f.read(8), "<u8")
            header = json.loads(f.read(int(n)))
            base = 8 + int(n)
            for k, h in header.items():
                if k == "__metadata__" or (keys is not None and k not in keys):
                    continue
                dtype = _SAFE_DTYPES.get(h["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{self.path}: tensor {k!r} has unsupported dtype "
                                          f"{h['dtype']}")
                start, end = h["data_offsets"]
                out = np.empty(h["shape"], dtype)
                if out.nbytes != end - start:
                    raise CheckpointError(f"{self.path}: tensor {k!r} header is inconsistent")
                f.seek(base + start)
                if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                    raise CheckpointError(f"{self.path}: truncated while reading {k!r}")
                yield k, out


def _refused(path: str, e: Exception) -> str:
    """The refusal of a pickle that holds more than tensors, naming the global torch named."""
    m = re.search(r"GLOBAL (\S+)", str(e))
    what = f" (global {m.group(1)})" if m else ""
    return (f"{path}: refused: it holds objects{what} that a weights-only load does not allow; "
            f"a checkpoint to convert must hold tensors only")


def _plain(msg: str) -> str:
    """torch's message without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", msg).strip()


def _legacy_pickles_complete(path: str) -> bool:
    """Whether the pickles at the head of a legacy (non-zip) torch file are whole: magic number,
    protocol, sys info and the object, parsed without running anything. A file cut inside a
    GLOBAL line is refused by torch's unpickler as an unknown (clipped) global; that is a
    truncation. Zip files have a central directory, so torch itself notices them cut."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as f:
            for _ in range(4):
                for _ in pickletools.genops(f):  # stops after the pickle's STOP opcode
                    pass
    except (ValueError, EOFError, OSError):
        return False
    return True


_SAFE_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
                "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
                "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


class CheckpointReader:
    """All weight files of one checkpoint directory (any of the four HF layouts)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.layout, self.files = find_layout(directory)

    def index(self) -> dict[str, TensorInfo]:
        """key -> TensorInfo, from headers / memory maps only (no tensor data is read)."""
        out: dict[str, TensorInfo] = {}
        for path in self.files:
            for info in _File(path).infos():
                if info.key in out:
                    raise CheckpointError(f"tensor {info.key!r} is stored twice: in "
                                          f"{out[info.key].file} and {path}")
                out[info.key] = info
        return out

    def tensors(self, keys=None) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (key, numpy array) file by file. The arrays may view a memory map that is
        released after the file is done: copy what you keep."""
        for path in self.files:
            yield from _File(path).tensors(keys)


# --------------------------------------------------------------------------------------------
# Writing


def parse_size(size) -> int:
    """'10GB' -> 10 * 10**9, '500MiB' -> 500 * 2**20, ints pass through (as HF)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. 10GB, 500MB, 2GiB)")
    base = 1024 if m.group(3) == "IB" else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


class ShardedWriter:
    """Writes tensors in the HF layout: one file, or shards of at most `max_shard_bytes` plus an
    index json (`*-0000k-of-0000n.*`, named once the count is known)."""

    def __init__(self, directory: str, fmt: str = "bin", max_shard_bytes: int | str = "10GB"):
        if fmt not in ("bin", "safetensors"):
            raise ValueError(f"format must be 'bin' or 'safetensors', not {fmt!r}")
        self.directory, self.fmt = directory, fmt
        self.max_bytes = parse_size(max_shard_bytes)
        os.makedirs(directory, exist_ok=True)
        self._shard: dict = {}
        self._shard_bytes = 0
        self._ptrs: set[int] = set()
        self._written: list[tuple[str, list[str]]] = []  # (temp path, keys)
        self.total_bytes = 0

    def add(self, key: str, x: np.ndarray) -> None:
        nbytes = x.nbytes
        if self._shard and self._shard_bytes + nbytes > self.max_bytes:
            self._flush()
        ptr = x.__array_interface__["data"][0]
        if ptr in self._ptrs:  # never let two keys share storage (safetensors refuses it)
            x = x.copy()
        self._ptrs.add(x.__array_interface__["data"][0])
        self._shard[key] = numpy_to_torch(x)
        self._shard_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self):
        path = os.path.join(self.directory, f".shard-{len(self._written):05d}.tmp")
        if self.fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(self._shard, path, metadata={"format": "pt"})
        else:
            _torch().save(self._shard, path)
        self._written.append((path, list(self._shard)))
        self._shard, self._shard_bytes, self._ptrs = {}, 0, set()

    def close(self) -> list[str]:
        """Finishes the last shard, names the files, writes the index. Returns the file names."""
        if self._shard or not self._written:
            self._flush()
        n = len(self._written)
        stem, ext = ("model", "safetensors") if self.fmt == "safetensors" else \
            ("pytorch_model", "bin")
        if n == 1:
            names = [f"{stem}.{ext}"]
        else:
            names = [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
        weight_map = {}
        for (tmp, keys), name in zip(self._written, names):
            os.replace(tmp, os.path.join(self.directory, name))
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = SAFE_INDEX if self.fmt == "safetensors" else BIN_INDEX
            with open(os.path.join(self.directory, index), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes},
                           "weight_map": weight_map}, f, indent=2)
        return names
