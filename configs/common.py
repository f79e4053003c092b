"""Shared defaults for every training recipe, and the `:ARGS` string parser.

A recipe is `get_config(arg)`: `arg` is what comes after the colon in
`--config configs/owl1/owl_7b_stage1.py:size=tiny,mesh=1x8x1,batch=512`. Only things people sweep and
that change several fields at once belong in `arg` (big_vision's rule); any single field is set
with `--config.FIELD=VALUE` instead.

Fields (all recipes share them; `docs/training.md` explains each):

  seed                  init and dropout randomness (dropout key of step s = fold_in(seed, s))
  model.family          the model family (owl_jax.families: 'owl1', 'llava'); an init_from
                        checkpoint of another family is an error
  model.size            '7b' (the released mPLUG-Owl sizes) or 'tiny' (tests, demo). Ignored for
                        the model shape when `init_from` is set: its config.json decides.
  model.image_size      ViT resolution in px; 0 = init_from's (its config.json), else the size
                        preset's (224 for 7b). A value that differs from init_from's resizes
                        its position embeddings (bicubic), and the start-up log says so.
  model.vocab_size      tiny only (the 7B vocab is 32000); with tokenizer_dir set, the
                        tokenizer's size instead
  model.dtype           compute dtype ('bfloat16' / 'float32')
  model.param_dtype     master-weight dtype of the TRAINED parameters ('float32')
  model.frozen_dtype    storage dtype of FROZEN parameters ('' = param_dtype). Storing a frozen
                        LLM in bf16 is exact when model.dtype is bf16 (kernels are cast anyway).
  model.scan_layers     scan the ViT, abstractor and LLM layers (stacked params; compile time
                        independent of depth)
  model.remat_policy    'none' | 'full' | 'dots' (LLM layers; the ViT remats whenever != none)
  model.dropout         train with dropout (abstractor attention 0.1, LoRA dropout)
  lora.rank             0 = no adapters; else LoRA of this rank on `lora.targets` of the LLM
  lora.alpha, lora.dropout, lora.targets
  trainable             regexes over '/'-joined param paths; everything else is frozen (no
                        optimizer state, never written)
  init_from             an owl-convert / owl-train export directory ('' = random init)
  tokenizer_dir         for the data pipeline, eval samples and the export ('' = init_from,
                        if it holds tokenizer.model)
  optimizer.*           AdamW: lr, b1, b2, eps, weight_decay, clip_norm, warmup_steps,
                        decay ('cosine' | 'linear' | 'constant'), end_lr_ratio, no_decay (regexes),
                        lr_scale ((regex, factor) pairs: lr * factor for those parameters)
  total_steps           optimizer steps of the run
  batch.global_size     rows per optimizer step (all processes together)
  batch.micro_batches   gradient accumulation: the step scans over this many slices
  batch.seq_len, batch.max_images_per_row
  mesh.data/fsdp/tensor device mesh (one may be -1 = the rest)
  sharding_rules        logical axis -> mesh axes (see owl_jax/sharding.py)
  data, eval_data       input pipeline (kind 'pipeline' = owl_jax.data.pipeline, or 'synthetic')
  checkpoint.*          every_steps, keep, async_save
  log_every, eval_every, eval_batches, num_samples, sample_tokens, peak_tflops, export_at_end
  fast_compile          XLA without LLVM optimisation (tiny recipes: compile time dominates)
  debug.log_row_digests log per-row example ids / token hashes (data-order checks)
  debug.sleep_after_step seconds to sleep after each step (makes preemption easy to time)
"""
from __future__ import annotations

import ml_collections

