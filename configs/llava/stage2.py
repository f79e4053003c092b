"""LLaVA stage 2 (visual instruction tuning): projector + the whole LLM train (or LoRA
adapters with `lora`); CLIP stays frozen.

    owl-train --config configs/llava/stage2.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value), plus data=, eval=, tokenizer= (every recipe takes them):
  size=7b|tiny      model size (tiny: a fresh tiny LLaVA, synthetic data unless data= is given)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch                                       (default 128)
  micro=K           gradient-accumulation slices per step             (default 16)
  res=PX            image resolution (default: init's)
  seq=L             row length                                         (default 2048)
  steps=N           optimizer steps                   (default 1 epoch of mix665k: 5197)
  lora              LoRA (r 128, alpha 256 on every LLM projection, lr 2e-4) instead of the
                    full LLM; the projector still trains fully
  root=DIR          where the datasets live                            (default /data)
  init=DIR          the stage-1 export (owl-train writes WORKDIR/export) (default ROOT/ckpt/llava_s1)

The recipe follows LLaVA-1.5's `scripts/v1_5/finetune.sh` (and `finetune_lora.sh`): the
`vicuna_v1` template with LLaVA's loss mask (only the assistant turns and their `</s>` train),
`llava_v1_5_mix665k.json`, pad-to-square images (from the checkpoint's config), AdamW lr 2e-5
(betas 0.9 / 0.999), weight decay 0, cosine decay after a 3% warm-up, global batch 128, one
epoch, 2048 tokens, one conversation per row. The LoRA run (lr 2e-4) keeps the projector at its
own lr, 2e-5 (`--mm_projector_lr`): `optimizer.lr_scale`.
"""
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, parse_arg
from owl_jax.configs.llava.stage1 import llava_common, llava_tiny

MIX_665K = 665_298
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def get_config(arg=None):
    a = parse_arg(arg, **{**COMMON_ARGS, "micro": 16}, seq=2048, root="/data", init="",
                  lora=False)
    c = base_config()
    llava_common(c, a, a.init or f"{a.root}/ckpt/llava_s1")
    if a.lora:
        c.lora.rank, c.lora.alpha, c.lora.dropout = 128, 256.0, 0.05
        c.lora.targets = LORA_TARGETS
        c.trainable = (".*/lora_[ab]", "multi_modal_projector/.*")
        c.optimizer.lr = 2e-4
        c.optimizer.lr_scale = (("^multi_modal_projector/", 0.1),)  # the projector at 2e-5
    else:
        c.trainable = ("multi_modal_projector/.*", "language_model/.*")
        c.optimizer.lr = 2e-5
    c.batch.global_size = a.batch or 128
    c.batch.micro_batches = a.micro
    c.total_steps = a.steps or MIX_665K // c.batch.global_size
    c.optimizer.warmup_steps = max(1, round(0.03 * c.total_steps))
    c.data = dict(kind="pipeline", template="vicuna_v1", packing=False, augment=False,
                  workers=8, threads=4, seed=0, sources=[dict(
                      spec=f"instruct:{a.root}/llava_v1_5_mix665k.json?images={a.root}/images"
                           f"&format=llava")])
    c.checkpoint.every_steps = 500
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        llava_tiny(c, a, arg)
        if a.lora:
            c.lora.rank, c.lora.alpha = 4, 8.0
    return c
