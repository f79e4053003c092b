"""`owl-convert`: move mPLUG-Owl, LLaVA and MiniGPT-4 weights between their PyTorch layouts,
HF LLaMA / CLIP checkpoints and owl_jax checkpoint directories. See docs/convert.md.

  owl-convert torch-to-jax SRC DST [--dtype keep|float32|bfloat16|float16] [--keep_lora]
                                   [--clip HF_CLIP_DIR]   (original-layout LLaVA)
                                   [--llama HF_LLAMA_DIR] [--vit_heads N] [--qformer_heads N]
                                   (MiniGPT-4's LAVIS .pth files)
  owl-convert jax-to-torch SRC DST [--dtype ...] [--format bin|safetensors] [--shard_size 10GB]
                                   [--layout hf|original|lavis]   (LLaVA, MiniGPT-4)
  owl-convert from-hf DST [--family owl1|llava] [--llama HF_LLAMA_DIR] [--clip HF_CLIP_DIR]
                          [--seed 0] [--projector linear|mlp2x_gelu] [--image_token]
  owl-convert from-hf-llama HF_LLAMA_DIR DST [--clip HF_CLIP_DIR]
  owl-convert from-hf-clip HF_CLIP_DIR DST [--llama HF_LLAMA_DIR]

torch-to-jax tells the model from SRC/config.json (LLaVA: model_type "llava" or
LlavaLlamaForCausalLM; MiniGPT-4: model_type "blip-2") or, for MiniGPT-4's release, from SRC's
.pth files (eva_vit_g.pth, blip2_pretrained*.pth, *minigpt4*.pth; without the last, llama_proj
is drawn fresh: stage 1's start); jax-to-torch from the family SRC/owl_jax.json records.
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


# from-hf flags that only one family reads (checked: giving one to the other is an error)
OWL_FROM_HF = ("base_config", "clip_eps", "abstractor_layers", "abstractor_heads",
               "abstractor_intermediate", "num_query_tokens")
LLAVA_FROM_HF = ("projector", "image_token", "image_aspect_ratio", "vision_feature_layer",
                 "vision_feature_select_strategy")


def _add_from_hf(p: argparse.ArgumentParser):
    p.add_argument("--family", choices=("owl1", "llava"), default="owl1",
                   help="the model to build (default owl1, mPLUG-Owl)")
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
    g = p.add_argument_group("LLaVA (--family llava; needs --llama and --clip)")
    g.add_argument("--projector", choices=("linear", "mlp2x_gelu"), default=None,
                   help="linear (LLaVA v1) or mlp2x_gelu (LLaVA-1.5, the default)")
    g.add_argument("--image_token", action="store_true", default=None,
                   help="add one vocabulary row for <image> (llava-hf style; initialised as the "
                        "mean of the existing rows); default: no image row (original style)")
    g.add_argument("--image_aspect_ratio", choices=("square", "pad"), default=None,
                   help="image transform (default: pad with mlp2x_gelu, square with linear)")
    g.add_argument("--vision_feature_layer", type=int, default=None,
                   help="the CLIP hidden state fed to the projector (default -2)")
    g.add_argument("--vision_feature_select_strategy", choices=("default", "full"),
                   default=None, help="default drops the CLS token (default), full keeps it")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p, "stored dtype (keep = as in the HF files; random parts float32)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="owl-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("torch-to-jax", help="PyTorch layout (mPLUG-Owl official, llava-hf, "
                                            "original LLaVA) -> owl_jax checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--clip", default=None,
                   help="original-layout LLaVA: the CLIP tower's HF directory (default: "
                        "mm_vision_tower when it is a local directory, else SRC/vision_tower)")
    g = p.add_argument_group("MiniGPT-4 LAVIS layout (.pth files in SRC)")
    g.add_argument("--llama", default=None,
                   help="the Vicuna / LLaMA HF directory (default SRC/vicuna)")
    g.add_argument("--vit_heads", type=int, default=None,
                   help="EVA ViT heads (default: width / 88, or SRC/owl_jax_minigpt4.json)")
    g.add_argument("--qformer_heads", type=int, default=None,
                   help="Q-Former heads (default: width / 64, or SRC/owl_jax_minigpt4.json)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of a fresh llama_proj (SRC without a MiniGPT-4 .pth)")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha when SRC has PEFT adapters but no adapter_config.json")
    p.add_argument("--lora_r", type=int, default=None, help="LoRA rank (checked vs the tensors)")
    p.add_argument("--keep_lora", action="store_true",
                   help="store adapters unmerged (lora_a / lora_b) instead of merging them")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p, "stored dtype (default keep: lossless, each tensor as in SRC; training "
                   "casts to float32 on load)")

    p = sub.add_parser("jax-to-torch", help="owl_jax checkpoint -> its PyTorch layout")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--layout", choices=("hf", "original", "lavis"), default=None,
                   help="LLaVA: llava-hf (LlavaForConditionalGeneration) or the original "
                        "LlavaLlamaForCausalLM + CLIP tower in DST/vision_tower; MiniGPT-4: hf "
                        "(Blip2ForConditionalGeneration) or lavis (MiniGPT-4's .pth files + "
                        "DST/vicuna) (default: the layout it was converted from, else hf where "
                        "it can hold the model)")
    p.add_argument("--format", choices=("bin", "safetensors"), default=None,
                   help="default: safetensors for llava-hf, bin otherwise")
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


def _refuse_flags(args, flags, family):
    """The from-hf flags of one family are an error with the other."""
    given = [f for f in flags if getattr(args, f, None) not in (None, False)]
    if given:
        raise ValueError(f"--{given[0]} does not apply to --family {family}")


def run(args: argparse.Namespace):
    progress = not args.quiet
    if args.command == "torch-to-jax":
        from owl_jax.convert import llava, minigpt4
        mg_flags = args.llama or args.vit_heads or args.qformer_heads or args.seed
        if minigpt4.is_minigpt4_source(args.src):
            if args.keep_lora or args.lora_alpha is not None or args.lora_r is not None \
                    or args.clip:
                raise ValueError("LoRA flags and --clip do not apply to MiniGPT-4 checkpoints")
            return minigpt4.torch_to_jax(args.src, args.dst, args.llama, args.vit_heads,
                                         args.qformer_heads, _dtype(args.dtype), args.overwrite,
                                         progress, args.seed)
        if mg_flags:
            raise ValueError(f"--llama / --vit_heads / --qformer_heads / --seed apply to "
                             f"MiniGPT-4's .pth files; {args.src} holds none")
        if llava.is_llava_source(args.src):
            if args.keep_lora or args.lora_alpha is not None or args.lora_r is not None:
                raise ValueError("LoRA flags apply to mPLUG-Owl checkpoints only")
            return llava.torch_to_jax(args.src, args.dst, args.clip, _dtype(args.dtype),
                                      args.overwrite, progress)
        if args.clip:
            raise ValueError(f"--clip applies to original-layout LLaVA checkpoints; "
                             f"{args.src}/config.json is not a LLaVA config")
        from owl_jax.convert.official import torch_to_jax
        return torch_to_jax(args.src, args.dst, _dtype(args.dtype), args.lora_alpha, args.lora_r,
                            args.keep_lora, args.overwrite, progress)
    if args.command == "jax-to-torch":
        from owl_jax import families
        converter = CONVERTERS.get(families.name_of_checkpoint(args.src))
        if converter is not None:
            return {"files": converter().jax_to_torch(args.src, args.dst, args.layout,
                                                      _dtype(args.dtype), args.format,
                                                      args.shard_size, progress)}
        if args.layout:
            raise ValueError("--layout applies to LLaVA and MiniGPT-4 checkpoints (mPLUG-Owl "
                             "has one layout, the official one)")
        from owl_jax.convert.official import jax_to_torch
        return {"files": jax_to_torch(args.src, args.dst, _dtype(args.dtype),
                                      args.format or "bin", args.shard_size, progress)}
    return FROM_HF[args.family](args, progress)


def _llava_from_hf(args, progress):
    _refuse_flags(args, OWL_FROM_HF, "llava")
    from owl_jax.convert import llava
    return llava.from_hf(args.dst, args.llama, args.clip, args.projector or "mlp2x_gelu",
                         args.seed, bool(args.image_token), args.image_aspect_ratio,
                         -2 if args.vision_feature_layer is None else args.vision_feature_layer,
                         args.vision_feature_select_strategy or "default",
                         _dtype(args.dtype), args.overwrite, progress)


def _owl1_from_hf(args, progress):
    _refuse_flags(args, LLAVA_FROM_HF, "owl1")
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


# `from-hf --family NAME`: what builds a fresh model of each family from HF parts.
FROM_HF = {"owl1": _owl1_from_hf, "llava": _llava_from_hf}


def _llava_converter():
    from owl_jax.convert import llava
    return llava


def _minigpt4_converter():
    from owl_jax.convert import minigpt4
    return minigpt4


# Families whose checkpoints have converters besides mPLUG-Owl's official one (by the family
# name owl_jax.json records).
CONVERTERS = {"llava": _llava_converter, "minigpt4": _minigpt4_converter}


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
