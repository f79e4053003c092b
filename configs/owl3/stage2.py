"""mPLUG-Owl3 stage 2 (multi-image and video pre-training): the projector and the whole LLM
(hyper layers included) train; SigLIP stays frozen.

    owl-train --config configs/owl3/stage2.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value), plus data=, eval=, tokenizer= (every recipe takes them):
  size=7b|tiny      model size (tiny: a fresh tiny mPLUG-Owl3, synthetic data unless data= is
                    given)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch                                       (default 1024)
  micro=K           gradient-accumulation slices per step             (default 16)
  res=PX            image resolution (default: init's)
  seq=L             row length                                         (default 4096)
  images=N          images (tiles, video frames) a row holds           (default 16)
  steps=N           optimizer steps                                    (default 3,000)
  root=DIR          where the datasets live                            (default /data)
  init=DIR          the stage-1 export (owl-train writes WORKDIR/export) (default ROOT/ckpt/owl3_s1)

The recipe follows the paper's stage 2: projection + full LLM, AdamW lr 2e-5 down to 1e-7
(cosine), 3% warm-up, global batch 1024, 3K steps, 4096 tokens, on its mix (ShareGPTVideo
34.6%, Selective Caption 19%, LLaVA-Interleave 16.7%, VATEX 15.8%, text reading 7.4%,
interleaved captions 5.3%, ShareGPTVideo-QA 2%, MMDU 1%, MSR-VTT / MSVD 0.06%), each an
`instruct:` file in the `interleave` format (LLaVA keys; `<image>` tags where they stand;
videos as lists of frame files, at most 16 frames) laid out in the chat template (only the
assistant turns train). One conversation per row.
"""
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, given, parse_arg
from owl_jax.configs.owl3.stage1 import (FULL_LLM, PROJECTOR, lr_schedule, owl3_common,
                                         owl3_tiny)

MIX = (("sharegptvideo", 34.6), ("selective_caption", 19.0), ("llava_interleave", 16.7),
       ("vatex", 15.8), ("text_reading", 7.4), ("interleaved_caption", 5.3),
       ("sharegptvideo_qa", 2.0), ("mmdu", 1.0), ("msrvtt_msvd", 0.06))


def instruction_stage(c, a, arg, mix, steps: int) -> None:
    """Stages 2 and 3: projector + full LLM on conversations of many images, 4096 tokens."""
    c.trainable = PROJECTOR + FULL_LLM
    c.batch.global_size = a.batch or 1024
    c.batch.micro_batches = a.micro
    c.batch.max_images_per_row = a.images
    c.total_steps = a.steps or steps
    lr_schedule(c, 2e-5, 1e-7)
    c.data = dict(kind="pipeline", template="owl3_chat", packing=False, augment=False,
                  workers=8, threads=4, seed=0, sources=[
                      dict(spec=f"instruct:{a.root}/{name}.json?images={a.root}/images"
                                f"&format=interleave", weight=w) for name, w in mix])
    c.checkpoint.every_steps = 500
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        owl3_tiny(c, a, arg)
        if "images" not in given(arg):
            c.batch.max_images_per_row = 2


def get_config(arg=None):
    a = parse_arg(arg, **{**COMMON_ARGS, "micro": 16}, seq=4096, images=16, root="/data",
                  init="")
    c = base_config()
    owl3_common(c, a, a.init or f"{a.root}/ckpt/owl3_s1")
    instruction_stage(c, a, arg, MIX, 3000)
    return c
