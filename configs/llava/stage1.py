"""LLaVA stage 1 (feature alignment): only the projector trains; CLIP and the LLM are frozen.

    owl-train --config configs/llava/stage1.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value), plus data=, eval=, tokenizer= (every recipe takes them):
  size=7b|tiny      model size (tiny: a fresh tiny LLaVA, synthetic data unless data= is given)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch                                       (default 256)
  micro=K           gradient-accumulation slices per step             (default 8)
  res=PX            image resolution (default: init's)
  seq=L             row length                                         (default 2048)
  steps=N           optimizer steps                    (default 1 epoch of LCS-558K: 2180)
  root=DIR          where the datasets live                            (default /data)
  init=DIR          `owl-convert from-hf --family llava` output: CLIP + Vicuna with a fresh
                    projector (default ROOT/ckpt/llava_init; size=tiny: none)

The recipe follows LLaVA-1.5's `scripts/v1_5/pretrain.sh`: the `plain` template (image, then
the caption; only the caption and its newline train), LCS-558K
(blip_laion_cc_sbu_558k.json), AdamW lr 1e-3 (betas 0.9 / 0.999, eps 1e-8), weight decay 0,
cosine decay after a 3% warm-up, global batch 256, one epoch, 2048 tokens, one sample per row
(LLaVA does not pack), no image augmentation. The frozen LLM and tower are stored in bf16.
"""
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, given, parse_arg

LCS_558K = 558_128


def llava_common(c, a, init: str) -> None:
    """What both LLaVA stages share."""
    c.model.family = "llava"
    c.init_from = init
    c.model.frozen_dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.decay = "cosine"
    c.batch.seq_len = a.seq
    c.batch.max_images_per_row = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1


def get_config(arg=None):
    a = parse_arg(arg, **{**COMMON_ARGS, "micro": 8}, seq=2048, root="/data", init="")
    c = base_config()
    llava_common(c, a, a.init or f"{a.root}/ckpt/llava_init")
    c.trainable = ("multi_modal_projector/.*",)
    c.optimizer.lr = 1e-3
    c.batch.global_size = a.batch or 256
    c.batch.micro_batches = a.micro
    c.total_steps = a.steps or LCS_558K // c.batch.global_size
    c.optimizer.warmup_steps = max(1, round(0.03 * c.total_steps))
    pre = f"{a.root}/LLaVA-Pretrain"
    c.data = dict(kind="pipeline", template="plain", packing=False, augment=False, workers=8,
                  threads=4, seed=0, sources=[dict(
                      spec=f"instruct:{pre}/blip_laion_cc_sbu_558k.json?images={pre}/images"
                           f"&format=llava")])
    c.checkpoint.every_steps = 500
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        llava_tiny(c, a, arg)
    return c


def llava_tiny(c, a, arg) -> None:
    """size=tiny for both stages: a fresh tiny model unless init= is given, rows of 64."""
    c.init_from = a.init
    c.model.frozen_dtype = ""
    c.batch.seq_len = a.seq if "seq" in given(arg) else 64

