"""mPLUG-Owl3 stage 1 (pre-training on image-text pairs): the projector, every hyper layer's
visual K/V projection and adaptive gate train; SigLIP and the Qwen2 LLM are frozen.

    owl-train --config configs/owl3/stage1.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value), plus data=, eval=, tokenizer= (every recipe takes them):
  size=7b|tiny      model size (tiny: a fresh tiny mPLUG-Owl3, synthetic data unless data= is
                    given)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch                                       (default 2048)
  micro=K           gradient-accumulation slices per step             (default 8)
  res=PX            image resolution (default: init's)
  seq=L             row length                                         (default 768)
  steps=N           optimizer steps                                    (default 20,000)
  root=DIR          where the datasets live                            (default /data)
  init=DIR          `owl-convert` output: SigLIP + Qwen2 with fresh projector and hyper
                    parameters (default ROOT/ckpt/owl3_init; size=tiny: none)

The recipe follows the paper (arXiv 2408.04840, training table): stage 1 trains the linear
projection, the visual KV projections and the adaptive gates on 41M image-text pairs
(DataComp-1B 35%, LAION-en 26%, COYO-700M 14%, COYO-OCR 9.6%, LAION-zh 7.7%, Wukong 5.6%,
CC12M 0.8%; here arrayrecord shards written by `owl-data convert` under ROOT), AdamW lr 1e-3
down to 1e-5 (cosine), 3% warm-up, global batch 2048, 20K steps, 768 tokens, gradient
checkpointing; each pair laid out as the processor's `plain` prompt style (the image's
placeholder, the caption, <|endoftext|>: the caption and <|endoftext|> train), one view per
image (no cutting), one pair per row. The frozen towers are stored in bf16.

Hyper layers differ from their neighbours, so the LLM's layers run unrolled (scan_layers off;
remat applies per layer).
"""
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, given, parse_arg

PROJECTOR = ("vision2text_model/.*",)
HYPER = (r"language_model/layers_\d+/self_attn/(v_kv_proj|gate_proj)/.*",)
FULL_LLM = ("language_model/.*",)
PAIRS = (("datacomp", 35.0), ("laion_en", 26.0), ("coyo", 14.0), ("coyo_ocr", 9.6),
         ("laion_zh", 7.7), ("wukong", 5.6), ("cc12m", 0.8))


def owl3_common(c, a, init: str) -> None:
    """What every mPLUG-Owl3 stage shares."""
    c.model.family = "owl3"
    c.init_from = init
    c.model.frozen_dtype = "bfloat16"
    c.model.scan_layers = False  # hyper layers are another block kind
    c.model.remat_policy = "full"
    c.model.dropout = False  # attention_dropout 0
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.decay = "cosine"
    c.batch.seq_len = a.seq
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1


def lr_schedule(c, peak: float, end: float) -> None:
    c.optimizer.lr, c.optimizer.end_lr_ratio = peak, end / peak
    c.optimizer.warmup_steps = max(1, round(0.03 * c.total_steps))


def get_config(arg=None):
    a = parse_arg(arg, **{**COMMON_ARGS, "micro": 8}, seq=768, root="/data", init="")
    c = base_config()
    owl3_common(c, a, a.init or f"{a.root}/ckpt/owl3_init")
    c.trainable = PROJECTOR + HYPER
    c.batch.global_size = a.batch or 2048
    c.batch.micro_batches = a.micro
    c.batch.max_images_per_row = 1
    c.total_steps = a.steps or 20_000
    lr_schedule(c, 1e-3, 1e-5)
    c.data = dict(kind="pipeline", template="owl3_plain", packing=False, augment=False,
                  workers=8, threads=4, seed=0, sources=[
                      dict(spec=f"arrayrecord:{a.root}/{name}", weight=w, task="caption")
                      for name, w in PAIRS])
    c.checkpoint.every_steps = 1000
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        owl3_tiny(c, a, arg)
    return c


def owl3_tiny(c, a, arg) -> None:
    """size=tiny for every stage: a fresh tiny model unless init= is given, rows of 64."""
    c.init_from = a.init
    c.model.frozen_dtype = ""
    c.batch.seq_len = a.seq if "seq" in given(arg) else 64
