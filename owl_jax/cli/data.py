"""owl-data: convert / stats / preview for image-text sources.

    owl-data convert SPEC OUT_DIR [--workers 4] [--resize 256] [--min_similarity 0.28 ...]
    owl-data stats SPEC [--workers 4] [--no_decode]
    owl-data preview SPEC [--n 16] [--out grid.png] [--overwrite]

SPEC is a source spec (`webdataset:/d/{00000..00099}.tar`, `parquet:/d/*.parquet`,
`arrayrecord:/d/converted`, `coco:/d/captions_train2017.json?images=/d/train2017`); see
docs/data.md. Results are printed as JSON on stdout; progress goes to stderr. Flags are spelled
with underscores like every owl-jax tool; the older dashed spellings (`--min-similarity`) are
still accepted but not shown.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

import numpy as np

from owl_jax.data.filters import HELP as FILTER_HELP

FILTER_FLAGS = (("min_similarity", float), ("min_clip_similarity", float),
                ("min_aesthetic", float), ("max_watermark", float), ("max_nsfw", float),
                ("min_size", int), ("max_aspect_ratio", float))

EPILOG = """\
source specs:
  webdataset:/d/laion/{00000..00099}.tar     img2dataset webdataset shards
  parquet:/d/coyo/*.parquet                  img2dataset parquet shards
  arrayrecord:/d/converted                   shards written by `owl-data convert`
  coco:/d/captions_train2017.json?images=/d/train2017
                                             COCO captions + a local image folder
See docs/data.md for the options of each kind and the skip reasons.
"""


def _flag(p, name: str, **kw):
    """`--name` with underscores, plus the dashed spelling as a hidden alias."""
    p.add_argument("--" + name, dest=name, **kw)
    if "_" in name:
        alias = {k: v for k, v in kw.items() if k in ("type", "action", "metavar")}
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS, **alias)


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("spec", metavar="SPEC",
                   help="source spec, e.g. webdataset:/data/{00000..00009}.tar")
    g = p.add_argument_group("filters", _wrap(
        "Metadata and size thresholds (docs/data.md). A threshold applies only to samples that "
        "have one of its columns; skipped samples are counted as filtered_<name>."))
    for name, typ in FILTER_FLAGS:
        metavar, what = FILTER_HELP[name]
        _flag(g, name, type=typ, default=None, metavar=metavar,
              help=f"{what} (default: %(default)s = off)")
    _flag(p, "allow_missing_caption", action="store_true",
          help="keep samples without a caption (default: skip them, counted as missing_caption)")
    _flag(p, "max_pixels", type=int, default=None, metavar="N",
          help="skip images with more than N pixels as decompression bombs (default: "
               "%(default)s = PIL's MAX_IMAGE_PIXELS, about 89.5 M)")


def _wrap(text: str) -> str:
    return textwrap.fill(text, 78)


def _subparser(sub, name: str, help: str, description: str):
    return sub.add_parser(name, help=help, description=_wrap(description), epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="owl-data", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Convert, count or preview image-text sources. Results are printed "
                          "as JSON on stdout, progress on stderr. `owl-data COMMAND --help` "
                          "lists the flags of a command."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_stats(sub)
    _add_preview(sub)
    return ap


def _add_convert(sub):
    c = _subparser(sub, "convert", "write ArrayRecord shards for global shuffling",
                   "Write one ArrayRecord shard per input shard into OUT_DIR (resumable: "
                   "finished shards are kept on a rerun). Train on arrayrecord:OUT_DIR.")
    _add_common(c)
    c.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created if missing)")
    c.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes, one input shard each (default: %(default)s)")
    c.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="shrink images whose short side exceeds PX, re-encoding them "
                        "(default: %(default)s = keep the stored size)")
    c.add_argument("--quality", type=int, default=95, metavar="Q",
                   help="JPEG quality of re-encoded images (default: %(default)s)")
    _flag(c, "no_verify", action="store_true",
          help="do not decode images (faster; bad images then surface in training)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_stats(sub):
    s = _subparser(sub, "stats", "count samples and skips by reason (JSON)",
                   "Count the usable samples of a source and its skips by reason, with one "
                   "example location per reason.")
    _add_common(s)
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes, one input shard each (default: %(default)s)")
    _flag(s, "no_decode", action="store_true",
          help="do not decode images (faster; bad images are then not counted)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_preview(sub):
    v = _subparser(sub, "preview", "contact sheet of the first examples with captions",
                   "Draw the first usable examples with their keys and captions into one "
                   "image file.")
    _add_common(v)
    v.add_argument("--n", type=int, default=16, metavar="N",
                   help="examples to show (default: %(default)s)")
    v.add_argument("--out", default="grid.png", metavar="FILE",
                   help="image file to write; its extension picks the format "
                        "(default: %(default)s)")
    v.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (default: refuse)")
    v.add_argument("--cols", type=int, default=4, metavar="N",
                   help="thumbnails per row (default: %(default)s)")
    v.add_argument("--cell", type=int, default=192, metavar="PX",
                   help="thumbnail size in pixels (default: %(default)s)")


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
    from owl_jax.data.spec import SourceError
    out = os.path.abspath(args.out)
    _check_writable(out, args.overwrite)
    spec = as_spec(args.spec)
    stream = SampleStream(spec, *source_units(spec), checks)
    examples = []
    for ex in stream:
        examples.append(ex)
        if len(examples) >= args.n:
            break
    if not examples:
        raise SourceError(f"{spec}: no usable examples (skipped: {dict(stream.skipped)})")
    _check_writable(out, args.overwrite)
    try:
        contact_sheet(examples, args.cols, args.cell).save(out)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot write {out}: {e}") from None
    print(f"wrote {out} ({len(examples)} examples)", file=sys.stderr)
    return {"out": out, "shown": [e["key"] for e in examples], "skipped": dict(stream.skipped)}


def _check_writable(path: str, overwrite: bool):
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose "
                         f"another --out")


if __name__ == "__main__":
    sys.exit(main())
