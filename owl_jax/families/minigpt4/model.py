"""The composed MiniGPT-4 (arXiv 2304.10592): EVA ViT-g -> ln_vision -> BLIP-2 Q-Former ->
llama_proj -> the query outputs written into LLaMA's input where the prompt has
`<Img><ImageHere></Img>`, one LLM position per query (MiniGPT-4's `encode_img` and
`prompt_wrap` / `get_context_emb`).

Param tree (MiniGPT-4's module names):
  visual_encoder/...   ln_vision   qformer/{query_tokens, layernorm, layer_{i}}   llama_proj
  language_model/...
"""
from __future__ import annotations

from owl_jax.connectors.qformer import QFormer
from owl_jax.decoder.llama import Llama
from owl_jax.decoder.spliced import SplicedVLM
from owl_jax.encoders.vit import VisionTransformer
from owl_jax.layers.core import Dense, LayerNorm


class MiniGPT4(SplicedVLM):
    """cfg: MiniGPT4Config."""

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        remat = self.remat_policy != "none"
        self.visual_encoder = VisionTransformer(c.vision, **kw, remat=remat,
                                                scan_layers=self.scan_layers)
        self.ln_vision = LayerNorm(c.ln_vision_eps, self.param_dtype)
        self.qformer = QFormer(c.qformer, **kw, remat=remat)
        self.llama_proj = Dense(c.text.hidden_size, ("embed", "text_embed"), **kw)
        self.language_model = Llama(c.text, **kw, scan_layers=self.scan_layers,
                                    remat_policy=self.remat_policy, lora=self.lora,
                                    lora_targets=self.lora_targets)

    def image_features(self, pixel_values, deterministic: bool = True):
        """pixel_values [N, H, W, 3] -> ln_vision(ViT tokens) [N, 1 + patches, Dv]: what the
        Q-Former cross-attends to (BLIP-2's `image_embeds`)."""
        return self.ln_vision(self.visual_encoder(pixel_values))

    def encode_images(self, pixel_values, deterministic: bool = True):
        """pixel_values [..., H, W, 3] (normalized, NHWC) -> [..., num_query_tokens, D_text]."""
        lead = pixel_values.shape[:-3]
        feats = self.image_features(pixel_values.reshape(-1, *pixel_values.shape[-3:]))
        out = self.llama_proj(self.qformer(feats, deterministic))
        return out.reshape(*lead, *out.shape[1:])
