"""MiniGPT-4 stage 1 (pretraining on image-caption pairs): only llama_proj trains; EVA ViT-g,
the Q-Former and Vicuna are frozen.

    owl-train --config configs/minigpt4/stage1.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value), plus data=, eval=, tokenizer= (every recipe takes them):
  size=7b|tiny      model size (tiny: a fresh tiny MiniGPT-4, synthetic data unless data= is given)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch                                       (default 256)
  micro=K           gradient-accumulation slices per step             (default 1)
  res=PX            image resolution (default: init's)
  seq=L             row length                                         (default 80)
  steps=N           optimizer steps                                    (default 20,000)
  qformer           the BLIP-2 generative stage instead: the Q-Former (and its query tokens)
                    trains with llama_proj, the ViT and the LLM stay frozen
  root=DIR          where the datasets live                            (default /data)
  init=DIR          `owl-convert torch-to-jax` of a directory with eva_vit_g.pth,
                    blip2_pretrained_flant5xxl.pth and the Vicuna (no MiniGPT-4 .pth: a fresh,
                    seeded llama_proj) (default ROOT/ckpt/minigpt4_init; size=tiny: none)

The recipe follows MiniGPT-4's `train_configs/minigpt4_stage1_pretrain.yaml`: LAION and
CC3M + CC12M + SBU captions (webdataset shards, sample ratio 115 : 14), BLIP's caption cleaning,
no prompt: [BOS] + the 32 query embeddings + caption + "\\n" (max_txt_len 32; only the caption
trains), image train transform RandomResizedCrop(224, scale 0.5-1, bicubic), AdamW lr 1e-4 down
to 8e-5 (cosine; MiniGPT-4 steps it once per epoch, here per step), weight decay 0.05 (not on
biases and norms), betas 0.9 / 0.999, 5,000 warm-up steps (from 0; MiniGPT-4 warms from 1e-6),
4 epochs of 5,000 iterations at 64 per GPU on 4 GPUs, one sample per row (no packing).
The frozen towers are stored in bf16.

The Q-Former option (`qformer`) is BLIP-2's generative pre-training stage on a decoder-only
LLM (`Blip2OPT`): ViT and LLM frozen, Q-Former + query tokens + projection trained, AdamW lr
1e-4 (cosine to 0), weight decay 0.05, 2,000 warm-up steps; BLIP-2 starts it from its stage-1
(representation learning) Q-Former, which is what `blip2_pretrained*.pth` holds.
"""
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, given, parse_arg

PROJ = ("llama_proj/.*",)
QFORMER = ("qformer/.*", "llama_proj/.*")


def minigpt4_common(c, a, init: str) -> None:
    """What both MiniGPT-4 stages share."""
    c.model.family = "minigpt4"
    c.init_from = init
    c.model.frozen_dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.05
    c.optimizer.decay = "cosine"
    # MiniGPT-4 runs its frozen ViT and Q-Former in eval mode (`disabled_train`): no dropout
    c.model.dropout = False
    c.batch.seq_len = a.seq
    c.batch.max_images_per_row = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1


def get_config(arg=None):
    a = parse_arg(arg, **COMMON_ARGS, seq=80, root="/data", init="", qformer=False)
    c = base_config()
    minigpt4_common(c, a, a.init or f"{a.root}/ckpt/minigpt4_init")
    web = lambda name, shards: f"webdataset:{a.root}/{name}/{{{shards}}}.tar"  # noqa: E731
    if a.qformer:
        c.trainable = QFORMER
        c.model.dropout = True   # BLIP-2 trains its Q-Former with BERT's dropout (0.1)
        c.optimizer.lr, c.optimizer.end_lr_ratio = 1e-4, 0.0
        c.optimizer.warmup_steps = 2000
    else:
        c.trainable = PROJ
        c.optimizer.lr, c.optimizer.end_lr_ratio = 1e-4, 0.8
        c.optimizer.warmup_steps = 5000
    c.batch.global_size = a.batch or 256
    c.batch.micro_batches = a.micro
    c.total_steps = a.steps or 4 * 5000
    c.data = dict(kind="pipeline", template="minigpt4_stage1", packing=False, augment=True,
                  workers=8, threads=4, seed=0, sources=[
                      dict(spec=web("laion", "00000..99999"), weight=115, task="caption"),
                      dict(spec=web("cc_sbu", "00000..99999"), weight=14, task="caption")])
    c.checkpoint.every_steps = 1000
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        minigpt4_tiny(c, a, arg)
    return c


def minigpt4_tiny(c, a, arg) -> None:
    """size=tiny for both stages: a fresh tiny model unless init= is given, rows of 64."""
    c.init_from = a.init
    c.model.frozen_dtype = ""
    c.batch.seq_len = a.seq if "seq" in given(arg) else 64
