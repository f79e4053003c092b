"""The demo's mPLUG-Owl (`python -m owl_jax.demo`, configs/demo_shapes.py).

mPLUG-Owl (family=owl1; each stage starts from the previous stage's WORKDIR/export):
  warmup  the LLM alone learns the official prompt template, the answer phrasing and the
          colour/shape words from text: official-format text-only conversations ("Human: I see
          a red circle on a gray background. What colour is the shape?\\nAI: The shape is red.")
          and plain-text lines "red circle gray. a red circle on a gray background" (every token
          trained). The second teaches the LLM to describe what its context names, the ability a
          pretrained LLM brings to stage 1 and which the image tokens then have to trigger.
          Trainable: language_model/.*  (the ViT and the abstractor see no data yet).
  stage1  image-caption pairs from img2dataset webdataset shards, LLM frozen, ViT + queries +
          abstractor trained (the paper's stage 1): the only way for the caption loss to go down
          is for the 9 visual tokens to tell the frozen LLM the colour and the shape.
  stage2  the official instruction jsonl (mPLUG-Owl format) with images, LoRA (r=8, alpha=32)
          on the LLM's q_proj / v_proj, everything else frozen (the official LoRA script).
"""
from __future__ import annotations

from owl_jax.demo import family, shapes


def model_config(vocab_size: int):
    """The Owl demo's model: ~0.9M parameters, 32 px images, 9 visual tokens per image."""
    from owl_jax.connectors.abstractor import AbstractorConfig
    from owl_jax.families.owl1.config import OwlConfig
    return OwlConfig(
        vision=family.vision(num_hidden_layers=2),
        abstractor=AbstractorConfig(hidden_size=96, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=288, encoder_hidden_size=96,
                                    attention_probs_dropout_prob=0.0),
        text=family.text(vocab_size),
        num_query_tokens=8,
    )


def inference_text(turns) -> str:
    """A text-only conversation as mPLUG-Owl reads it at inference. Training encodes "AI: " as a
    chunk of its own ("▁AI", ":", "▁"), the official processor encodes the prompt's last chunk
    whole ("?\\n", "AI", ":", "▁"); a line with "AI:  " (two spaces) encodes like that, answer
    included. A pretrained 7B LLM knows both; ours, trained from scratch, had never seen "AI"
    without its "▁" and answered "." to up to half the shape questions."""
    return shapes.owl_text(turns, with_image=False).replace("\nAI: ", "\nAI:  ")


def stage(c, a, p: dict) -> None:
    """mPLUG-Owl's stages (the module docstring)."""
    fmt = DEMO.instruction_format
    if a.stage == "warmup":
        family.warmup_stage(c, a, p, fmt)
    elif a.stage == "stage1":
        c.trainable = ("vision_model/.*", "query_tokens", "abstractor/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2  # the shape signal is noisy: 64 images per step
        c.batch.seq_len = 28         # BOS + 9 image slots + the longest caption + EOS
        c.data = dict(family.COMMON_DATA, packing=False, sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 32.0, 0.0
        c.lora.targets = ("q_proj", "v_proj")
        c.trainable = (".*/lora_[ab]",)
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 30
        c.batch.seq_len = 96
        c.data = dict(family.COMMON_DATA, packing=False, sources=[
            family.instruction_source(p, fmt)])


DEMO = family.DemoFamily(
    title="mPLUG-Owl", model_config=model_config, render=shapes.owl_text,
    inference_text=inference_text,
    keyword_line=lambda kw, caption: f"{kw}. {caption}",
    stage_titles=dict(
        warmup="text warm-up of the LLM (template, answer phrasing, colour and shape words)",
        stage1="stage 1: captioning, LLM frozen, ViT + abstractor trained",
        stage2="stage 2: instruction tuning, LoRA on the LLM"),
    stage=stage, steps={"warmup": 300, "stage1": 2000, "stage2": 500},
    instruction_format="owl",
    part_names={"language_model": "LLM", "vision_model": "ViT", "query_tokens": "queries",
                "abstractor": "abstractor"},
    connector=lambda cfg: (f"abstractor {cfg.num_query_tokens} queries -> {cfg.image_tokens} "
                           f"visual tokens"))
