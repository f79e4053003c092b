"""The demo's LLaVA (`python -m owl_jax.demo --family llava`, configs/demo_shapes.py).

LLaVA (family=llava), the same data in LLaVA's formats and templates:
  warmup  the LLM alone learns the template and the words (as the Owl demo's warm-up), the
          conversations as a LLaVA json (text-only records, like those of
          LLaVA-1.5's mix665k) rendered with `vicuna_v1` (only the answers and their </s>
          train, LLaVA's mask), the plain-text lines in the same `vicuna_v1` rendering.
          Trainable: language_model/.*
  stage1  LLaVA's feature alignment: the caption shards in the `plain` template ("<image>" +
          caption + "\\n"), LLM frozen, projector trained AND the CLIP tower: LLaVA freezes a
          pretrained CLIP, the demo's tower is random and has to learn to see (as the Owl
          demo's ViT does in its stage 1).
  stage2  LLaVA-1.5's visual instruction tuning: the demo's instruction set as a LLaVA json
          (`conversations`, `image`), `vicuna_v1`, projector + the whole LLM trained, the tower
          frozen (`scripts/v1_5/finetune.sh`).
"""
from __future__ import annotations

from owl_jax.demo import family
from owl_jax.families.llava import templates


def model_config(vocab_size: int):
    """The LLaVA demo's model: the Owl demo's ViT (CLIP layer norm eps 1e-5) with one more layer
    that LLaVA's penultimate-layer tap never runs (vision_feature_layer -2: 2 layers run, as in
    the Owl demo), 16 patch tokens per image, the `mlp2x_gelu` projector of LLaVA-1.5, the same
    LLM; one vocabulary row more than the tokenizer for `<image>` (llava-hf style)."""
    from owl_jax.families.llava.config import LlavaConfig
    return LlavaConfig(vision=family.vision(num_hidden_layers=3, layer_norm_eps=1e-5),
                       text=family.text(vocab_size + 1), projector="mlp2x_gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_token_index=vocab_size, image_aspect_ratio="pad")


def render(turns, with_image: bool = True) -> str:
    """A conversation in LLaVA's `vicuna_v1` template (an image as the first user turn's
    "<image>\\n" line)."""
    msgs = [m for qa in turns for m in qa]
    if with_image:
        msgs[0] = "<image>\n" + msgs[0]
    return templates.render(msgs, "vicuna_v1")


def inference_text(turns) -> str:
    """A text-only conversation as LLaVA reads it: `vicuna_v1` as one string (LLaVA encodes a
    text-only conversation, and the chunk after an image, whole, as its prompts at inference),
    without the final "</s>" (the text task appends EOS)."""
    text = render(turns, with_image=False)
    return text[:-len("</s>")] if text.endswith("</s>") else text


def stage(c, a, p: dict) -> None:
    """LLaVA's stages (the module docstring): the data pipeline lays the samples out with
    LLaVA's templates and loss masks (`template`)."""
    fmt = DEMO.instruction_format
    if a.stage == "warmup":
        family.warmup_stage(c, a, p, fmt, template="vicuna_v1")
    elif a.stage == "stage1":
        c.trainable = ("vision_tower/.*", "multi_modal_projector/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 50
        c.batch.global_size = a.batch * 2
        c.batch.seq_len = 32         # BOS + 16 image slots + the longest caption + "\n"
        c.data = dict(family.COMMON_DATA, packing=False, template="plain", sources=[
            dict(spec=f"webdataset:{p['train_shards']}", task="caption")])
    else:
        c.trainable = ("multi_modal_projector/.*", "language_model/.*")
        c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 30
        c.batch.seq_len = 112
        c.data = dict(family.COMMON_DATA, packing=False, template="vicuna_v1", sources=[
            family.instruction_source(p, fmt)])


DEMO = family.DemoFamily(
    title="LLaVA", model_config=model_config, render=render, inference_text=inference_text,
    # the keywords stand where stage 1's image stands, the caption follows as in `plain`
    keyword_line=lambda kw, caption: f"{kw}. {caption}\n",
    stage_titles=dict(
        warmup="text warm-up of the LLM (vicuna_v1 template, answer phrasing, colour and "
               "shape words)",
        stage1="stage 1: feature alignment on captions (plain template), LLM frozen, "
               "ViT + projector trained",
        stage2="stage 2: visual instruction tuning (vicuna_v1), projector + LLM trained, "
               "ViT frozen"),
    stage=stage,
    # Half of Owl's stage 1: its 16 patch tokens reach the LLM directly, where Owl's abstractor
    # compresses them into 8 queries (measured: plain captions name colour 100% and shape 99%
    # of the held-out images after 1,000 steps as after 2,000).
    steps={"warmup": 300, "stage1": 1000, "stage2": 500},
    instruction_format="llava",
    part_names={"language_model": "LLM", "vision_tower": "ViT",
                "multi_modal_projector": "projector"},
    connector=lambda cfg: (f"{cfg.projector} projector on layer {cfg.vision_feature_layer} -> "
                         f"{cfg.image_tokens} visual tokens"),
    convert_args=("--layout", "hf"))
