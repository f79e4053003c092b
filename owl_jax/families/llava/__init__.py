"""LLaVA (arXiv 2304.08485) and LLaVA-1.5 (arXiv 2310.03744): CLIP ViT, a linear or MLP
projector, LLaMA; one LLM position per image patch."""
import dataclasses

from owl_jax.decoder.spliced import dummy_inputs
from owl_jax.families import Family
from owl_jax.families.llava import config, samples
from owl_jax.families.llava.model import Llava
from owl_jax.families.llava.processor import LlavaProcessor
from owl_jax.families.llava.templates import build_prompt


def image_flops(cfg: config.LlavaConfig):
    """The tower up to the feature layer (the layers after it do not count), the projector."""
    from owl_jax.train import flops
    n = cfg.vision.num_hidden_layers
    used = dataclasses.replace(cfg.vision, num_hidden_layers=cfg.vision_feature_layer % (n + 1))
    return [("vision", ("vision_tower",), flops.vision_flops(used)),
            ("projector", ("multi_modal_projector",),
             flops.projector_flops(cfg.projector, cfg.vision.hidden_size, cfg.text.hidden_size,
                                   cfg.image_tokens))]


FAMILY = Family(name="llava", config_type=config.LlavaConfig, load_config=config.load,
                save_config=config.save, tiny=config.tiny, model=Llava,
                dummy_inputs=dummy_inputs, processor=LlavaProcessor, build_prompt=build_prompt,
                image_flops=image_flops, samples=samples,
                demo="owl_jax.families.llava.demo",
                converter="owl_jax.convert.llava")
