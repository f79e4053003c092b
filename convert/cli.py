"""`owl-convert`: move mPLUG-Owl weights between the official PyTorch layout, HF LLaMA / CLIP
checkpoints and owl_jax checkpoint directories. See docs/convert.md.

  owl-convert torch-to-jax SRC DST [--dtype keep|float32|bfloat16|float16] [--keep_lora]
  owl-convert jax-to-torch SRC DST [--dtype ...] [--format bin|safetensors] [--shard_size 10GB]
  owl-convert from-hf DST [--llama HF_LLAMA_DIR] [--clip HF_CLIP_DIR] [--seed 0]
  owl-convert from-hf-llama HF_LLAMA_DIR DST [--clip HF_CLIP_DIR]
  owl-convert from-hf-clip HF_CLIP_DIR DST [--llama HF_LLAMA_DIR]
"""
from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("keep", "float32", "bfloat16", "float16")


def _dtype(value: str) -> str | None:
    return None if value == "keep" else value


def _add_common(p: argparse.ArgumentParser, dtype_help: str):
    p.add_argument("--dtype", choices=DTYPES, default="keep", help=dtype_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_from_hf(p: argparse.ArgumentParser):
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init parts")
    p.add_argument("--base_config", default=None,
                   help="official config.json (or its directory) giving the sizes of the parts "
                        "not read from HF (abstractor, query tokens, missing tower); "
                        "default: the released 7B config")
    p.add_argument("--clip_eps", action="store_true",
                   help="keep CLIP's LayerNorm eps (1e-5) instead of Owl's ViT eps (1e-6)")
    p.add_argument("--abstractor_layers", type=int, default=None)
    p.add_argument("--abstractor_heads", type=int, default=None)
    p.add_argument("--abstractor_intermediate", type=int, default=None)
    p.add_argument("--num_query_tokens", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    _add_common(p, "stored dtype (keep = as in the HF files; random parts float32)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="owl-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("torch-to-jax", help="official PyTorch layout -> owl_jax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha when SRC has PEFT adapters but no adapter_config.json")
    p.add_argument("--lora_r", type=int, default=None, help="LoRA rank (checked vs the tensors)")
    p.add_argument("--keep_lora", action="store_true",
                   help="store adapters unmerged (lora_a / lora_b) instead of merging them")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p, "stored dtype (default keep: lossless, each tensor as in SRC; training "
                   "casts to float32 on load)")

    p = sub.add_parser("jax-to-torch", help="owl_jax checkpoint -> official PyTorch layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    p.add_argument("--shard_size", default="10GB", help="max bytes per shard (10GB, 500MB, ...)")
    _add_common(p, "dtype of the written tensors (default keep: as stored)")

    p = sub.add_parser("from-hf", help="fresh Owl checkpoint from HF LLaMA and/or CLIP dirs")
    p.add_argument("dst")
    p.add_argument("--llama", default=None, help="HF LlamaForCausalLM directory")
    p.add_argument("--clip", default=None, help="HF CLIPVisionModel / CLIPModel directory")
    _add_from_hf(p)

    p = sub.add_parser("from-hf-llama", help="= from-hf --llama HF_DIR [--clip ...]")
    p.add_argument("llama")
    p.add_argument("dst")
    p.add_argument("--clip", default=None, help="HF CLIPVisionModel / CLIPModel directory")
    _add_from_hf(p)

    p = sub.add_parser("from-hf-clip", help="= from-hf --clip HF_DIR [--llama ...]")
    p.add_argument("clip")
    p.add_argument("dst")
    p.add_argument("--llama", default=None, help="HF LlamaForCausalLM directory")
    _add_from_hf(p)
    return ap


def run(args: argparse.Namespace):
    progress = not args.quiet
    if args.command == "torch-to-jax":
        from owl_jax.convert.official import torch_to_jax
        return torch_to_jax(args.src, args.dst, _dtype(args.dtype), args.lora_alpha, args.lora_r,
                            args.keep_lora, args.overwrite, progress)
    if args.command == "jax-to-torch":
        from owl_jax.convert.official import jax_to_torch
        return {"files": jax_to_torch(args.src, args.dst, _dtype(args.dtype), args.format,
                                      args.shard_size, progress)}
    from owl_jax.convert.from_hf import from_hf
    base = args.base_config
    if base and base.endswith(".json"):
        import os
        base = os.path.dirname(os.path.abspath(base))
    return from_hf(args.dst, args.llama, args.clip, args.seed, base, _dtype(args.dtype),
                   args.clip_eps, args.overwrite, progress,
                   abstractor_layers=args.abstractor_layers,
                   abstractor_heads=args.abstractor_heads,
                   abstractor_intermediate=args.abstractor_intermediate,
                   num_query_tokens=args.num_query_tokens)


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
