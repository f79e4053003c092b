"""Makes the mPLUG-Owl3 golden files: the official modeling code, tiny random weights.

Not run by the test suite. Run it out of the repo's environment, with the official code
(`modeling_mplugowl3.py`, `modeling_hyper_qwen2.py`, ... of mPLUG/mPLUG-Owl3-7B-240728) in
OWL3_CODE, under transformers 4.37.2 and torch (CPU):

    OWL3_CODE=/path/to/mPLUG-Owl3-7B-240728 python tests/golden/owl3/make_golden.py

Writes, per version, tests/golden/owl3/<version>/: config.json, model.safetensors (the
official state_dict, fp32), and cases.npz (per case: input_ids, media_offset, pixel_values NCHW,
logits of the forward pass, greedy tokens of `language_model.generate`) for 0 images, one
image, a cut image's three tiles, three images and an 8-frame video.

240728 is the official code as released. 241101's torch code is not public; its model is
the same code with the two changes the 241101 release describes (and the PaddleMIX port of it
implements): the projector is Linear-GELU-Linear, and each hyper layer's attention is one
softmax over [visual keys; text keys] (a token at t sees image i iff t >= start_i; MI-Rope at
start_i; no gate). `fused_attention_forward` below is that attention, written against the
official module's own projections and rotary tables.
"""
import json
import os
import sys
import types

import numpy as np
import torch
from torch import nn


def _load_torchvision():
    """PyPI's torchvision wheel is a CUDA build: under CPU torch its C ops fail to register.
    Skipping its fake-kernel registrations lets its Python parts (transforms, box ops) load."""
    register_fake = torch.library.register_fake

    def guarded(name, *a, **kw):
        if isinstance(name, str) and name.startswith("torchvision::"):
            return lambda fn: fn
        return register_fake(name, *a, **kw)
    torch.library.register_fake = guarded
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake


_load_torchvision()
sys.path.insert(0, os.environ["OWL3_CODE"])

from configuration_mplugowl3 import mPLUGOwl3Config  # noqa: E402
import modeling_hyper_qwen2 as mhq  # noqa: E402
from modeling_mplugowl3 import mPLUGOwl3Model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = os.path.dirname(os.path.abspath(__file__))
VOCAB = 256
PLACEHOLDER = [250, 251, 252]   # "<|", "image", "|>" of one <|image|> chunk

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_theta=50000.0, rms_norm_eps=1e-6, bos_token_id=VOCAB - 3,
            eos_token_id=VOCAB - 1, tie_word_embeddings=False, hyper_layers=[1, 3])
VISION = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, model_type="siglip_vision_model")


def media_offset_of(ids):
    """The official [1, L, 2] media_offset of one row: (images before the row, images whose
    placeholder starts before each token); -1e6 without images."""
    starts = [j for j in range(len(ids) - 2) if ids[j:j + 3] == PLACEHOLDER]
    if not starts:
        return torch.full((1, len(ids), 2), -1000000, dtype=torch.long), starts
    mo = torch.tensor([sum(s < j for s in starts) for j in range(len(ids))])
    return torch.stack([torch.zeros_like(mo), mo], 1)[None], starts


def fused_attention_forward(self, hidden_states, attention_mask=None, position_ids=None,
                            image_embeds=None, media_offset=None, past_key_value=None,
                            output_attentions=False, use_cache=False):
    """241101 hyper attention (batch 1): one softmax over visual then text keys."""
    bsz, q_len, _ = hidden_states.size()
    h, g, d = self.num_heads, self.num_key_value_heads, self.head_dim
    q = self.q_proj(hidden_states).view(bsz, q_len, h, d).transpose(1, 2)
    k = self.k_proj(hidden_states).view(bsz, q_len, g, d).transpose(1, 2)
    v = self.v_proj(hidden_states).view(bsz, q_len, g, d).transpose(1, 2)
    kv_len = k.shape[-2]
    if past_key_value is not None:
        kv_len += past_key_value.get_usable_length(kv_len, self.layer_idx)
    cos, sin = self.rotary_emb(v, seq_len=kv_len)
    q, k = mhq.apply_rotary_pos_emb(q, k, cos, sin, position_ids)
    if past_key_value is not None:
        k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos})
    k = mhq.repeat_kv(k, self.num_key_value_groups)
    v = mhq.repeat_kv(v, self.num_key_value_groups)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    if image_embeds is not None and self.is_hyper_enabed:
        assert bsz == 1
        if q_len > 1:
            self.visual_cache["media_offset"] = media_offset
        mo = self.visual_cache["media_offset"][0, :, 1]
        starts = (mo[1:] - mo[:-1]).nonzero().squeeze(1)   # the placeholder's first token
        n, p = image_embeds.shape[:2]
        kv = self.v_kv_proj(image_embeds).view(n * p, g, 2, d)
        vk = kv[:, :, 0].permute(1, 0, 2)[None]                 # [1, G, N*P, D]
        vv = kv[:, :, 1].permute(1, 0, 2)[None]
        vk = _mi_rope(self, vk, starts, p)
        vk = mhq.repeat_kv(vk, self.num_key_value_groups)
        vv = mhq.repeat_kv(vv, self.num_key_value_groups)
        t = torch.arange(kv_len - q_len, kv_len)
        t2v = (t[:, None] >= starts[None, :]).repeat_interleave(p, dim=1)
        mask = torch.cat([t2v, causal], 1)
        k, v = torch.cat([vk, k], 2), torch.cat([vv, v], 2)
    else:
        mask = causal
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
    o = o.transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
    return self.o_proj(o), None, past_key_value


