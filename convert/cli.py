"""`owl-convert`: move weights between each model family's PyTorch layouts (official, HF), HF
LLaMA / CLIP checkpoints and owl_jax checkpoint directories. See docs/convert.md.

  owl-convert torch-to-jax SRC DST [--dtype keep|float32|bfloat16|float16] [family flags]
  owl-convert jax-to-torch SRC DST [--dtype ...] [--format bin|safetensors] [--shard_size 10GB]
  owl-convert from-hf DST [--family NAME] [--llama HF_LLAMA_DIR] [--clip HF_CLIP_DIR] [--seed 0]
  owl-convert from-hf-llama HF_LLAMA_DIR DST [--clip HF_CLIP_DIR]     (= from-hf --llama ...)
  owl-convert from-hf-clip HF_CLIP_DIR DST [--llama HF_LLAMA_DIR]     (= from-hf --clip ...)

Each family's converter (the module its `Family.converter` names) brings its own flags and its
code: `CLI_FLAGS = {command: [(flag names, argparse kwargs), ...]}` for the commands it has,
`is_source(src)` (does torch-to-jax SRC belong to it) and `cli_run(command, args, progress)`.
torch-to-jax tells the family from SRC (the default family when no other claims it),
jax-to-torch from the family SRC/owl_jax.json records, from-hf from --family. A flag of another
family is an error.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from owl_jax import families

DTYPES = ("keep", "float32", "bfloat16", "float16")
COMMANDS = ("torch-to-jax", "jax-to-torch", "from-hf")


def dtype_arg(value: str) -> str | None:
    """The --dtype flag's value as the converters take it (None = keep)."""
    return None if value == "keep" else value


def converters() -> dict:
    """{family name: its converter module}, for the families that have one."""
    return {name: importlib.import_module(families.get(name).converter)
            for name in families.NAMES if families.get(name).converter}


def _add_common(p: argparse.ArgumentParser, dtype_help: str, overwrite: bool = True):
    p.add_argument("--dtype", choices=DTYPES, default="keep", help=dtype_help)
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_family_flags(p: argparse.ArgumentParser, command: str, convs: dict) -> dict:
    """Adds every family's flags of `command`; returns {dest: the families that read it}. A flag
    several families take is added once, with their choices joined (e.g. --layout)."""
    flags: dict[str, tuple] = {}
    owners: dict[str, list] = {}
    for name, conv in convs.items():
        for names, kwargs in conv.CLI_FLAGS.get(command, ()):
            dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
            owners.setdefault(dest, []).append(name)
            if dest not in flags:
                flags[dest] = (names, dict(kwargs))
            elif "choices" in kwargs:
                merged = flags[dest][1]
                merged["choices"] = tuple(dict.fromkeys((*merged["choices"], *kwargs["choices"])))
                merged["help"] = f"{merged.get('help', '')}; {name}: {kwargs.get('help', '')}"
    for dest, (names, kwargs) in flags.items():
        if "help" in kwargs and len(owners[dest]) == 1:
            kwargs["help"] = f"({owners[dest][0]}) {kwargs['help']}"
        p.add_argument(*names, **kwargs)
    return {dest: set(names) for dest, names in owners.items()}


def build_parser() -> argparse.ArgumentParser:
    convs = converters()
    ap = argparse.ArgumentParser(prog="owl-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("torch-to-jax", help="a family's PyTorch layout -> owl_jax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    _add_common(p, "stored dtype (default keep: lossless, each tensor as in SRC; training "
                   "casts to float32 on load)")
    p.set_defaults(owners=_add_family_flags(p, "torch-to-jax", convs))

    p = sub.add_parser("jax-to-torch", help="owl_jax checkpoint -> its family's PyTorch layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=("bin", "safetensors"), default=None,
                   help="file format (default: the family's usual one)")
    p.add_argument("--shard_size", default="10GB", help="max bytes per shard (10GB, 500MB, ...)")
    _add_common(p, "dtype of the written tensors (default keep: as stored)", overwrite=False)
    p.set_defaults(owners=_add_family_flags(p, "jax-to-torch", convs))

    for command, positional in (("from-hf", None), ("from-hf-llama", "llama"),
                                ("from-hf-clip", "clip")):
        p = sub.add_parser(command, help="a fresh checkpoint from HF LLaMA / vision-tower dirs"
                           if positional is None else f"= from-hf --{positional} HF_DIR ...")
        if positional:
            p.add_argument(positional)
        p.add_argument("dst")
        builders = [n for n, conv in convs.items() if "from-hf" in conv.CLI_FLAGS]
        p.add_argument("--family", choices=builders, default=families.DEFAULT,
                       help=f"the model to build (default {families.DEFAULT})")
        if positional != "llama":
            p.add_argument("--llama", default=None, help="HF LlamaForCausalLM directory")
        if positional != "clip":
            p.add_argument("--clip", default=None, help="HF CLIPVisionModel / CLIPModel "
                                                        "directory")
        p.add_argument("--seed", type=int, default=0, help="seed of the random-init parts")
        _add_common(p, "stored dtype (keep = as in the HF files; random parts float32)")
        p.set_defaults(owners=_add_family_flags(p, "from-hf", convs))
    return ap


def _refuse_others(args, family: str):
    """A flag only other families read is an error, not silently ignored."""
    for dest, owners in args.owners.items():
        if family not in owners and getattr(args, dest, None) not in (None, False):
            flag = "--" + dest
            raise ValueError(f"{flag} does not apply to family {family} (it is "
                             f"{' / '.join(sorted(owners))}'s)")


def _family_of_source(src: str, convs: dict) -> str:
    for name, conv in convs.items():
        if name != families.DEFAULT and conv.is_source(src):
            return name
    return families.DEFAULT


def run(args: argparse.Namespace):
    convs = converters()
    command = "from-hf" if args.command.startswith("from-hf") else args.command
    if command == "torch-to-jax":
        family = _family_of_source(args.src, convs)
    elif command == "jax-to-torch":
        family = families.name_of_checkpoint(args.src)
        if family not in convs:
            raise ValueError(f"{args.src}: family {family!r} has no PyTorch converter")
    else:
        family = args.family
    _refuse_others(args, family)
    return convs[family].cli_run(command, args, not args.quiet)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # CheckpointError is a ValueError: bad input gets one clear message, not a traceback.
        print(f"owl-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
