"""The `make demo` recipes: a tiny mPLUG-Owl, LLaVA or MiniGPT-4 trained on synthetic coloured
shapes, on a CPU.

    owl-train --config configs/demo_shapes.py:stage=stage1,out=demo_out --workdir W
    owl-train --config configs/demo_shapes.py:family=llava,stage=stage2,out=demo_out --workdir W

`python -m owl_jax.demo [--family llava]` builds the data, the tokenizer and the initial
checkpoint under OUT and runs the three stages in order; each stage is an ordinary owl-train
config (this file), so any stage can also be re-run by hand with the commands above.

ARGS (comma-separated name=value):
  family=owl1|llava|minigpt4   the model family                                (default owl1)
  stage=warmup|stage1|stage2   which stage                                    (default stage1)
  out=DIR                      the demo's output directory                   (default demo_out)
  steps=N                      optimizer steps (default: the stage's own, STEPS below)
  batch=ROWS                   rows per step                                 (default 32)
  fast                         compile without LLVM optimisation (`--quick`: compiles 3-4x
                               faster, steps run ~2x slower)

mPLUG-Owl (family=owl1; each stage starts from the previous stage's WORKDIR/export):
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

LLaVA (family=llava), the same data in LLaVA's formats and templates:
  warmup  as above, the conversations as a LLaVA json (text-only records, like those of
          LLaVA-1.5's mix665k) rendered with `vicuna_v1` (only the answers and their </s>
          train, LLaVA's mask), the plain-text lines in the same `vicuna_v1` rendering.
          Trainable: language_model/.*
  stage1  LLaVA's feature alignment: the caption shards in the `plain` template ("<image>" +
          caption + "\\n"), LLM frozen, projector trained AND the CLIP tower: LLaVA freezes a
          pretrained CLIP, the demo's tower is random and has to learn to see (as the Owl
          demo's ViT does in its stage 1).
  stage2  LLaVA-1.5's visual instruction tuning: the demo's instruction set as a LLaVA json
          (`conversations`, `image`), `vicuna_v1`, projector + the whole LLM trained, the tower
          frozen (`scripts/v1_5/finetune.sh`).

MiniGPT-4 (family=minigpt4), the LLaVA data files in MiniGPT-4's templates:
  warmup  as above, the conversations rendered in MiniGPT-4's chat template (v1: "###Human:
          ... ###Assistant: ...###"; only the answers and their "###" train), the plain-text
          lines as stage 1 trains captions (BLIP-cleaned, "\n").
          Trainable: language_model/.*
  stage1  MiniGPT-4's stage 1 layout ([BOS] + the 8 query embeddings + cleaned caption +
          "\n", no prompt), LLM frozen; MiniGPT-4 trains llama_proj alone on a pretrained
          EVA + BLIP-2 Q-Former, the demo's are random: ViT + ln_vision + Q-Former + llama_proj
          train here.
  stage2  the demo's instruction set in the chat template asked at inference, llama_proj + the
          LLM trained, ViT + Q-Former frozen (MiniGPT-4's stage 2 trains llama_proj alone on
          3.5K curated descriptions; a from-scratch LLM also has to learn to answer).

Differences from the 7B recipes, and why: learning rates ~100x larger and a few hundred to a
few thousand steps (a 2-layer, 128-wide model trained from scratch in minutes); no dropout (it
only slows such short runs down); no augmentation (a random crop can cut the shape off, which
would make the caption wrong); one device, float32.
"""
from __future__ import annotations

import os

from owl_jax.configs.common import base_config, parse_arg

FAMILIES = ("owl1", "llava", "minigpt4")
STAGES = ("warmup", "stage1", "stage2")
ARGS = dict(family="owl1", stage="stage1", out="demo_out", steps=0, batch=32, fast=False)

# Default steps per stage, sized for about ten minutes on two CPU cores.
# LLaVA's stage 1 needs half of Owl's: its 16 patch tokens reach the LLM directly, where Owl's
# abstractor compresses them into 8 queries (measured: plain captions name colour 100% and
# shape 99% of the held-out images after 1,000 steps as after 2,000).
STEPS = {"owl1": {"warmup": 300, "stage1": 2000, "stage2": 500},
         "llava": {"warmup": 300, "stage1": 1000, "stage2": 500},
         # 8 Q-Former queries, as Owl's 8 abstractor queries: Owl's stage-1 length
         "minigpt4": {"warmup": 300, "stage1": 2000, "stage2": 500}}
# The format of the instruction files (owl_jax.data.conversation), per family.
FORMATS = {"owl1": "owl", "llava": "llava", "minigpt4": "llava"}


def paths(out: str, family: str = "owl1") -> dict[str, str]:
    """Where the demo writes everything (run.py and this config agree through this function).
    The instruction files are in the family's own format (FORMATS): `.jsonl` (mPLUG-Owl's) or
    `.json` (LLaVA's)."""
    out = os.path.abspath(out)
    ext = "jsonl" if FORMATS[family] == "owl" else "json"
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


