"""The composed LLaVA model: CLIP ViT -> one hidden layer's patch tokens -> projector -> spliced
into LLaMA's input, one LLM position per patch.

Param tree (the llava-hf module names):
  vision_tower/...   multi_modal_projector/linear_1 (, linear_2)   language_model/...
"""
from __future__ import annotations

from owl_jax.connectors.projector import Projector
from owl_jax.decoder.llama import Llama
from owl_jax.decoder.spliced import SplicedVLM
from owl_jax.encoders.vit import VisionTransformer


class Llava(SplicedVLM):
    """cfg: LlavaConfig. llava-hf's module names: `vision_tower`, `multi_modal_projector`,
    `language_model`."""

    def setup(self):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = VisionTransformer(c.vision, **kw,
                                              remat=self.remat_policy != "none",
                                              scan_layers=self.scan_layers,
                                              feature_layer=c.vision_feature_layer)
        self.multi_modal_projector = Projector(c.projector, c.text.hidden_size, **kw)
        self.language_model = Llama(c.text, **kw, scan_layers=self.scan_layers,
                                    remat_policy=self.remat_policy, lora=self.lora,
                                    lora_targets=self.lora_targets)

    def encode_images(self, pixel_values, deterministic: bool = True):
        """pixel_values [..., H, W, 3] (normalized, NHWC) -> [..., image_tokens, D_text]: the
        tower's hidden state `vision_feature_layer` (HF `hidden_states` indexing, no final
        LayerNorm), without CLS under the "default" strategy, through the projector."""
        lead = pixel_values.shape[:-3]
        feats = self.vision_tower(pixel_values.reshape(-1, *pixel_values.shape[-3:]))
        if self.cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        out = self.multi_modal_projector(feats)
        return out.reshape(*lead, *out.shape[1:])