from owl_jax.sharding import DEFAULT_RULES


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'a=1,b=x,flag' -> ConfigDict typed like `defaults`; a bare name means True.

    Unknown names are an error (a typo should not silently train the wrong thing).
    """
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(f"config arg {name!r} unknown; known: {', '.join(sorted(defaults))}")
        default = defaults[name]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {name!r} needs a value ({name}=...)")
            out[name] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {name}={value!r}: expected true/false")
            out[name] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[name] = int(value)
        elif isinstance(default, float):
            out[name] = float(value)
        else:
            out[name] = value
    return out


def join_args(*args: str | None) -> str:
    return ",".join(a for a in args if a)


def parse_mesh(s: str) -> tuple[int, int, int]:
    """'2x4x1' -> (data, fsdp, tensor)."""
    parts = s.lower().split("x")
    if len(parts) != 3:
        raise ValueError(f"mesh={s!r}: expected DATAxFSDPxTENSOR, e.g. 1x8x1 (-1 = the rest)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        family="owl1", size="7b", image_size=0, vocab_size=32000,
        dtype="bfloat16", param_dtype="float32", frozen_dtype="",
        scan_layers=True, remat_policy="full", dropout=True,
    ))
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=32.0, dropout=0.05,
                                            targets=("q_proj", "v_proj")))
    c.trainable = ("vision_model/.*", "query_tokens", "abstractor/.*")
    c.init_from = ""
    c.tokenizer_dir = ""

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
        warmup_steps=0, decay="cosine", end_lr_ratio=0.0,
        # HF Trainer's rule: no weight decay on biases and norm weights.
        no_decay=("(^|/)bias$", "(^|/)scale$"),
        lr_scale=(),  # (regex, factor) pairs: those parameters train at lr * factor
    ))
    c.total_steps = 1000

    c.batch = ml_collections.ConfigDict(dict(global_size=256, micro_batches=1, seq_len=2048,
                                             max_images_per_row=1))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.sharding_rules = [list(r) for r in DEFAULT_RULES]

    c.data = ml_collections.ConfigDict(dict(kind="synthetic", num_examples=4096, text_len=32))
    c.eval_data = ml_collections.ConfigDict(dict(kind="none"))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
    c.log_every = 10
    c.eval_every = 0          # 0 = only at the end (when eval_data is set)
    c.eval_batches = 8
    c.num_samples = 2         # generated eval samples written to the log
    c.sample_tokens = 32
    c.peak_tflops = 0.0       # per device; 0 = from the device kind (unknown kinds: no MFU)
    c.export_at_end = True    # write WORKDIR/export (an owl-convert style directory)
    c.fast_compile = False    # True: no LLVM optimisation (CPU compiles 3-4x faster)
    c.debug = ml_collections.ConfigDict(dict(log_row_digests=False, sleep_after_step=0.0))
    return c


def given(arg: str | None) -> set[str]:
    """Names set explicitly in an arg string (so they can win over size=tiny defaults)."""
    return {p.partition("=")[0].strip() for p in (arg or "").split(",") if p.strip()}


def apply_common_args(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict,
                      arg: str | None) -> None:
    """Args every recipe accepts (size, mesh, batch, res, micro, steps, data, eval, tokenizer).
    size=tiny shrinks the recipe first (synthetic data, unless root= or data= names real
    data); then every arg given explicitly wins."""
    if a.size not in ("7b", "tiny"):
        raise ValueError(f"size={a.size!r}: expected 7b or tiny")
    g = given(arg)
    recipe_data, recipe_eval = c.data, c.eval_data
    if a.size == "tiny":
        tiny_overrides(c)
        if "root" in g:  # the recipe's own datasets under root, with the tiny model
            c.data, c.eval_data = recipe_data, recipe_eval
    if "res" in g:
        c.model.image_size = a.res
    if "mesh" in g:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = parse_mesh(a.mesh)
    if "batch" in g:
        c.batch.global_size = a.batch
    if "micro" in g:
        c.batch.micro_batches = a.micro
    if "steps" in g:
        c.total_steps = a.steps
    if a.tokenizer:
        c.tokenizer_dir = a.tokenizer
    workers = 0 if a.size == "tiny" else None  # tiny runs decode in threads
    if a.data:
        c.data = pipeline_block(a.data, recipe_data, workers=workers)
    if a.eval:
        like = recipe_eval if recipe_eval.get("kind") == "pipeline" else recipe_data
        c.eval_data = pipeline_block(a.eval, like, workers=0, augment=False)
        if not c.eval_every:
            c.eval_every = max(1, c.total_steps // 4)
    elif a.data and (c.eval_data.get("kind") == "synthetic" or "root" not in g):
        # the recipe's held-out set lives under root= (or is random ids): not the user's data
        c.eval_data = ml_collections.ConfigDict(dict(kind="none"))


COMMON_ARGS = dict(size="7b", mesh="1x-1x1", batch=0, res=0, micro=1, steps=0, data="",
                   eval="", tokenizer="")

# The ARGS every recipe takes besides its own (owl-train --config RECIPE --help prints them).
DATA_ARGS_HELP = """\
  data=SPEC[+SPEC]  train on these sources instead of the recipe's (+ joins several; SPEC@W
                    weights one, default 1): e.g. data=webdataset:/d/laion/{00000..00099}.tar or
                    data=instruct:/d/llava.json?images=/d/coco. Specs: docs/data.md. No commas
                    (they separate ARGS): name shards with {a..b} ranges or * globs
  eval=SPEC[+SPEC]  held-out sources for the eval loss and samples (every steps/4 unless the
                    recipe sets eval_every)
  tokenizer=DIR     a directory holding tokenizer.model (default: init's)"""


def sources_from_arg(value: str) -> list[dict]:
    """'SPEC[@WEIGHT]+SPEC...' -> pipeline sources; the task follows the spec's kind
    (instruct: conversations, else captions). Specs are parsed now, so a typo fails here."""
    from owl_jax.data.spec import parse_spec
    out = []
    for part in filter(None, value.split("+")):
        spec, weight = part, 1.0
        head, at, tail = part.rpartition("@")
        if at:
            try:
                spec, weight = head, float(tail)
            except ValueError:
                pass
        try:
            parse_spec(spec)
        except ValueError as e:
            raise ValueError(f"data/eval source {spec!r}: {e}") from None
        out.append(dict(spec=spec, weight=weight))
    if not out:
        raise ValueError(f"data/eval arg {value!r} names no source")
    return out


def pipeline_block(value: str, like, workers: int | None = None,
                   augment: bool | None = None) -> ml_collections.ConfigDict:
    """A data block reading the sources of `value`, with the recipe's own pipeline settings
    (`like`, when it is a pipeline block) for packing, augmentation and decoding."""
    block = dict(packing=True, augment=True, workers=0, threads=4, seed=0)
    if like is not None and like.get("kind") == "pipeline":
        block.update({k: v for k, v in like.to_dict().items() if k not in ("kind", "sources")})
    block.update(kind="pipeline", sources=sources_from_arg(value))
    if workers is not None:
        block["workers"] = workers
    if augment is not None:
        block["augment"] = augment
    return ml_collections.ConfigDict(block)


def tiny_overrides(c: ml_collections.ConfigDict) -> None:
    """Shrinks a recipe to the tiny model: seconds per step on a laptop CPU."""
    c.model.size = "tiny"
    c.model.vocab_size = 256
    c.model.dtype = "float32"
    c.model.frozen_dtype = ""
    c.model.remat_policy = "none"
    c.fast_compile = True  # compile time dominates tiny runs on CPU
    c.optimizer.lr = 1e-3  # so that a few dozen steps visibly learn
    c.batch.seq_len = 64
    c.batch.global_size = 8
    c.batch.micro_batches = 1
    c.total_steps = 20
    c.optimizer.warmup_steps = 2
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 2
    c.eval_data = ml_collections.ConfigDict(dict(kind="synthetic", num_examples=16,
                                                 text_len=16))
    c.eval_every = 10
    c.eval_batches = 1
    c.log_every = 1
    c.sample_tokens = 8
    c.data = ml_collections.ConfigDict(dict(kind="synthetic", num_examples=64, text_len=16))
