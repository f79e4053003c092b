"""The tiny-model version of configs/owl1/owl_7b_stage2_ft.py (= that recipe with size=tiny).

Synthetic data unless overridden; seconds per step on a CPU. Takes the same ARGS, e.g.
`owl-train --config configs/owl1/tiny_stage2_ft.py:mesh=2x2x2,batch=16 --workdir /tmp/w`.
"""
from owl_jax.configs.owl1 import owl_7b_stage2_ft as recipe
from owl_jax.configs.common import join_args


def get_config(arg=None):
    return recipe.get_config(join_args("size=tiny", arg))
