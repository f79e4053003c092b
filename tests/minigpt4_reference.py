"""MiniGPT-4's forward over transformers' parts (the reference of the MiniGPT-4 tests), and
its weights written in MiniGPT-4's LAVIS release layout by the key table of the reference notes
(written out here on its own, independent of owl_jax's key map)."""
import os

import numpy as np
import torch

from owl_jax.families.minigpt4 import config as mg_config

VOCAB = 120
CFG = mg_config.tiny(vocab_size=VOCAB, num_key_value_heads=2)


def _randomize(module: torch.nn.Module, seed: int):
    """Norm scales away from 1, non-zero biases (the ViT's k bias part too: it must not
    matter), unit-ish activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("norm" in name.lower()) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "query_tokens" not in name and "embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


class Reference(torch.nn.Module):
    """MiniGPT-4's forward over transformers' parts."""

    def __init__(self, cfg, seed=0):
        super().__init__()
        from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig,
                                  Blip2VisionModel, LlamaConfig, LlamaForCausalLM)
        d = mg_config.to_hf_dict(cfg)
        kw = dict(attn_implementation="eager")
        self.vision_model = Blip2VisionModel._from_config(
            Blip2VisionConfig.from_dict(d["vision_config"]), **kw)
        self.qformer = Blip2QFormerModel._from_config(
            Blip2QFormerConfig.from_dict(d["qformer_config"]), **kw)
        self.query_tokens = torch.nn.Parameter(torch.zeros(1, cfg.image_tokens,
                                                             cfg.qformer.hidden_size))
        self.language_projection = torch.nn.Linear(cfg.qformer.hidden_size,
                                                   cfg.text.hidden_size)
        self.language_model = LlamaForCausalLM._from_config(
            LlamaConfig.from_dict(d["text_config"]), **kw)
        self.eps = cfg.ln_vision_eps
        self.eval()
        _randomize(self, seed)

    def encode_img(self, px):
        hs = self.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        ln = self.vision_model.post_layernorm
        emb = torch.nn.functional.layer_norm(hs, ln.normalized_shape, ln.weight, ln.bias,
                                             self.eps)
        q = self.qformer(query_embeds=self.query_tokens.expand(px.shape[0], -1, -1),
                         encoder_hidden_states=emb,
                         encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long))
        return self.language_projection(q.last_hidden_state)

    def logits(self, rows, px):
        """rows: id lists with T ids of -1 per image (in order of px)."""
        T = self.query_tokens.shape[1]
        img = self.encode_img(px) if px is not None else None
        embed = self.language_model.get_input_embeddings()
        out, k = [], 0
        for row in rows:
            parts, i = [], 0
            while i < len(row):
                if row[i] < 0:
                    parts.append(img[k])
                    k, i = k + 1, i + T
                else:
                    j = i
                    while j < len(row) and row[j] >= 0:
                        j += 1
                    parts.append(embed(torch.tensor(row[i:j])))
                    i = j
            out.append(torch.cat(parts))
        return self.language_model(inputs_embeds=torch.stack(out)).logits


def _np(t):
    return t.detach().cpu().numpy().copy()


def lavis_state_dicts(model: Reference, extra_block_seed: int = 9):
    """(eva_vit_g.pth dict, BLIP-2 model dict, MiniGPT-4 model dict) of the reference's weights,
    named as MiniGPT-4's modules are. The EVA dict holds one more block than the model uses
    (random: it must be ignored), as the released file does; the BLIP-2 dict holds its
    position_ids buffer and parts MiniGPT-4 drops (t5_proj, a text FFN)."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    eva = {"cls_token": sd["vision_model.embeddings.class_embedding"],
           "pos_embed": sd["vision_model.embeddings.position_embedding"],
           "patch_embed.proj.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": sd["vision_model.embeddings.patch_embedding.bias"]}
    d = eva["cls_token"].shape[-1]
    n = len(model.vision_model.encoder.layers)
    for i in range(n):
        h, b = f"vision_model.encoder.layers.{i}.", f"blocks.{i}."
        bias = sd[h + "self_attn.qkv.bias"]
        eva.update({b + "norm1.weight": sd[h + "layer_norm1.weight"],
                    b + "norm1.bias": sd[h + "layer_norm1.bias"],
                    b + "attn.qkv.weight": sd[h + "self_attn.qkv.weight"],
                    b + "attn.q_bias": bias[:d].copy(), b + "attn.v_bias": bias[2 * d:].copy(),
                    b + "attn.proj.weight": sd[h + "self_attn.projection.weight"],
                    b + "attn.proj.bias": sd[h + "self_attn.projection.bias"],
                    b + "norm2.weight": sd[h + "layer_norm2.weight"],
                    b + "norm2.bias": sd[h + "layer_norm2.bias"]})
        for fc in ("fc1", "fc2"):
            for w in ("weight", "bias"):
                eva[f"{b}mlp.{fc}.{w}"] = sd[f"{h}mlp.{fc}.{w}"]
    rng = np.random.default_rng(extra_block_seed)
    for k in [k for k in eva if k.startswith("blocks.0.")]:
        eva[f"blocks.{n}." + k[len("blocks.0."):]] = \
            rng.standard_normal(eva[k].shape).astype(np.float32)
    blip2 = {"ln_vision.weight": sd["vision_model.post_layernorm.weight"],
             "ln_vision.bias": sd["vision_model.post_layernorm.bias"],
             "query_tokens": sd["query_tokens"],
             "Qformer.bert.embeddings.position_ids": np.arange(512)[None],
             "t5_proj.weight": rng.standard_normal((5, 4)).astype(np.float32)}
    for k, v in sd.items():
        if k == "qformer.layernorm.weight" or k == "qformer.layernorm.bias":
            blip2["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("qformer."):
            blip2["Qformer.bert." + k[len("qformer."):].replace(".attention.attention.",
                                                                ".attention.self.")
                  .replace(".crossattention.attention.", ".crossattention.self.")] = v
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = \
        rng.standard_normal((6, 4)).astype(np.float32)
    proj = {"llama_proj.weight": sd["language_projection.weight"],
            "llama_proj.bias": sd["language_projection.bias"]}
    return eva, blip2, proj


def write_lavis(model: Reference, directory: str, with_proj: bool = True) -> None:
    """The reference's weights as MiniGPT-4's release: the three .pth files and the Vicuna as a
    HF LLaMA directory (vicuna/)."""
    eva, blip2, proj = lavis_state_dicts(model)
    t = lambda d: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}  # noqa
    os.makedirs(directory, exist_ok=True)
    torch.save(t(eva), os.path.join(directory, "eva_vit_g.pth"))
    torch.save({"model": t(blip2)}, os.path.join(directory, "blip2_pretrained_flant5xxl.pth"))
    if with_proj:
        torch.save({"model": t(proj), "epoch": 3, "config": {"run": {"init_lr": 1e-4}}},
                   os.path.join(directory, "pretrained_minigpt4.pth"))
    model.language_model.save_pretrained(os.path.join(directory, "vicuna"))


def save_blip2(model: Reference, directory: str, cfg=CFG) -> None:
    """The reference's weights as a transformers Blip2ForConditionalGeneration directory."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    hf = Blip2ForConditionalGeneration(Blip2Config.from_dict(mg_config.to_hf_dict(cfg)))
    hf.load_state_dict(model.state_dict(), strict=True)
    hf.save_pretrained(directory)


