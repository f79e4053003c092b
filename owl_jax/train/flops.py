"""Analytic training FLOPs per step, by module, with frozen modules counted properly.

Every matmul of a forward pass costs F = 2 * m * k * n. In training:
  - forward:                      F
  - activation gradients (dX):    F, needed wherever something trainable sits upstream of or
                                  inside the module (gradient must flow through it)
  - weight gradients (dW):        F, only for trainable weights (incl. LoRA adapters)
Attention score / value products have no weights: their backward is 2F whenever dX is needed.

So a fully trained transformer costs the familiar 6N per token, a frozen LLM that gradients
must cross (stage 1: the ViT sits upstream) costs 4N, and a frozen module with nothing
trainable upstream (the ViT in stage 2) costs its forward only, 2N. Causal attention is counted
at half the S x S products (MaxText's convention since 2025). Embedding lookups, norms and
elementwise ops are not counted. This is MODEL FLOPs (MFU): rematerialisation is not counted.

The image path is the family's: `Family.image_flops(cfg)` lists its per-image modules in order
(name, their params, ModuleFlops), built from the tower functions here. A module's params are
top-level names, or path patterns (fnmatch) for per-image params that live inside another
module (mPLUG-Owl3's `language_model/*/v_kv_proj/*`): training those does not train the LLM.
"""
from __future__ import annotations

import dataclasses
import fnmatch

from owl_jax import families


@dataclasses.dataclass
class ModuleFlops:
    weights: float       # forward FLOPs of matmuls against frozen weights
    lora: float          # forward FLOPs of matmuls against LoRA adapter weights
    attention: float     # forward FLOPs of weightless attention products


def vision_flops(v) -> ModuleFlops:
    """Per image, for a ViT config (hidden_size, intermediate_size, num_positions, ...)."""
    d, f, n = v.hidden_size, v.intermediate_size, v.num_positions
    patches = n - 1
    per_layer = 2 * n * (d * 3 * d + d * d + 2 * d * f)
    conv = 2 * patches * (v.patch_size ** 2 * v.num_channels) * d
    attn = 2 * 2 * n * n * d  # QK^T and PV, bidirectional
    return ModuleFlops(v.num_hidden_layers * per_layer + conv, 0.0,
                       v.num_hidden_layers * attn)


def abstractor_flops(cfg) -> ModuleFlops:
    """Per image: Q queries cross-attend to (Q + vision tokens); then visual_fc to the LLM."""
    a = cfg.abstractor
    q, d, f = cfg.num_query_tokens, a.hidden_size, a.intermediate_size
    kv = q + cfg.vision.num_positions
    per_layer = 2 * (q * d * d + 2 * kv * a.encoder_hidden_size * d + q * d * d + 3 * q * d * f)
    attn = 2 * 2 * q * kv * d
    return ModuleFlops(a.num_hidden_layers * per_layer + 2 * q * d * cfg.text.hidden_size, 0.0,
                       a.num_hidden_layers * attn)


def projector_flops(kind: str, d_in: int, d_out: int, tokens: int) -> ModuleFlops:
    """Per image: a linear map, or Linear -> GELU -> Linear (`mlp2x_gelu`)."""
    f = 2 * tokens * d_in * d_out + (2 * tokens * d_out * d_out if kind != "linear" else 0)
    return ModuleFlops(f, 0.0, 0.0)


def llm_flops(t, seq_len: int, lora_rank: int = 0,
              lora_targets: tuple[str, ...] = ()) -> ModuleFlops:
    """Per row of seq_len tokens, for a decoder's TextConfig."""
    d, f, hd = t.hidden_size, t.intermediate_size, t.head_dim
    dq, dkv = t.num_attention_heads * hd, t.kv_heads * hd
    shapes = {"q_proj": (d, dq), "k_proj": (d, dkv), "v_proj": (d, dkv), "o_proj": (dq, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    per_layer = sum(2 * seq_len * i * o for i, o in shapes.values())
    lora = sum(2 * seq_len * lora_rank * (shapes[n][0] + shapes[n][1])
               for n in lora_targets if n in shapes) if lora_rank else 0
    attn = 2 * 2 * seq_len * seq_len * dq / 2  # causal: half of the S x S products
    head = 2 * seq_len * d * t.vocab_size
    return ModuleFlops(t.num_hidden_layers * per_layer + head, t.num_hidden_layers * lora,
                       t.num_hidden_layers * attn)


def _train_cost(m: ModuleFlops, weights_trained: bool, grad_flows: bool) -> float:
    fwd = m.weights + m.lora + m.attention
    dx = (m.weights + m.lora + 2 * m.attention) if grad_flows else 0.0
    dw = (m.weights if weights_trained else 0.0) + m.lora
    return fwd + dx + dw


def _owns(pattern: str, path: str) -> bool:
    """A top-level name owns itself and everything under it; a pattern with a "/" matches."""
    if "/" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.startswith(pattern + "/")


def train_flops_per_step(cfg, *, global_batch: int, seq_len: int,
                         images_per_row: int, trainable, lora_rank: int = 0,
                         lora_targets: tuple[str, ...] = ()) -> dict[str, float]:
    """Model FLOPs of one optimizer step over the global batch, split by module: the family's
    image modules (e.g. 'vision', 'abstractor'), 'llm' and 'total'.

    trainable: the trained params, as paths ("language_model/layers_0/mlp/...") or top-level
    names (all of it); LoRA adapters (lora_a / lora_b leaves) count through lora_rank > 0.
    Images: every row runs `images_per_row` images (padding slots included, as the step
    computes them).
    """
    trainable = [p for p in trainable if p.split("/")[-1] not in ("lora_a", "lora_b")]
    n_img = global_batch * images_per_row
    out, upstream = {}, False
    inner = []   # path patterns of per-image params inside other modules
    # dX through a module is needed when anything trainable is upstream of or inside it
    # (the first module's own input needs no gradient, but its upper layers do when it trains).
    for name, owned, m in families.of_config(cfg).image_flops(cfg):
        inner += [o for o in owned if "/" in o]
        trained = any(_owns(o, p) for o in owned for p in trainable)
        upstream = upstream or trained
        out[name] = _train_cost(m, trained, upstream) * n_img
    llm_t = any(_owns(families.DECODER, p) and not any(_owns(o, p) for o in inner)
                for p in trainable)
    lora_t = lora_rank > 0
    llm_m = llm_flops(cfg.text, seq_len, lora_rank if lora_t else 0, lora_targets)
    out["llm"] = _train_cost(llm_m, llm_t, upstream or llm_t or lora_t) * global_batch
    out["total"] = sum(out.values())
    return out


PEAK_TFLOPS_BF16 = {  # dense bf16 per device (no sparsity)
    "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Best-effort peak bf16 TFLOP/s for a jax device_kind string; None when unknown (CPU)."""
    kind = device_kind.lower()
    for name in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if name.lower() in kind:
            return PEAK_TFLOPS_BF16[name]
    return None
