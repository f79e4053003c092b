"""owl-data: convert / stats / preview for image-text sources.

    owl-data convert SPEC OUT_DIR [--workers 4] [--resize 256] [--min-similarity 0.28 ...]
    owl-data stats SPEC [--workers 4] [--no-decode]
    owl-data preview SPEC [--n 16] [--out grid.png]

SPEC is a source spec (`webdataset:/d/{00000..00099}.tar`, `parquet:/d/*.parquet`,
`arrayrecord:/d/converted`, `coco:/d/captions_train2017.json?images=/d/train2017`); see
docs/data.md. Results are printed as JSON on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

import numpy as np

FILTER_FLAGS = (("min_similarity", float), ("min_clip_similarity", float),
                ("min_aesthetic", float), ("max_watermark", float), ("max_nsfw", float),
                ("min_size", int), ("max_aspect_ratio", float))


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("spec", help="source spec, e.g. webdataset:/data/{00000..00009}.tar")
    g = p.add_argument_group("filters (see owl_jax/data/filters.py)")
    for name, typ in FILTER_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    p.add_argument("--allow-missing-caption", action="store_true",
                   help="keep samples without a caption (default: skip, counted)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="images with more pixels are skipped as decompression bombs "
                        "(default: PIL's MAX_IMAGE_PIXELS)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="owl-data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write ArrayRecord shards for global shuffling")
    _add_common(c)
    c.add_argument("out_dir")
    c.add_argument("--workers", type=int, default=1, help="processes, one input shard each")
    c.add_argument("--resize", type=int, default=None,
                   help="shrink images whose short side exceeds this (re-encodes them)")
    c.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    c.add_argument("--no-verify", action="store_true",
                   help="do not decode images (faster; bad images then surface in training)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("stats", help="count samples and skips by reason (JSON)")
    _add_common(s)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--no-decode", action="store_true", help="skip image decoding (faster)")
    s.add_argument("--quiet", action="store_true")
    v = sub.add_parser("preview", help="contact sheet of the first examples with captions")
    _add_common(v)
    v.add_argument("--n", type=int, default=16)
    v.add_argument("--out", default="grid.png")
    v.add_argument("--cols", type=int, default=4)
    v.add_argument("--cell", type=int, default=192, help="thumbnail size in pixels")
    return ap


def _checks(args):
    from owl_jax.data.filters import FilterSpec
    from owl_jax.data.sources import Checks
    filters = FilterSpec.from_kwargs(**{n: getattr(args, n) for n, _ in FILTER_FLAGS})
    return Checks(filters, not args.allow_missing_caption, args.max_pixels)


def contact_sheet(examples: list[dict], cols: int = 4, cell: int = 192):
    """A grid of thumbnails, each with its key and wrapped caption underneath."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps
    try:  # captions are multilingual; DejaVu covers far more of them than Pillow's own font
        font = ImageFont.truetype("DejaVuSans.ttf", 10)
    except OSError:
        font = ImageFont.load_default()
    line_h, n_lines = 12, 5
    chars = max(8, cell // 6)
    rows = max(1, -(-len(examples) // cols))
    cell_h = cell + line_h * (n_lines + 1) + 8
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * cell_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ex in enumerate(examples):
        x, y = 8 + (i % cols) * (cell + 8), 8 + (i // cols) * cell_h
        img = Image.fromarray(np.asarray(ex["image"]))
        img = ImageOps.contain(img, (cell, cell), Image.BICUBIC)
        sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        lines = [str(ex["key"])] + textwrap.wrap(str(ex.get("text") or ""), chars)[:n_lines]
        for j, line in enumerate(lines):
            draw.text((x, y + cell + 4 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from owl_jax.data import shard_tools
    from owl_jax.data.spec import SourceError
    try:
        checks = _checks(args)
        if args.command == "convert":
            out = shard_tools.convert(args.spec, args.out_dir, checks, decode=not args.no_verify,
                                      resize=args.resize, quality=args.quality,
                                      workers=args.workers, progress=not args.quiet)
            print(f"converted {out['samples']} samples into {out['shards']} shards "
                  f"({out['resumed_shards']} already done), skipped "
                  f"{sum(out['skipped'].values())}", file=sys.stderr)
        elif args.command == "stats":
            out = shard_tools.stats(args.spec, checks, decode=not args.no_decode,
                                    workers=args.workers, progress=not args.quiet)
        else:
            out = _preview(args, checks)
    except (SourceError, ValueError) as e:
        print(f"owl-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


def _preview(args, checks) -> dict:
    from owl_jax.data.sources import SampleStream, as_spec, source_units
    spec = as_spec(args.spec)
    stream = SampleStream(spec, *source_units(spec), checks)
    examples = []
    for ex in stream:
        examples.append(ex)
        if len(examples) >= args.n:
            break
    if not examples:
        raise SourceError(f"{spec}: no usable examples (skipped: {dict(stream.skipped)})")
    contact_sheet(examples, args.cols, args.cell).save(args.out)
    return {"out": args.out, "shown": [e["key"] for e in examples],
            "skipped": dict(stream.skipped)}


if __name__ == "__main__":
    sys.exit(main())
