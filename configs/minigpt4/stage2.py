"""MiniGPT-4 stage 2 (fine-tuning on its curated image descriptions, cc_sbu_align): only
llama_proj trains, as in stage 1.

    owl-train --config configs/minigpt4/stage2.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value), plus data=, eval=, tokenizer= (every recipe takes them):
  size=7b|tiny      model size (tiny: a fresh tiny MiniGPT-4, synthetic data unless data= is given)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch                                       (default 12)
  micro=K           gradient-accumulation slices per step             (default 1)
  res=PX            image resolution (default: init's)
  seq=L             row length                                         (default 256)
  steps=N           optimizer steps                                    (default 1,000)
  root=DIR          where the datasets live                            (default /data)
  init=DIR          the stage-1 export (owl-train writes WORKDIR/export)
                    (default ROOT/ckpt/minigpt4_s1)

The recipe follows MiniGPT-4's `train_configs/minigpt4_stage2_finetune.yaml`: the ~3.5K
cc_sbu_align pairs (`filter_cap.json`: {"annotations": [{"image_id", "caption"}]}, images
`image/{image_id}.jpg`, read as a coco source), each caption behind one of the four
alignment instructions in "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: " and
followed by "###" (max_txt_len 160; only the caption and "###" train; MiniGPT-4 draws the
instruction at random, here it is chosen by the caption), image train transform, AdamW lr
3e-5 down to 1e-5 (cosine per step), weight decay 0.05, 200 warm-up steps, 5 epochs of 200
iterations at batch 12.
"""
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, parse_arg
from owl_jax.configs.minigpt4.stage1 import PROJ, minigpt4_common, minigpt4_tiny


def get_config(arg=None):
    a = parse_arg(arg, **COMMON_ARGS, seq=256, root="/data", init="")
    c = base_config()
    minigpt4_common(c, a, a.init or f"{a.root}/ckpt/minigpt4_s1")
    c.trainable = PROJ
    c.optimizer.lr, c.optimizer.end_lr_ratio = 3e-5, 1 / 3
    c.optimizer.warmup_steps = 200
    c.batch.global_size = a.batch or 12
    c.batch.micro_batches = a.micro
    c.total_steps = a.steps or 5 * 200
    align = f"{a.root}/cc_sbu_align"
    c.data = dict(kind="pipeline", template="minigpt4_align", packing=False, augment=True,
                  workers=8, threads=4, seed=0, sources=[dict(
                      spec=f"coco:{align}/filter_cap.json?images={align}/image",
                      task="caption")])
    c.checkpoint.every_steps = 200
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        minigpt4_tiny(c, a, arg)
    return c
