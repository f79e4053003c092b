"""mPLUG-Owl3 (arXiv 2408.04840): SigLIP, a linear (240728) or MLP (241101) projector, Qwen2
with hyper-attention layers; images never enter the token sequence (each image's placeholder
start is one media slot, see owl_jax.families.owl3.model)."""
from owl_jax.families import Family
from owl_jax.families.owl3 import config, samples, tokenizer
from owl_jax.families.owl3.model import Owl3, dummy_inputs
from owl_jax.families.owl3.processor import Owl3Processor, build_prompt


def image_flops(cfg: config.Owl3Config):
    """The SigLIP layers up to the feature layer, the projector and every hyper layer's
    v_kv_proj (per image). Not counted: the text's cross-attention to the images and the gate
    (they scale with the text, not per image)."""
    from owl_jax.train import flops
    from owl_jax.encoders.vit import VisionConfig
    v = cfg.vision
    used = cfg.vision_feature_layer % (v.num_hidden_layers + 1)
    as_vit = VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                          num_hidden_layers=used, num_attention_heads=v.num_attention_heads,
                          image_size=v.image_size, patch_size=v.patch_size)
    t = cfg.text
    kv_width = 2 * t.kv_heads * t.head_dim
    hyper_kv = flops.ModuleFlops(
        2 * cfg.tokens_per_image * t.hidden_size * kv_width * len(cfg.hyper_layers), 0.0, 0.0)
    return [("vision", ("vision_model",), flops.vision_flops(as_vit)),
            ("projector", ("vision2text_model",),
             flops.projector_flops(cfg.projector, v.hidden_size, cfg.text.hidden_size,
                                   cfg.tokens_per_image)),
            # the gate's params ride along: training them does not train the LLM either
            ("hyper_kv", ("language_model/*/self_attn/v_kv_proj/*",
                          "language_model/*/self_attn/gate_proj/*"), hyper_kv)]


FAMILY = Family(name="owl3", config_type=config.Owl3Config, load_config=config.load,
                save_config=config.save, tiny=config.tiny, model=Owl3,
                dummy_inputs=dummy_inputs, processor=Owl3Processor, build_prompt=build_prompt,
                image_flops=image_flops, samples=samples,
                converter="owl_jax.convert.owl3", tokenizer=tokenizer.load)
