"""The demo's MiniGPT-4 (`python -m owl_jax.demo --family minigpt4`, configs/demo_shapes.py):
the LLaVA data files in MiniGPT-4's templates.

  warmup  the LLM alone learns the template and the words (as the Owl demo's warm-up), the
          conversations rendered in MiniGPT-4's chat template (v1: "###Human: ... ###Assistant:
          ...###"; only the answers and their "###" train), the plain-text lines as stage 1
          trains captions (BLIP-cleaned, "\\n"). Trainable: language_model/.*
  stage1  MiniGPT-4's stage 1 layout ([BOS] + the 8 query embeddings + cleaned caption +
          "\\n", no prompt), LLM frozen; MiniGPT-4 trains llama_proj alone on a pretrained
          EVA + BLIP-2 Q-Former, the demo's are random: ViT + ln_vision + Q-Former + llama_proj
          train here.
  stage2  the demo's instruction set in the chat template asked at inference, llama_proj + the
          LLM trained, ViT + Q-Former frozen (MiniGPT-4's stage 2 trains llama_proj alone on
          3.5K curated descriptions; a from-scratch LLM also has to learn to answer).
"""
from __future__ import annotations

from owl_jax.demo import family
from owl_jax.families.minigpt4 import templates


def model_config(vocab_size: int):
    """The MiniGPT-4 demo's model: an EVA-style ViT of the Owl demo's size (exact GELU, q / v
    biases, no pre- or post-norm) with ln_vision, a 2-layer Q-Former (cross-attention at layer
    0, 8 queries, width 96), llama_proj, the same LLM."""
    from owl_jax.connectors.qformer import QFormerConfig
    from owl_jax.families.minigpt4.config import MiniGPT4Config, eva_vision
    return MiniGPT4Config(
        vision=eva_vision(hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                          num_attention_heads=4, image_size=32, patch_size=8),
        qformer=QFormerConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=288, encoder_hidden_size=96,
                              num_query_tokens=8, hidden_dropout_prob=0.0),
        text=family.text(vocab_size))


def render(turns, with_image: bool = True) -> str:
    """A conversation in MiniGPT-4's chat template (v1), the image as "<Img><ImageHere></Img>"
    before the first question."""
    return templates.build_prompt([m for qa in turns for m in qa], 1 if with_image else 0)


def keyword_line(kw: str, caption: str) -> str:
    """The keywords where stage 1's image stands, then the caption as stage 1 trains it (BLIP's
    caption cleaning, "\\n")."""
    from owl_jax.families.minigpt4.samples import blip_caption
    return f"{kw}. {blip_caption(caption)}\n"


def stage(c, a, p: dict) -> None:
    """MiniGPT-4's stages (the module docstring), with its templates and sample layouts."""
    fmt = DEMO.instruction_format
    if a.stage == "warmup":
        family.warmup_stage(c, a, p, fmt, template="minigpt4_v1")
    elif a.stage == "stage1":
        c.trainable = ("visual_encoder/.*", "ln_vision/.*", "qformer/.*", "llama_proj/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2
        c.batch.seq_len = 28         # BOS + 8 query slots + the longest caption + "\n"
        c.data = dict(family.COMMON_DATA, packing=False, template="minigpt4_stage1", sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.trainable = ("llama_proj/.*", "language_model/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 30
        c.batch.seq_len = 112
        c.data = dict(family.COMMON_DATA, packing=False, template="minigpt4_v1", sources=[
            family.instruction_source(p, fmt)])


DEMO = family.DemoFamily(
    title="MiniGPT-4", model_config=model_config, render=render,
    # one string, each answer ending with "###" as stage 2 trains it (the text task adds EOS)
    inference_text=lambda turns: render(turns, with_image=False),
    keyword_line=keyword_line,
    stage_titles=dict(
        warmup="text warm-up of the LLM (MiniGPT-4's ###Human / ###Assistant template, answer "
               "phrasing, colour and shape words)",
        stage1="stage 1: captioning ([BOS] + queries + caption), LLM frozen, ViT + Q-Former + "
               "llama_proj trained",
        stage2="stage 2: instruction tuning in the chat template, llama_proj + LLM trained, "
               "ViT + Q-Former frozen"),
    stage=stage, steps={"warmup": 300, "stage1": 2000, "stage2": 500},
    instruction_format="llava",
    part_names={"language_model": "LLM", "visual_encoder": "ViT", "ln_vision": "ViT",
                "qformer": "Q-Former", "llama_proj": "llama_proj"},
    connector=lambda cfg: (f"Q-Former {cfg.qformer.num_hidden_layers}x{cfg.qformer.hidden_size} "
                         f"-> llama_proj -> {cfg.image_tokens} visual tokens"),
    convert_args=("--layout", "lavis"))
