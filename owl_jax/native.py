"""Builds the project's C++ sources (`owl_jax/csrc/resize.cc`, the CPU decode kernels in
`owl_jax/generate/cpu/decode_kernels.cc`) into shared libraries, once per machine.

Each library is compiled on first use with the system C++ compiler for this machine's CPU
(`-march=native`) and cached under `$OWL_JAX_CACHE` (default `~/.cache/owl_jax`). The cache key
covers the source, the flags, the compiler, the CPU's feature flags (`-march=native` code must
not run on another CPU sharing the cache, e.g. a cluster's home directory) and whatever else the
caller names (the jaxlib version for XLA FFI code). Users of a library fall back to a pure
Python / XLA path when it cannot be built.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

log = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def build(source: str, flags: list[str], key: str = "") -> str:
    """Compiles the C++ file `source` (a name in `owl_jax/csrc`, or a path ending in .cc) with
    `flags` (once) and returns the shared library's path. Raises RuntimeError with the
    compiler's message where it cannot."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler (set CXX)")
    if not source.endswith(".cc"):
        source = os.path.join(CSRC, f"{source}.cc")
    name = os.path.basename(source)[:-3]
    with open(source, "rb") as f:
        src = f.read()
    digest = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), key.encode(),
                                        cpu_flags().encode(), cxx.encode()])).hexdigest()[:16]
    cache = os.environ.get("OWL_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "owl_jax")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"{name}-{digest}.so")
    if not os.path.exists(lib):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [cxx, *flags, "-fPIC", "-shared", source, "-o", tmp]
        log.info("compiling %s once for this CPU (a few seconds): %s", name, lib)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent process sees no half-written library
    return lib
