"""`owl-data convert` and `owl-data stats`: one pass over every unit (input shard) of a source,
in parallel worker processes, with the same checks as `open_source`.

convert writes one ArrayRecord file per unit, `OUT_DIR/{name}.array_record`, and its counts,
`OUT_DIR/{name}.stats.json`. Both are written under temporary names and renamed into place
(data first, counts last), so a unit is finished iff its `.stats.json` exists; a rerun skips
finished units and redoes the rest. Images are kept encoded as stored, and re-encoded (JPEG,
quality 95) only when needed: a mode other than RGB / L, a format other than JPEG / PNG / WebP,
or a short side above `resize` (then shrunk to `resize`, bicubic, keeping the aspect ratio).
"""
from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
from typing import Any

from PIL import Image
from tqdm import tqdm

from owl_jax.data import images as imgs
from owl_jax.data.sources import Checks, Unit, as_spec, iter_unit, source_units
from owl_jax.data.sources_arrayrecord import pack_record, write_arrayrecord
from owl_jax.data.sources_webdataset import shard_stats
from owl_jax.data.spec import RawSample

KEEP_FORMATS = ("JPEG", "PNG", "WEBP")
KEEP_MODES = ("RGB", "L")


def _reencode(raw: RawSample, img: Image.Image, fmt: str, mode: str, resize: int | None,
              quality: int) -> RawSample:
    too_big = resize is not None and min(img.size) > resize
    if fmt in KEEP_FORMATS and mode in KEEP_MODES and not too_big:
        return raw
    if too_big:
        s = resize / min(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                         Image.BICUBIC)
    meta = {**raw.meta, "reencoded": True, "stored_format": fmt, "stored_mode": mode}
    return RawSample(raw.key, imgs.encode_jpeg(img, quality), raw.text, meta, raw.where)


def scan_unit(unit: Unit, checks: Checks, decode: bool = True, out_dir: str | None = None,
              resize: int | None = None, quality: int = 95) -> dict[str, Any]:
    """Counts (and with out_dir, converts) one unit. Runs in a worker process."""
    counts: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}

    def good_samples():
        for raw in iter_unit(unit):
            reason, detail = checks.check_raw(raw), getattr(raw, "detail", "")
            if not reason and decode:
                try:
                    raw = _reencode(raw, *checks.open_image(raw), resize, quality)
                except imgs.BadImage as e:
                    reason, detail = e.reason, e.detail
            if reason:
                counts[reason] += 1
                examples.setdefault(reason, f"{raw.where}: {detail}" if detail else raw.where)
                continue
            yield raw

    result = {"unit": unit.name, "source": unit.path}
    if out_dir is None:
        result["samples"] = sum(1 for _ in good_samples())
    else:
        final = os.path.join(out_dir, unit.name + ".array_record")
        for stale in glob.glob(glob.escape(final) + ".tmp-*"):  # left by an interrupted run
            os.remove(stale)
        tmp = f"{final}.tmp-{os.getpid()}"
        result["samples"] = write_arrayrecord(tmp, (pack_record(r) for r in good_samples()))
        result["file"] = final
        os.replace(tmp, final)
    result["skipped"] = dict(counts)
    result["skip_examples"] = examples
    if unit.kind == "webdataset":
        result["img2dataset"] = shard_stats(unit.path)
    if out_dir is not None:
        _write_json(os.path.join(out_dir, unit.name + ".stats.json"), result)
    return result


def _write_json(path: str, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _run_task(task):
    return scan_unit(*task)


def _merge(spec, results: list[dict], missing: list[str]) -> dict[str, Any]:
    skipped: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    i2d: collections.Counter = collections.Counter()
    for r in results:
        skipped.update(r["skipped"])
        for k, v in r.get("skip_examples", {}).items():
            examples.setdefault(k, v)
        for k, v in (r.get("img2dataset") or {}).items():
            if k in ("count", "successes", "failed_to_download", "failed_to_resize"):
                i2d[k] += int(v or 0)
    if missing:
        skipped["missing_shard"] += len(missing)
        examples.setdefault("missing_shard", missing[0])
    out = {"spec": str(spec), "shards": len(results), "samples": sum(r["samples"] for r in results),
           "skipped": dict(sorted(skipped.items())), "skip_examples": examples}
    if i2d:
        out["img2dataset"] = dict(i2d)
    return out


def run_units(spec, checks: Checks, *, decode=True, out_dir=None, resize=None, quality=95,
              workers: int = 1, progress: bool = True, desc: str = "shards") -> dict[str, Any]:
    """Runs scan_unit over every unit of `spec` (finished conversion units are read back, not
    redone), `workers` processes at a time; returns the merged counts."""
    spec = as_spec(spec)
    units, missing = source_units(spec)
    results, todo = [], []
    for u in units:
        done = out_dir and _finished(out_dir, u.name)
        if done:
            results.append(done)
        else:
            todo.append((u, checks, decode, out_dir, resize, quality))
    bar = tqdm(total=len(units), initial=len(results), desc=desc, unit="shard",
               disable=not progress)
    samples = sum(r["samples"] for r in results)

    def done(r):
        nonlocal samples
        results.append(r)
        samples += r["samples"]
        bar.update(1)
        bar.set_postfix(samples=samples)

    if workers <= 1 or len(todo) <= 1:
        for t in todo:
            done(_run_task(t))
    else:
        # spawn: forking a process that holds pyarrow / grain threads can deadlock
        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for r in pool.imap_unordered(_run_task, todo):
                done(r)
    bar.close()
    results.sort(key=lambda r: r["unit"])
    summary = _merge(spec, results, missing)
    summary["resumed_shards"] = len(units) - len(todo)
    return summary


def _finished(out_dir: str, name: str) -> dict | None:
    stats = os.path.join(out_dir, name + ".stats.json")
    if not (os.path.exists(stats) and os.path.exists(os.path.join(out_dir, name + ".array_record"))):
        return None
    try:
        with open(stats) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def convert(spec, out_dir: str, checks: Checks | None = None, **kw) -> dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    summary = run_units(spec, checks or Checks(), out_dir=out_dir, desc="convert", **kw)
    summary["out_dir"] = out_dir
    _write_json(os.path.join(out_dir, "convert_summary.json"), summary)
    return summary


def stats(spec, checks: Checks | None = None, **kw) -> dict[str, Any]:
    return run_units(spec, checks or Checks(), desc="stats", **kw)