def _mi_rope(self, key_layer, starts, length_each_img):
    """The official apply_mi_rope's math at positions `starts` (no +1)."""
    from einops import rearrange, repeat
    key_layer = rearrange(key_layer, "b h s d -> s b h d")
    emb = self.rotary_emb_core(self.config.max_position_embeddings)
    k_pos = repeat(emb[starts], "n b h d -> (n l) b h d", l=length_each_img)
    key_layer = mhq.apply_rotary_pos_emb_core(key_layer, k_pos, use_fp32=True)
    return rearrange(key_layer, "s b h d -> b h s d")


def build(version):
    torch.manual_seed({"240728": 0, "241101": 1}[version])
    cfg = mPLUGOwl3Config(vision_config=dict(VISION), **TEXT)
    cfg._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "eager"
    model = mPLUGOwl3Model(cfg)
    if version == "241101":
        vd, hd = VISION["hidden_size"], TEXT["hidden_size"]
        model.vision2text_model = nn.Sequential(nn.Linear(vd, hd), nn.GELU(), nn.Linear(hd, hd))
        for layer in model.language_model.model.layers:
            attn = layer.self_attn
            if attn.is_hyper_enabed:
                del attn.gate_proj
            attn.forward = types.MethodType(fused_attention_forward, attn)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return cfg, model.eval()


CASES = {
    "three_tiles": [VOCAB - 3, 5, 17, *PLACEHOLDER, 9, 33, *PLACEHOLDER, *PLACEHOLDER, 40, 41,
                    42, 7, 8],
    "leading_image": [*PLACEHOLDER, 12, 13, 14, 15, 16],
    "text_only": [VOCAB - 3, 30, 31, 32, 33, 34],
    "three_images": [VOCAB - 3, 5, *PLACEHOLDER, 9, 10, *PLACEHOLDER, 11, *PLACEHOLDER, 12, 13,
                     7],
}
FRAME_MARKERS = [240, 241]   # <|start_video_frame|>, <|end_video_frame|> (241101 only)


def video_case(version):
    """An 8-frame video: one placeholder per frame, between the frame markers in 241101."""
    frames = PLACEHOLDER * 8
    if version == "241101":
        frames = [FRAME_MARKERS[0], *frames, FRAME_MARKERS[1]]
    return [VOCAB - 3, 20, *frames, 21, 22, 7]


def main():
    for version in ("240728", "241101"):
        cfg, model = build(version)
        out = os.path.join(OUT, version)
        os.makedirs(out, exist_ok=True)
        d = cfg.to_dict()
        d["owl_jax_version"] = version
        for k in ("_attn_implementation_internal", "_commit_hash", "transformers_version"):
            d.pop(k, None)
            d["vision_config"].pop(k, None)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(d, f, indent=1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out, "model.safetensors"))
        arrays = {}
        for name, ids in {**CASES, "video_frames": video_case(version)}.items():
            mo, starts = media_offset_of(ids)
            n = len(starts)
            px = torch.randn(max(n, 1), 3, 28, 28) if n else None
            ids_t = torch.tensor([ids])
            with torch.no_grad():
                emb = model.forward_image(px) if n else None
                emb = emb.clone() if emb is not None else None
                logits = model.language_model(input_ids=ids_t, image_embeds=emb,
                                              media_offset=mo).logits
                gen = model.language_model.generate(
                    input_ids=ids_t, image_embeds=emb, media_offset=mo,
                    attention_mask=torch.ones_like(ids_t), max_new_tokens=6,
                    do_sample=False, pad_token_id=0, eos_token_id=VOCAB - 1)
            arrays[f"{name}/input_ids"] = np.array(ids, np.int32)
            arrays[f"{name}/starts"] = np.array(starts, np.int32)
            arrays[f"{name}/media_offset"] = mo.numpy()
            if n:
                arrays[f"{name}/pixel_values"] = px.numpy()
                arrays[f"{name}/image_embeds"] = emb.numpy()
            arrays[f"{name}/logits"] = logits.float().numpy()
            arrays[f"{name}/tokens"] = gen[0, len(ids):].numpy().astype(np.int32)
            print(version, name, arrays[f"{name}/tokens"])
        np.savez_compressed(os.path.join(out, "cases.npz"), **arrays)


if __name__ == "__main__":
    main()
