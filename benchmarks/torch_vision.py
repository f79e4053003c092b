"""A compact PyTorch ViT + abstractor with the official math (mplug_owl.md §3.1-3.3), on the
weights of our param tree: `benchmarks/decode.py`'s time-to-first-token baseline (the
official-style path: encode the image in PyTorch, splice, prefill HF LLaMA)."""
import numpy as np
import torch
import torch.nn.functional as F


class TorchOwlVision:
    def __init__(self, cfg, params, device="cpu"):
        def t(x):
            return torch.from_numpy(np.array(x, np.float32)).to(device)
        self.cfg, self.p = cfg, jax_tree_to_torch(params, t)

    def __call__(self, pv):
        c, p = self.cfg, self.p
        v = p["vision_model"]
        emb = v["embeddings"]
        w = emb["patch_embed"]["kernel"].permute(3, 2, 0, 1)  # HWIO -> OIHW
        x = F.conv2d(pv, w, stride=c.vision.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([emb["cls_token"].expand(x.shape[0], -1, -1), x], 1)
        x = x + emb["position_embedding"][:, :x.shape[1]]
        x = _ln(x, emb["pre_layernorm"], c.vision.layer_norm_eps)
        h = c.vision.num_attention_heads
        for i in range(c.vision.num_hidden_layers):
            lp = v[f"layers_{i}"]
            y = _ln(x, lp["input_layernorm"], c.vision.layer_norm_eps)
            qkv = _lin(y, lp["self_attn"]["query_key_value"])
            b, n, _ = qkv.shape
            qkv = qkv.reshape(b, n, h, 3, -1).permute(3, 0, 2, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            x = x + _lin(a.transpose(1, 2).reshape(b, n, -1), lp["self_attn"]["dense"])
            y = _ln(x, lp["post_attention_layernorm"], c.vision.layer_norm_eps)
            y = _lin(y, lp["mlp"]["fc1"])
            x = x + _lin(y * torch.sigmoid(1.702 * y), lp["mlp"]["fc2"])
        feats = _ln(x, v["post_layernorm"], c.vision.layer_norm_eps)
        a = p["abstractor"]
        q = p["query_tokens"].expand(feats.shape[0], -1, -1)
        ha = c.abstractor.num_attention_heads
        for i in range(c.abstractor.num_hidden_layers):
            lp = a[f"layers_{i}"]
            qn = _ln(q, lp["norm1"], 1e-5)
            kv = torch.cat([qn, _ln(feats, lp["normk"], 1e-5)], 1)
            qq, kk, vv = (_heads(_lin(z, lp[n]), ha) for z, n in
                          ((qn, "query"), (kv, "key"), (kv, "value")))
            o = F.scaled_dot_product_attention(qq, kk, vv).transpose(1, 2).flatten(2)
            x = qn + _lin(o, lp["out_proj"])  # residual on the normed queries, as upstream
            y = _ln(x, lp["norm2"], 1e-5)
            y = F.silu(_lin(y, lp["w1"])) * _lin(y, lp["w3"])
            q = x + _lin(_ln(y, lp["ffn_ln"], c.abstractor.layer_norm_eps), lp["w2"])
        out = _lin(q, a["visual_fc"])
        return torch.cat([out, a["vit_eos"].expand(out.shape[0], -1, -1)], 1)


def jax_tree_to_torch(tree, t):
    if isinstance(tree, dict):
        return {k: jax_tree_to_torch(v, t) for k, v in tree.items()}
    return t(tree)


def _lin(x, p):
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def _ln(x, p, eps):
    return F.layer_norm(x, x.shape[-1:], p["scale"], p["bias"], eps)


def _heads(x, h):
    b, n, d = x.shape
    return x.reshape(b, n, h, d // h).transpose(1, 2)
