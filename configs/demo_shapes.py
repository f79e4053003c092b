"""The `make demo` recipes: a tiny mPLUG-Owl or LLaVA trained on synthetic coloured shapes, on a
CPU.

    owl-train --config configs/demo_shapes.py:stage=stage1,out=demo_out --workdir W
    owl-train --config configs/demo_shapes.py:family=llava,stage=stage2,out=demo_out --workdir W

`python -m owl_jax.demo [--family llava]` builds the data, the tokenizer and the initial
checkpoint under OUT and runs the three stages in order; each stage is an ordinary owl-train
config (this file), so any stage can also be re-run by hand with the commands above.

ARGS (comma-separated name=value):
  family=NAME                  the model family, one with a demo               (default owl1)
  stage=warmup|stage1|stage2   which stage                                    (default stage1)
  out=DIR                      the demo's output directory                   (default demo_out)
  steps=N                      optimizer steps (default: the family's `DemoFamily.steps`)
  batch=ROWS                   rows per step                                 (default 32)
  fast                         compile without LLVM optimisation (`--quick`: compiles 3-4x
                               faster, steps run ~2x slower)

What each family's stages train, and why, is in its `DemoFamily` (owl_jax/families/NAME/demo.py).
mPLUG-Owl: a text warm-up of the LLM, stage 1 captioning (ViT + abstractor, LLM frozen), stage 2
LoRA instruction tuning; LLaVA: the same with its templates and loss masks, stage 1 on the
projector (and the demo's random tower), stage 2 projector + LLM.

Differences from the 7B recipes, and why: learning rates ~100x larger and a few hundred to a
few thousand steps (a 2-layer, 128-wide model trained from scratch in minutes); no dropout (it
only slows such short runs down); no augmentation (a random crop can cut the shape off, which
would make the caption wrong); one device, float32.
"""
from __future__ import annotations

import os

from owl_jax.configs.common import base_config, parse_arg
from owl_jax.demo import family as demo_family

STAGES = ("warmup", "stage1", "stage2")
ARGS = dict(family="owl1", stage="stage1", out="demo_out", steps=0, batch=32, fast=False)


def paths(out: str, instruction_format: str = "owl") -> dict[str, str]:
    """Where the demo writes everything (run.py and this config agree through this function).
    The instruction files are in the family's own format: `.jsonl` (mPLUG-Owl's) or `.json`
    (LLaVA's and the others')."""
    out = os.path.abspath(out)
    ext = "jsonl" if instruction_format == "owl" else "json"
    return dict(
        out=out,
        tokenizer=f"{out}/tokenizer",
        init=f"{out}/init",
        train_shards=f"{out}/data/shapes_train",
        heldout_shards=f"{out}/data/shapes_heldout",
        text_shards=f"{out}/data/text",
        text_conversations=f"{out}/data/text/conversations.{ext}",
        instruct_dir=f"{out}/data/instruct",
        instructions=f"{out}/data/instruct/instructions.{ext}",
        runs=f"{out}/runs",
        torch=f"{out}/torch",
        roundtrip=f"{out}/roundtrip",
        **{f"run_{s}": f"{out}/runs/{s}" for s in STAGES},
    )


def get_config(arg=None):
    a = parse_arg(arg, **ARGS)
    if a.family not in demo_family.names():
        raise ValueError(f"family={a.family!r}: expected one of {demo_family.names()}")
    if a.stage not in STAGES:
        raise ValueError(f"stage={a.stage!r}: expected one of {STAGES}")
    demo = demo_family.get(a.family)
    p = paths(a.out, demo.instruction_format)
    c = base_config()
    c.seed = 0
    c.model.family = a.family
    c.model.size = "tiny"          # unused for the shape: init_from's config.json decides
    c.model.image_size = 0         # 0 = keep init_from's resolution
    c.model.dtype = "float32"
    c.model.frozen_dtype = ""
    c.model.scan_layers = False
    c.model.remat_policy = "none"
    c.model.dropout = False
    c.tokenizer_dir = p["tokenizer"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.batch.global_size = a.batch
    c.batch.micro_batches = 1
    c.batch.max_images_per_row = 1
    c.optimizer.update(b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                       decay="cosine", end_lr_ratio=0.05)
    c.checkpoint.every_steps = 0   # the end of each stage only: every save costs seconds here
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    c.eval_data = dict(kind="none")
    c.num_samples = 0
    c.log_every = 25
    c.export_at_end = True
    c.init_from = p["init"] if a.stage == "warmup" else \
        f"{p[f'run_{STAGES[STAGES.index(a.stage) - 1]}']}/export"
    demo.stage(c, a, p)
    c.fast_compile = a.fast
    c.total_steps = a.steps or demo.steps[a.stage]
    return c
