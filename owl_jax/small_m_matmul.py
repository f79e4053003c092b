"""A CPU matmul kernel for the few rows of a decode step, and the switch that routes to it.

At batch 1 to 8 a decode step is a stream over the LLM's weights. XLA's CPU dot packs the
weights into panels before multiplying, which at M <= 8 rows costs more memory traffic than the
product: a 12-layer 768-wide LLaMA step took 42 ms at batch 8 in XLA's matmuls alone, 25 ms in
this kernel, on 2 cores (see docs/generation.md). `csrc/small_m_matmul.cc` streams the weights
once, in place, on XLA's intra-op threads; it is registered as an XLA FFI target.

The kernel is compiled on first use with the system C++ compiler for this machine's CPU (it needs
AVX-512) and cached under `$OWL_JAX_CACHE` (default `~/.cache/owl_jax`). Where it cannot be
built, or with `OWL_JAX_SMALL_M=0`, `matmul` is `jnp.dot`, with one warning saying why.

Only code that opts in uses it: `Dense` calls `matmul`, which is `jnp.dot` unless the caller
traces inside `enabled()`. The generation engine does for its single-device CPU runs; training
never does (the kernel has no gradient).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

TARGET = "owl_small_m_matmul"
MAX_ROWS = 16  # above this XLA's GEMM is the better kernel
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "small_m_matmul.cc")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-fPIC", "-shared"]

_enabled = contextvars.ContextVar("owl_small_m_matmul", default=False)
_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str (set once)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _build() -> str:
    """Compiles the kernel (once per source, compiler flags, jaxlib and CPU) and returns the
    shared library's path. The key includes the CPU's feature flags because `-march=native`
    code must not run on another CPU sharing the cache (a cluster's home directory)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler (set CXX)")
    with open(SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), jax.__version__.encode(),
                                     _cpu_flags().encode(), cxx.encode()])).hexdigest()[:16]
    cache = os.environ.get("OWL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "owl_jax")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"small_m_matmul-{key}.so")
    if not os.path.exists(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees no half-written library
    return lib


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    with _lock:
        if "ok" not in _state:
            why = ""
            if os.environ.get("OWL_JAX_SMALL_M", "1") == "0":
                why = "OWL_JAX_SMALL_M=0"
            elif platform.machine() not in ("x86_64", "AMD64") or "avx512f" not in _cpu_flags():
                why = "the CPU has no AVX-512"
            else:
                try:
                    lib = ctypes.cdll.LoadLibrary(_build())
                    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.owl_small_m_matmul),
                                                platform="cpu")
                except (OSError, RuntimeError) as e:
                    why = str(e)
            _state.update(ok=not why, why=why)
            if why:
                log.warning("small-M matmul kernel off, XLA's dot is used instead: %s", why)
        return _state["ok"]


@contextlib.contextmanager
def enabled(on: bool = True):
    """Within this context, `matmul` traces to the kernel where it applies."""
    token = _enabled.set(on and available())
    try:
        yield
    finally:
        _enabled.reset(token)


def applies(x, w) -> bool:
    rows = int(np.prod(x.shape[:-1]))
    return (_enabled.get() and x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2
            and 0 < rows <= MAX_ROWS and x.shape[-1] == w.shape[0] > 0 and w.shape[1] > 0)


def kernel(x, w):
    """x [..., K] @ w [K, N] through the kernel (no checks: see `applies`)."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[1],), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w)


def matmul(x, w):
    """`x @ w` for a 2-D `w`: the kernel where it applies, else `jnp.dot`."""
    return kernel(x, w) if applies(x, w) else jnp.dot(x, w)
