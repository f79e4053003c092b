"""mPLUG-Owl stage 1 (pre-training): ViT + visual abstractor trained, LLaMA-7B frozen.

    owl-train --config configs/owl1/owl_7b_stage1.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS (comma-separated name=value; what people sweep):
  size=7b|tiny      model size (tiny: seconds per step on CPU, synthetic data unless data= or
                    root= is given; = tiny_stage1.py)
  mesh=DxFxT        device mesh data x fsdp x tensor, -1 = the rest   (default 1x-1x1: FSDP)
  batch=ROWS        global batch in rows of `seq` tokens               (default 4096)
  micro=K           gradient-accumulation slices per step             (default 64)
  res=PX            image resolution: resizes init's position embeddings (default: init's)
  seq=L             row length; packing fills rows with pairs          (default 512)
  images=M          max images per packed row                          (default 6)
  steps=N           optimizer steps                                    (default 50000)
  root=DIR          where the datasets live                            (default /data)
  init=DIR          owl-convert output holding CLIP ViT-L/14 + LLaMA-7B (default ROOT/ckpt/owl_init;
                    size=tiny: none, a random tiny model)
  data=, eval=, tokenizer=   the sources to train / evaluate on (see configs/common.py)

The recipe (paper, arXiv 2304.14178 section 4; the repo has no stage-1 script):
  - frozen LLaMA-7B; ViT-L/14 (from CLIP) + abstractor + query tokens trained;
  - AdamW lr 1e-4, betas (0.9, 0.98), weight decay 0.1, 2k warm-up steps, cosine decay,
    50k steps of ~2.1M tokens (4096 rows x 512 tokens here), 224 px;
  - data: image-text pairs of LAION-400M and COYO-700M (~400M pairs in total; the mixture
    weights are not published: we use 45/45) plus Conceptual Captions and COCO (5/5), from
    img2dataset webdataset shards (or `owl-data convert` ArrayRecord: change the specs);
    metadata filters below; random-resized-crop augmentation; pairs packed into rows.
  - the frozen LLM is stored in bf16 (exact: its kernels are cast to the bf16 compute dtype);
    gradient clipping at 1.0 (not stated in the paper; a common safety net).
"""
from owl_jax.configs import common
from owl_jax.configs.common import COMMON_ARGS, apply_common_args, base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, **{**COMMON_ARGS, "micro": 64}, seq=512, images=6, root="/data", init="")
    c = base_config()
    c.init_from = a.init or f"{a.root}/ckpt/owl_init"
    c.trainable = ("vision_model/.*", "query_tokens", "abstractor/.*")
    c.model.frozen_dtype = "bfloat16"
    c.model.remat_policy = "full"

    c.optimizer.lr = 1e-4
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_steps = 2000
    c.optimizer.decay = "cosine"
    c.optimizer.clip_norm = 1.0
    c.total_steps = a.steps or 50_000

    c.batch.global_size = a.batch or 4096
    c.batch.micro_batches = a.micro
    c.batch.seq_len = a.seq
    c.batch.max_images_per_row = a.images
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1

    web = lambda name, shards: f"webdataset:{a.root}/{name}/{{{shards}}}.tar"  # noqa: E731
    pairs_filters = dict(min_size=128, max_aspect_ratio=3.0)
    c.data = dict(
        kind="pipeline",
        sources=[
            dict(spec=web("laion400m", "00000..41454"), weight=0.45, task="caption",
                 # LAION-400M was already cut at CLIP ViT-B/32 similarity 0.3
                 filters=dict(min_similarity=0.3, **pairs_filters)),
            dict(spec=web("coyo700m", "00000..74751"), weight=0.45, task="caption",
                 # COYO ships raw scores: bring it to LAION's bar, drop watermarks / NSFW
                 filters=dict(min_similarity=0.3, max_watermark=0.5, max_nsfw=0.5,
                              min_aesthetic=4.5, **pairs_filters)),
            dict(spec=web("cc3m", "00000..00331"), weight=0.05, task="caption",
                 filters=pairs_filters),
            dict(spec=f"coco:{a.root}/coco/annotations/captions_train2017.json"
                      f"?images={a.root}/coco/train2017", weight=0.05, task="caption"),
        ],
        packing=True, augment=True, workers=8, threads=4, seed=0)
    c.eval_data = dict(
        kind="pipeline",
        sources=[dict(spec=f"coco:{a.root}/coco/annotations/captions_val2017.json"
                           f"?images={a.root}/coco/val2017", task="caption")],
        packing=True, augment=False, workers=0, threads=4, seed=0)
    c.eval_every = 2000
    c.eval_batches = 4
    c.checkpoint.every_steps = 1000
    c.log_every = 10

    apply_common_args(c, a, arg)
    g = common.given(arg)
    if a.size == "tiny":
        c.init_from = a.init
        c.batch.max_images_per_row = a.images if "images" in g else 2
        c.batch.seq_len = a.seq if "seq" in g else 64
    return c
