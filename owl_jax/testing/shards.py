"""Writes small data shards in the real img2dataset / COCO layouts, with planted bad samples,
for tests, demos and benchmarks. Every writer returns a manifest of what a correct reader
must see: `samples` {key: caption} of good samples, `skipped` {reason: count}.

Bad samples that can be planted (`bad=` list of reasons, one sample each):
  truncated_image, undecodable_image, missing_caption, decompression_bomb.
Odd image modes that a reader must convert, not skip (`modes=`): P, RGBA, L, CMYK, I;16, LA.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

LAION_EXTRA = ("NSFW", "similarity", "LICENSE")
COYO_EXTRA = ("clip_similarity_vitb32", "clip_similarity_vitl14", "nsfw_score_opennsfw2",
              "nsfw_score_gantman", "watermark_score", "aesthetic_score_laion_v2")
_WORDS = "a red bus dog on the street two cats sleeping green field man with hat near sea".split()


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields, a few flat shapes and mild noise: compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0, 255, (3, 3))
    img = np.stack([c[k, 0] + (c[k, 1] - c[k, 0]) * x / width * np.cos(y / height * c[k, 2] / 40)
                    for k in range(3)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        img[y0:y0 + height // 4, x0:x0 + width // 4] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr_or_img, fmt="JPEG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_mode_image(rng, mode: str, width: int, height: int) -> tuple[bytes, str]:
    """(bytes, ext) of an image stored in `mode`."""
    rgb = Image.fromarray(natural_image(rng, width, height))
    if mode == "CMYK":
        return encode(rgb.convert("CMYK"), "JPEG", quality=90), "jpg"
    if mode == "I;16":
        a = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        return encode(Image.fromarray(a), "PNG"), "png"  # uint16 -> mode I;16
    if mode == "P":
        return encode(rgb.convert("P", palette=Image.ADAPTIVE), "PNG"), "png"
    if mode in ("RGBA", "LA"):
        img = rgb.convert(mode)
        alpha = Image.fromarray((np.arange(width)[None, :].repeat(height, 0) * 255 // width)
                                .astype(np.uint8))
        img.putalpha(alpha)
        return encode(img, "PNG"), "png"
    return encode(rgb.convert(mode), "PNG"), "png"


def bad_image(rng, reason: str, width: int, height: int) -> bytes:
    good = encode(natural_image(rng, width, height), "JPEG", quality=90)
    if reason == "truncated_image":
        return good[: len(good) // 2]
    if reason == "undecodable_image":
        return rng.bytes(2000)
    if reason == "decompression_bomb":
        return _patch_jpeg_size(good, 60000, 60000)
    raise ValueError(reason)


def _patch_jpeg_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrites the SOF0 frame size: a tiny file whose header claims w x h pixels."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 9:]


def _size(rng, size) -> tuple[int, int]:
    """size: an int (square) or (lo, hi), each side drawn from lo..hi."""
    if isinstance(size, int):
        return size, size
    return int(rng.integers(size[0], size[1] + 1)), int(rng.integers(size[0], size[1] + 1))


def caption(rng) -> str:
    return " ".join(rng.choice(_WORDS, rng.integers(3, 9)))


def _plan(rng, n_shards, per_shard, failure_rate, bad, modes):
    """Rows per shard: (shard, row, kind) with kind 'ok', 'failed', 'bad:<reason>', 'mode:<m>'."""
    kinds = (["bad:" + b for b in bad] + ["mode:" + m for m in modes])
    rows = []
    for s in range(n_shards):
        for r in range(per_shard):
            rows.append([s, r, "failed" if rng.random() < failure_rate else "ok"])
    ok = [row for row in rows if row[2] == "ok"]
    for row, kind in zip(rng.permutation(len(ok))[:len(kinds)], kinds):
        ok[row][2] = kind
    return rows


def _sample(rng, shard, row, kind, size, extra):
    key = f"{shard * 10**4 + row:09d}"
    w, h = _size(rng, size)
    text = caption(rng)
    meta = {"url": f"https://example.com/{key}.jpg", "caption": text}
    meta.update(extra(rng) if extra else {})
    meta.update(key=key, status="success", error_message=None, width=w, height=h,
                original_width=w * 2, original_height=h * 2, exif="{}", sha256=key * 7)
    ext = "jpg"
    if kind == "failed":
        meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found",
                    width=None, height=None, original_width=None, original_height=None)
        return key, None, ext, text, meta
    if kind.startswith("bad:"):
        reason = kind[4:]
        if reason == "missing_caption":
            image, text = encode(natural_image(rng, w, h), "JPEG", quality=90), None
            meta["caption"] = None
        else:
            image = bad_image(rng, reason, w, h)
    elif kind.startswith("mode:"):
        image, ext = odd_mode_image(rng, kind[5:], w, h)
    else:
        image = encode(natural_image(rng, w, h), "JPEG", quality=90)
    return key, image, ext, text, meta


def laion_extra(rng) -> dict:
    return {"NSFW": str(rng.choice(["UNLIKELY", "UNSURE", "NSFW"])),
            "similarity": float(np.round(rng.uniform(0.2, 0.45), 4)), "LICENSE": "?"}


def coyo_extra(rng) -> dict:
    return {c: float(np.round(rng.uniform(0.0, 1.0) if "score" in c else rng.uniform(0.2, 0.4), 4))
            if "aesthetic" not in c else float(np.round(rng.uniform(3.0, 7.0), 3))
            for c in COYO_EXTRA}


def _manifest(samples):
    m = {"samples": {}, "skipped": {}, "modes": {}, "meta": {}, "bad": {}}
    for key, image, ext, text, meta, kind in samples:
        if kind == "ok" or kind.startswith("mode:"):
            m["samples"][key] = text
            m["meta"][key] = meta
            if kind.startswith("mode:"):
                m["modes"][key] = kind[5:]
        else:
            reason = "failed_to_download" if kind == "failed" else kind[4:]
            if kind != "failed":
                m["bad"][key] = (reason, meta)
            m["skipped"][reason] = m["skipped"].get(reason, 0) + 1
    return m


def write_webdataset(out_dir, n_shards=2, per_shard=20, seed=0, failure_rate=0.15, bad=(),
                     modes=(), size=(48, 80), extra=laion_extra, truncate_last=False) -> dict:
    """img2dataset `--output_format webdataset` layout: {shard:05d}.tar (+ .parquet sidecar with
    every row, + _stats.json). Failed rows are absent from the tar, as img2dataset does; they
    appear in the manifest's `failed` count, not in `skipped` (a tar reader cannot see them).
    `truncate_last` cuts the last tar in the middle of its last image (one `truncated_tar`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = _plan(rng, n_shards, per_shard, failure_rate, bad, modes)
    all_samples = []
    for s in range(n_shards):
        shard_rows = [r for r in rows if r[0] == s]
        samples = [(*_sample(rng, s, r, k, size, extra), k) for _s, r, k in shard_rows]
        samples = [samples[i] for i in rng.permutation(len(samples))]  # completion order
        tar_path = os.path.join(out_dir, f"{s:05d}.tar")
        with tarfile.open(tar_path, "w") as tf:
            for key, image, ext, text, meta, kind in samples:
                if kind == "failed":
                    continue
                members = [(f"{key}.{ext}", image)]
                if text is not None:
                    members.append((f"{key}.txt", text.encode()))
                members.append((f"{key}.json", json.dumps(meta, indent=4).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tf.addfile(info, io.BytesIO(data))
        pq.write_table(pa.Table.from_pylist([m for _, _, _, _, m, _ in samples]),
                       os.path.join(out_dir, f"{s:05d}.parquet"))
        failed = sum(k == "failed" for *_, k in samples)
        with open(os.path.join(out_dir, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": len(samples), "successes": len(samples) - failed,
                       "failed_to_download": failed, "failed_to_resize": 0, "duration": 1.0,
                       "status_dict": {"success": len(samples) - failed}}, f, indent=4)
        all_samples += samples
    manifest = _manifest(all_samples)
    manifest["failed"] = manifest["skipped"].pop("failed_to_download", 0)
    manifest["files"] = [os.path.join(out_dir, f"{s:05d}.tar") for s in range(n_shards)]
    if truncate_last:
        _truncate_tar(manifest, all_samples, n_shards)
    return manifest


def _truncate_tar(manifest, all_samples, n_shards):
    """Cut the last shard inside the data of its last sample's image."""
    path = manifest["files"][-1]
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    last_key = members[-1].name.split(".")[0]
    image_member = next(m for m in members if m.name.split(".")[0] == last_key)
    with open(path, "r+b") as f:
        f.truncate(image_member.offset_data + image_member.size // 2)
    if last_key in manifest["samples"]:
        del manifest["samples"][last_key]
    else:  # a planted bad sample: it now counts as truncated instead
        kind = next(k for key, *_, k in all_samples if key == last_key)
        manifest["skipped"][kind[4:]] -= 1
        if not manifest["skipped"][kind[4:]]:
            del manifest["skipped"][kind[4:]]
    manifest["skipped"]["truncated_tar"] = 1
    manifest["truncated_key"] = last_key


def write_parquet(out_dir, n_shards=2, per_shard=30, seed=1, failure_rate=0.2, bad=(), modes=(),
                  size=(48, 80), extra=coyo_extra) -> dict:
    """img2dataset `--output_format parquet` layout (COYO columns by default): one
    {shard:05d}.parquet per shard with every row; failed rows have status != success and a null
    `jpg`; row groups of 100 rows as img2dataset's buffered writer makes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = _plan(rng, n_shards, per_shard, failure_rate, bad, modes)
    all_samples, files = [], []
    for s in range(n_shards):
        samples = [(*_sample(rng, s, r, k, size, extra), k) for shard, r, k in rows if shard == s]
        samples = [samples[i] for i in rng.permutation(len(samples))]
        table = [{**meta, "txt": text, "jpg": image} for key, image, ext, text, meta, k in samples]
        path = os.path.join(out_dir, f"{s:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(table), path, row_group_size=100)
        files.append(path)
        all_samples += samples
    manifest = _manifest(all_samples)
    manifest["files"] = files
    return manifest


def write_coco(out_dir, n_images=6, captions_per_image=2, seed=2, karpathy=False,
               missing_images=1, size=(48, 80)) -> dict:
    """`annotations/captions_train2017.json` (or Karpathy `dataset_coco.json` with train/val/
    test/restval splits) + an image folder; `missing_images` image files are not written."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out_dir, "train2014" if karpathy else "train2017")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, anns, kimages = [], [], []
    manifest = {"samples": {}, "skipped": {}, "splits": {}}
    for i in range(n_images):
        image_id = 1000 + 7 * i
        name = f"COCO_train2014_{image_id:012d}.jpg" if karpathy else f"{image_id:012d}.jpg"
        w, h = _size(rng, size)
        missing = i < missing_images
        if not missing:
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(encode(natural_image(rng, w, h), "JPEG", quality=90))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        split = ["train", "restval", "val", "test"][i % 4]
        sents = []
        for j in range(captions_per_image):
            cid, text = 50_000 + 10 * i + j, caption(rng)
            anns.append({"id": cid, "image_id": image_id, "caption": text})
            sents.append({"raw": text, "tokens": text.split(), "imgid": i, "sentid": cid})
            key = f"{image_id}_{cid}"
            if missing:
                manifest["skipped"]["missing_image"] = manifest["skipped"].get("missing_image", 0) + 1
            else:
                manifest["samples"][key] = text
                manifest["splits"][key] = split
        kimages.append({"filepath": "train2014", "filename": name, "imgid": i, "split": split,
                        "sentids": [s["sentid"] for s in sents], "sentences": sents,
                        "cocoid": image_id})
    if karpathy:
        path = os.path.join(out_dir, "dataset_coco.json")
        data = {"images": kimages, "dataset": "coco"}
    else:
        path = os.path.join(out_dir, "annotations", "captions_train2017.json")
        data = {"info": {}, "licenses": [], "images": images, "annotations": anns}
    with open(path, "w") as f:
        json.dump(data, f)
    manifest["annotations"], manifest["images"] = path, out_dir if karpathy else img_dir
    return manifest


def write_llava(path, image_names, n=6, seed=3, missing=("missing.jpg",)) -> dict:
    """LLaVA-Instruct style json (`{"id", "image", "conversations": [{"from", "value"}]}`)
    over `image_names` (files of a local image folder), plus records pointing at `missing`
    image files and one text-only record. Manifest: `answers` {id: first answer}."""
    rng = np.random.default_rng(seed)
    recs, answers = [], {}
    for i in range(n + len(missing)):
        name = image_names[i % len(image_names)] if i < n else missing[i - n]
        q, a = caption(rng) + "?", caption(rng) + "."
        first = f"<image>\n{q}" if i % 2 == 0 else f"{q}\n<image>"
        recs.append({"id": f"r{i}", "image": name, "conversations": [
            {"from": "human", "value": first}, {"from": "gpt", "value": a},
            {"from": "human", "value": caption(rng) + "?"}, {"from": "gpt", "value": caption(rng)}]})
        if i < n:
            answers[f"r{i}"] = a
    recs.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "hello?"}, {"from": "gpt", "value": "hi there."}]})
    with open(path, "w") as f:
        json.dump(recs, f)
    return {"answers": answers, "records": len(recs), "missing": len(missing)}
