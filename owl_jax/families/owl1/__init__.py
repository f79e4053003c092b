"""mPLUG-Owl (arXiv 2304.14178): CLIP ViT-L/14, the visual abstractor, LLaMA."""
import jax.numpy as jnp

from owl_jax.families import Family
from owl_jax.families.owl1 import config, samples
from owl_jax.families.owl1.model import Owl
from owl_jax.families.owl1.processor import Processor
from owl_jax.tokenizer import build_prompt


def dummy_inputs(cfg: config.OwlConfig):
    """One image's slots then one token, and one image: creates every parameter."""
    ids = jnp.concatenate([jnp.full((1, cfg.image_tokens), -1, jnp.int32),
                           jnp.ones((1, 1), jnp.int32)], axis=1)
    s = cfg.vision.image_size
    return ids, jnp.zeros((1, 1, s, s, cfg.vision.num_channels), jnp.float32)


def image_flops(cfg: config.OwlConfig):
    from owl_jax.train import flops
    return [("vision", ("vision_model",), flops.vision_flops(cfg.vision)),
            ("abstractor", ("abstractor", "query_tokens"), flops.abstractor_flops(cfg))]


FAMILY = Family(name="owl1", config_type=config.OwlConfig, load_config=config.load_official,
                save_config=config.save_official, tiny=config.tiny, model=Owl,
                dummy_inputs=dummy_inputs, processor=Processor, build_prompt=build_prompt,
                image_flops=image_flops, samples=samples)
