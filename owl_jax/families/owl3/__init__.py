"""mPLUG-Owl3 (arXiv 2408.04840): SigLIP, a linear (240728) or MLP (241101) projector, Qwen2
with hyper-attention layers; images never enter the token sequence."""
from owl_jax.families.owl3 import config
from owl_jax.families.owl3.model import Owl3, dummy_inputs
