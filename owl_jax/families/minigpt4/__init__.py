"""MiniGPT-4 (arXiv 2304.10592): EVA ViT-g, the BLIP-2 Q-Former, one linear layer (llama_proj),
Vicuna / LLaMA; one LLM position per Q-Former query."""
from owl_jax.decoder.spliced import dummy_inputs
from owl_jax.families import Family
from owl_jax.families.minigpt4 import config, samples
from owl_jax.families.minigpt4.model import MiniGPT4
from owl_jax.families.minigpt4.processor import MiniGPT4Processor
from owl_jax.families.minigpt4.templates import build_prompt


def image_flops(cfg: config.MiniGPT4Config):
    """The ViT, the Q-Former (queries' self-attention, cross-attention to every image token on
    its layers, FFN) with llama_proj."""
    from owl_jax.train import flops
    q, t = cfg.qformer, cfg.vision.num_positions
    n, d, f, dv = q.num_query_tokens, q.hidden_size, q.intermediate_size, q.encoder_hidden_size
    cross = sum(q.has_cross_attention(i) for i in range(q.num_hidden_layers))
    mm = q.num_hidden_layers * 2 * n * (4 * d * d + 2 * d * f) + \
        cross * 2 * (2 * n * d * d + 2 * t * dv * d) + 2 * n * d * cfg.text.hidden_size
    attn = q.num_hidden_layers * 4 * n * n * d + cross * 4 * n * t * d
    return [("vision", ("visual_encoder", "ln_vision"), flops.vision_flops(cfg.vision)),
            ("qformer", ("qformer", "llama_proj"), flops.ModuleFlops(mm, 0.0, attn))]


FAMILY = Family(name="minigpt4", config_type=config.MiniGPT4Config, load_config=config.load,
                save_config=config.save, tiny=config.tiny, model=MiniGPT4,
                dummy_inputs=dummy_inputs, processor=MiniGPT4Processor,
                build_prompt=build_prompt, image_flops=image_flops, samples=samples,
                demo="owl_jax.families.minigpt4.demo", converter="owl_jax.convert.minigpt4")
