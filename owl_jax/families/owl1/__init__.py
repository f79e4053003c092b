"""mPLUG-Owl (arXiv 2304.14178): CLIP ViT-L/14, the visual abstractor, LLaMA."""
from owl_jax.decoder.spliced import dummy_inputs
from owl_jax.families import Family
from owl_jax.families.owl1 import config, samples
from owl_jax.families.owl1.model import Owl
from owl_jax.families.owl1.processor import Processor
from owl_jax.families.owl1.template import build_prompt


def image_flops(cfg: config.OwlConfig):
    from owl_jax.train import flops
    return [("vision", ("vision_model",), flops.vision_flops(cfg.vision)),
            ("abstractor", ("abstractor", "query_tokens"), flops.abstractor_flops(cfg))]


FAMILY = Family(name="owl1", config_type=config.OwlConfig, load_config=config.load_official,
                save_config=config.save_official, tiny=config.tiny, model=Owl,
                dummy_inputs=dummy_inputs, processor=Processor, build_prompt=build_prompt,
                image_flops=image_flops, samples=samples,
                demo="owl_jax.families.owl1.demo",
                converter="owl_jax.convert.official")
