"""Peak host memory of `owl-convert` relative to the checkpoint it converts.

Writes a synthetic official checkpoint (default: a mid-size Owl in fp16, about 1.4 GB), converts
it in a fresh subprocess per direction / layout, and prints the child's peak RSS (VmHWM, which
counts file-mapped pages too) as a ratio to the checkpoint's size on disk. Baseline measured in
the same child: its RSS right after the imports, before converting. Goal: peak / size <= 1.5.
The files are deleted afterwards.

    python benchmarks/convert_memory.py [--layouts bin,sharded_safetensors] [--dtype float16]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

CHILD = r"""
import json, sys, time
import torch, safetensors.torch  # noqa: F401 - imported lazily by the converter; a constant
import owl_jax.convert.official, owl_jax.checkpoint  # the imports count in the baseline
def rss():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f
                if l.startswith(("VmRSS", "VmHWM"))}
base = rss()
t = time.time()
direction, src, dst = sys.argv[1:4]
if direction == "torch-to-jax":
    owl_jax.convert.official.torch_to_jax(src, dst, progress=False)
else:
    owl_jax.convert.official.jax_to_torch(src, dst, fmt=sys.argv[4], shard_size=sys.argv[5],
                                  progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
print(json.dumps({"baseline": base["VmRSS"], "seconds": time.time() - t,
                  "peak": rss()["VmHWM"]}))
"""


def mid_config():
    """ViT-L/14 + the released abstractor + a 4-layer, 2048-wide LLaMA (~0.7 B params)."""
    from owl_jax.families.owl1.config import OwlConfig
    from owl_jax.decoder.llama import TextConfig
    return OwlConfig(text=TextConfig(hidden_size=2048, intermediate_size=5504,
                                     num_hidden_layers=4, num_attention_heads=16))


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def weight_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.endswith((".bin", ".safetensors")))


def run_child(*args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-4000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="bin,sharded_safetensors",
                    help="source layouts to measure (bin, sharded_bin, safetensors, "
                         "sharded_safetensors)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shard_size", default="400MB", help="shard size of the sharded sources")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    from owl_jax.testing.checkpoints import write_official_checkpoint
    from owl_jax.convert.torch_io import parse_size

    work = tempfile.mkdtemp(prefix="owl_convert_mem_", dir=args.workdir)
    gb = 1e9
    rows = []
    try:
        for layout in args.layouts.split(","):
            src, jx, back = (os.path.join(work, layout, n) for n in ("src", "jax", "back"))
            t = time.time()
            write_official_checkpoint(src, mid_config(), args.dtype, layout, seed=0,
                                      shard_size=parse_size(args.shard_size))
            size = weight_bytes(src)
            print(f"[{layout}] wrote {size / gb:.2f} GB ({args.dtype}) in {time.time() - t:.0f}s",
                  flush=True)
            r = run_child("torch-to-jax", src, jx)
            rows.append((f"torch-to-jax from {layout}", size, r))
            fmt = "safetensors" if "safetensors" in layout else "bin"
            shard = args.shard_size if layout.startswith("sharded") else "100GB"
            r = run_child("jax-to-torch", jx, back, fmt, shard)
            rows.append((f"jax-to-torch to {layout}", size, r))
            shutil.rmtree(os.path.join(work, layout))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'conversion':<38} {'ckpt GB':>8} {'base GB':>8} {'peak GB':>8} "
          f"{'peak/ckpt':>10} {'(peak-base)/ckpt':>17} {'s':>6}")
    for name, size, r in rows:
        print(f"{name:<38} {size / gb:8.2f} {r['baseline'] / gb:8.2f} {r['peak'] / gb:8.2f} "
              f"{r['peak'] / size:10.2f} {(r['peak'] - r['baseline']) / size:17.2f} "
              f"{r['seconds']:6.0f}")
    worst = max(r["peak"] / size for _, size, r in rows)
    print(f"\nworst peak RSS / checkpoint size: {worst:.2f} (goal <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
