"""mPLUG-Owl3 stage 3 (supervised fine-tuning): the projector and the whole LLM train on
single-image, multi-image and video instructions; SigLIP stays frozen.

    owl-train --config configs/owl3/stage3.py:ARGS --workdir DIR [--config.FIELD=VALUE ...]

ARGS: as stage 2 (configs/owl3/stage2.py), init defaulting to ROOT/ckpt/owl3_s2 and steps to
11,000.

The recipe follows the paper's stage 3: projection + full LLM, AdamW lr 2e-5 down to 1e-7
(cosine), 3% warm-up, global batch 1024, 11K steps, 4096 tokens, on LLaVA-SFT 58%, The
Cauldron 12.5%, Mantis 10.4%, LLaVA-Interleave 9.3%, ALLAVA 7%, VideoInstruct100K 0.8% (the
paper's remaining ~2% of smaller sets are left out), each an `instruct:` file in the
`interleave` format, in the chat template (only the assistant turns train).
"""
from owl_jax.configs.common import COMMON_ARGS, base_config, parse_arg
from owl_jax.configs.owl3.stage1 import owl3_common
from owl_jax.configs.owl3.stage2 import instruction_stage

MIX = (("llava_sft", 58.0), ("the_cauldron", 12.5), ("mantis", 10.4),
       ("llava_interleave", 9.3), ("allava", 7.0), ("videoinstruct100k", 0.8))


def get_config(arg=None):
    a = parse_arg(arg, **{**COMMON_ARGS, "micro": 16}, seq=4096, images=16, root="/data",
                  init="")
    c = base_config()
    owl3_common(c, a, a.init or f"{a.root}/ckpt/owl3_s2")
    instruction_stage(c, a, arg, MIX, 11_000)
    return c