COMMON_DATA = dict(kind="pipeline", augment=False, workers=0, threads=2, seed=0)


def owl1_stage(c, a, p: dict) -> None:
    """mPLUG-Owl's stages (the module docstring)."""
    fmt = FORMATS["owl1"]
    if a.stage == "warmup":
        c.trainable = ("language_model/.*",)
        c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 30
        c.batch.global_size = max(a.batch // 2, 1)
        c.batch.seq_len = 128
        c.data = dict(COMMON_DATA, packing=True, sources=[
            dict(spec=f"instruct:{p['text_conversations']}?format={fmt}", weight=1.0),
            dict(spec=f"webdataset:{p['text_shards']}", task="text", weight=1.0),
        ])
    elif a.stage == "stage1":
        c.trainable = ("vision_model/.*", "query_tokens", "abstractor/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2  # the shape signal is noisy: 64 images per step
        c.batch.seq_len = 28         # BOS + 9 image slots + the longest caption + EOS
        c.data = dict(COMMON_DATA, packing=False, sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 32.0, 0.0
        c.lora.targets = ("q_proj", "v_proj")
        c.trainable = (".*/lora_[ab]",)
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 30
        c.batch.seq_len = 96
        c.data = dict(COMMON_DATA, packing=False, sources=[
            dict(spec=f"instruct:{p['instructions']}?format={fmt}&images={p['instruct_dir']}")])


def llava_stage(c, a, p: dict) -> None:
    """LLaVA's stages (the module docstring): the data pipeline lays the samples out with
    LLaVA's templates and loss masks (`template`)."""
    fmt = FORMATS["llava"]
    if a.stage == "warmup":
        c.trainable = ("language_model/.*",)
        c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 30
        c.batch.global_size = max(a.batch // 2, 1)
        c.batch.seq_len = 128
        c.data = dict(COMMON_DATA, packing=True, template="vicuna_v1", sources=[
            dict(spec=f"instruct:{p['text_conversations']}?format={fmt}", weight=1.0),
            dict(spec=f"webdataset:{p['text_shards']}", task="text", weight=1.0),
        ])
    elif a.stage == "stage1":
        c.trainable = ("vision_tower/.*", "multi_modal_projector/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2
        c.batch.seq_len = 32         # BOS + 16 image slots + the longest caption + "\n"
        c.data = dict(COMMON_DATA, packing=False, template="plain", sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.trainable = ("multi_modal_projector/.*", "language_model/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 30
        c.batch.seq_len = 112
        c.data = dict(COMMON_DATA, packing=False, template="vicuna_v1", sources=[
            dict(spec=f"instruct:{p['instructions']}?format={fmt}&images={p['instruct_dir']}")])


def minigpt4_stage(c, a, p: dict) -> None:
    """MiniGPT-4's stages (the module docstring), with its templates and sample layouts."""
    fmt = FORMATS["minigpt4"]
    if a.stage == "warmup":
        c.trainable = ("language_model/.*",)
        c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 30
        c.batch.global_size = max(a.batch // 2, 1)
        c.batch.seq_len = 128
        c.data = dict(COMMON_DATA, packing=True, template="minigpt4_v1", sources=[
            dict(spec=f"instruct:{p['text_conversations']}?format={fmt}", weight=1.0),
            dict(spec=f"webdataset:{p['text_shards']}", task="text", weight=1.0),
        ])
    elif a.stage == "stage1":
        c.trainable = ("visual_encoder/.*", "ln_vision/.*", "qformer/.*", "llama_proj/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2
        c.batch.seq_len = 28         # BOS + 8 query slots + the longest caption + "\n"
        c.data = dict(COMMON_DATA, packing=False, template="minigpt4_stage1", sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.trainable = ("llama_proj/.*", "language_model/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 30
        c.batch.seq_len = 112
        c.data = dict(COMMON_DATA, packing=False, template="minigpt4_v1", sources=[
            dict(spec=f"instruct:{p['instructions']}?format={fmt}&images={p['instruct_dir']}")])


RECIPES = {"owl1": owl1_stage, "llava": llava_stage, "minigpt4": minigpt4_stage}


def get_config(arg=None):
    a = parse_arg(arg, **ARGS)
    if a.family not in FAMILIES:
        raise ValueError(f"family={a.family!r}: expected one of {FAMILIES}")
    if a.stage not in STAGES:
        raise ValueError(f"stage={a.stage!r}: expected one of {STAGES}")
    p = paths(a.out, a.family)
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
    RECIPES[a.family](c, a, p)
    c.fast_compile = a.fast
    c.total_steps = a.steps or STEPS[a.family][a.stage]
    return c
