"""The `make demo` recipe: a tiny mPLUG-Owl trained on synthetic coloured shapes, on a CPU.

    owl-train --config configs/demo_shapes.py:stage=stage1,out=demo_out --workdir W

`python -m owl_jax.demo` builds the data, the tokenizer and the initial checkpoint under OUT and
runs the three stages in order; each stage is an ordinary owl-train config (this file), so any
stage can also be re-run by hand with the command above.

ARGS (comma-separated name=value):
  stage=warmup|stage1|stage2   which stage                                    (default stage1)
  out=DIR                      the demo's output directory                   (default demo_out)
  steps=N                      optimizer steps (default: the stage's own, below)
  batch=ROWS                   rows per step                                 (default 32)
  fast                         compile without LLVM optimisation (`--quick`: compiles 3-4x
                               faster, steps run ~2x slower)

The stages (each starts from the previous stage's WORKDIR/export):
  warmup  the LLM alone learns the official prompt template, the answer phrasing and the
          colour/shape words from text: official-format text-only conversations ("Human: I see
          a red circle on a gray background. What colour is the shape?\\nAI: The shape is red.")
          and plain-text lines "red circle gray. a red circle on a gray background" (every token
          trained). The second teaches the LLM to describe what its context names, the ability a
          pretrained LLM brings to stage 1 and which the image tokens then have to trigger.
          Trainable: language_model/.*  (the ViT and the abstractor see no data yet).
  stage1  image-caption pairs from img2dataset webdataset shards, LLM frozen, ViT + queries +
          abstractor trained (the paper's stage 1): the only way for the caption loss to go down
          is for the 9 visual tokens to tell the frozen LLM the colour and the shape.
  stage2  the official instruction jsonl (mPLUG-Owl format) with images, LoRA (r=8, alpha=32)
          on the LLM's q_proj / v_proj, everything else frozen (the official LoRA script).

Differences from the 7B recipes, and why: learning rates ~100x larger and a few hundred to a
few thousand steps (a 2-layer, 128-wide model trained from scratch in minutes); no dropout (it
only slows such short runs down); no augmentation (a random crop can cut the shape off, which
would make the caption wrong); one device, float32.
"""
from __future__ import annotations

import os

from owl_jax.configs.common import base_config, parse_arg

STAGES = ("warmup", "stage1", "stage2")
ARGS = dict(stage="stage1", out="demo_out", steps=0, batch=32, fast=False)

# Default steps per stage, sized for about ten minutes on two CPU cores.
STEPS = {"warmup": 300, "stage1": 2000, "stage2": 500}


def paths(out: str) -> dict[str, str]:
    """Where the demo writes everything (run.py and this config agree through this function)."""
    out = os.path.abspath(out)
    return dict(
        out=out,
        tokenizer=f"{out}/tokenizer",
        init=f"{out}/init",
        train_shards=f"{out}/data/shapes_train",
        text_shards=f"{out}/data/text",
        text_jsonl=f"{out}/data/text/conversations.jsonl",
        instruct_dir=f"{out}/data/instruct",
        instruct_jsonl=f"{out}/data/instruct/instructions.jsonl",
        runs=f"{out}/runs",
        torch=f"{out}/torch",
        roundtrip=f"{out}/roundtrip",
        **{f"run_{s}": f"{out}/runs/{s}" for s in STAGES},
    )


def get_config(arg=None):
    a = parse_arg(arg, **ARGS)
    if a.stage not in STAGES:
        raise ValueError(f"stage={a.stage!r}: expected one of {STAGES}")
    p = paths(a.out)
    c = base_config()
    c.seed = 0
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
    common_data = dict(kind="pipeline", augment=False, workers=0, threads=2, seed=0)

    if a.stage == "warmup":
        c.init_from = p["init"]
        c.trainable = ("language_model/.*",)
        c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 30
        c.batch.global_size = max(a.batch // 2, 1)
        c.batch.seq_len = 128
        c.data = dict(common_data, packing=True, sources=[
            dict(spec=f"instruct:{p['text_jsonl']}?format=owl", weight=1.0),
            dict(spec=f"webdataset:{p['text_shards']}", task="text", weight=1.0),
        ])
    elif a.stage == "stage1":
        c.init_from = f"{p['run_warmup']}/export"
        c.trainable = ("vision_model/.*", "query_tokens", "abstractor/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2  # the shape signal is noisy: 64 images per step
        c.batch.seq_len = 28         # BOS + 9 image slots + the longest caption + EOS
        c.data = dict(common_data, packing=False, sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.init_from = f"{p['run_stage1']}/export"
        c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 32.0, 0.0
        c.lora.targets = ("q_proj", "v_proj")
        c.trainable = (".*/lora_[ab]",)
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 30
        c.batch.seq_len = 96
        c.data = dict(common_data, packing=False, sources=[
            dict(spec=f"instruct:{p['instruct_jsonl']}?format=owl&images={p['instruct_dir']}")])
    c.fast_compile = a.fast
    c.total_steps = a.steps or STEPS[a.stage]
    return c
