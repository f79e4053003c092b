"""mPLUG-Owl stage 2 (instruction tuning) with the whole LLaMA-7B trained (no LoRA).

    owl-train --config configs/owl1/owl_7b_stage2_ft.py:ARGS --workdir DIR [--config.FIELD=VALUE]

ARGS: as configs/owl1/owl_7b_stage2_lora.py (size, mesh, batch, micro, res, seq, decay, epochs, root,
init, pack, data, eval, tokenizer), without the LoRA ones; micro defaults to 32 (1 row per device per slice on
8 devices; the official script runs micro 1 x gradient accumulation 4 on 64 GPUs).

The recipe follows `scripts/train_it_wo_lora.sh` (which produced `mplug-owl-llama-7b-ft`): every
`language_model.*` weight trained, ViT and abstractor frozen, lr 1e-5, everything else as the
LoRA recipe (AdamW (0.9, 0.999), wd 1e-4, 50 warm-up steps, linear decay, clip 1.0, seq 2048,
global batch 256, 3 epochs of the same 361,481-conversation mix).

Memory: fp32 master weights + Adam moments of 6.7B parameters are ~81 GB before activations,
so this needs FSDP over several devices (e.g. mesh=1x8x1); `owl-train --dry_run` prints the
per-device figure for a mesh.
"""
from owl_jax.configs.owl1 import owl_7b_stage2_lora as lora_recipe
from owl_jax.configs.common import apply_common_args, base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, **dict(lora_recipe.ARGS, micro=32))
    c = base_config()
    lora_recipe.stage2_common(c, a, a.root)
    c.lora.rank = 0
    c.trainable = ("language_model/.*",)
    c.optimizer.lr = 1e-5
    c.batch.micro_batches = a.micro
    apply_common_args(c, a, arg)
    if a.size == "tiny":
        lora_recipe.tiny_stage2(c, a, arg)
    return c
