"""The MiniGPT-4 model against transformers' parts on the same random weights, composed as
MiniGPT-4's `encode_img` / `get_context_emb` / forward do: Blip2VisionModel's last hidden state
through ln_vision (LAVIS' eps 1e-5, with post_layernorm's weights), Blip2QFormerModel over the
query tokens, a torch Linear (llama_proj), and LlamaForCausalLM on the prompt embeddings with
each image's query outputs written where its slots are. fp32, non-default sizes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from owl_jax.convert.minigpt4 import params_from_state_dict
from owl_jax.families import minigpt4
from owl_jax.families.minigpt4 import config as mg_config
from owl_jax.families.minigpt4.model import MiniGPT4
from owl_jax.layers.scan import scan_params
from owl_jax.testing.models import FAST

from minigpt4_reference import CFG, VOCAB, Reference  # tests/ is on sys.path

pytestmark = pytest.mark.xdist_group("minigpt4_model")

T = CFG.image_tokens


@functools.lru_cache(maxsize=8)
def _jitted(cfg, method=None, scan=False):
    model = MiniGPT4(cfg, scan_layers=scan)
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method),
                   compiler_options=FAST)


def _pixels(n, seed=1, size=28):
    px = np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)
    return torch.from_numpy(px), jnp.asarray(px.transpose(0, 2, 3, 1))


def _rows(image_counts, length, seed=2):
    rng = np.random.default_rng(seed)
    rows = []
    for n in image_counts:
        text = length - n * T
        cuts = sorted(rng.choice(np.arange(1, text), n, replace=False)) if n else []
        row, prev = [], 0
        for c in list(cuts) + [text]:
            row += rng.integers(3, VOCAB, c - prev).tolist()
            if c != text:
                row += [-1] * T
            prev = c
        rows.append(row)
    return rows


def _close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rel * scale, f"max diff {err} vs scale {scale}"


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    model = Reference(CFG, seed=4)
    return model, params_from_state_dict(model.state_dict(), CFG, "hf")


def test_image_embeddings_match_reference(ref):
    model, params = ref
    px_t, px = _pixels(3)
    with torch.no_grad():
        want = model.encode_img(px_t).numpy()
        hs = model.vision_model(pixel_values=px_t, output_hidden_states=True).hidden_states
        k_part = model.vision_model.encoder.layers[0].self_attn.qkv.bias[
            CFG.vision.hidden_size:2 * CFG.vision.hidden_size]
    assert float(k_part.detach().abs().max()) > 0  # the dropped k bias is not zero here
    ours = _jitted(CFG, MiniGPT4.encode_images)(params, px)
    assert ours.shape == (3, T, CFG.text.hidden_size)
    _close(ours, want, 1e-5)
    # the ViT alone: EVA has no final norm (hidden_states[-1] is before post_layernorm)
    vit = _jitted(CFG, lambda m, x: m.visual_encoder(x))(params, px)
    _close(vit, hs[-1].numpy(), 1e-5)
    # ln_vision keeps its own eps: 1e-6 (the ViT's) would give other embeddings
    other = CFG.replace(ln_vision_eps=CFG.vision.layer_norm_eps)
    assert np.abs(np.asarray(_jitted(other, MiniGPT4.encode_images)(params, px)) - want).max() \
        > 0


def test_logits_match_reference_with_0_1_2_images(ref):
    model, params = ref
    rows = _rows((0, 1, 2), 2 * T + 6)
    px_t, px = _pixels(3, seed=3)
    with torch.no_grad():
        want = model.logits(rows, px_t).numpy()
    ours = _jitted(CFG)(params, jnp.asarray(rows, jnp.int32), px)
    assert ours.shape == (3, 2 * T + 6, VOCAB)
    _close(ours, want)
    with torch.no_grad():
        alone = model.logits(rows[:1], None).numpy()
    _close(_jitted(CFG)(params, jnp.asarray(rows[:1], jnp.int32)), alone)


def test_greedy_tokens_match_reference(ref):
    model, params = ref
    rows = _rows((0, 1, 2), 2 * T + 4, seed=5)
    px_t, px = _pixels(3, seed=6)
    ours_rows = [list(r) for r in rows]
    chosen = []
    for _ in range(4):
        with torch.no_grad():
            nxt_ref = model.logits(rows, px_t)[:, -1].argmax(-1).tolist()
        nxt = jnp.argmax(_jitted(CFG)(params, jnp.asarray(ours_rows, jnp.int32), px)[:, -1],
                         -1).tolist()
        assert nxt == nxt_ref
        chosen.append(nxt)
        rows = [r + [t] for r, t in zip(rows, nxt_ref)]
        ours_rows = [r + [t] for r, t in zip(ours_rows, nxt)]
    assert len({tuple(c) for c in zip(*chosen)}) == 3  # the rows differ: not vacuous


def test_scan_layers_match_unrolled(ref):
    _, params = ref
    rows = _rows((1, 2), 2 * T + 4, seed=7)
    _, px = _pixels(3, seed=8)
    ids = jnp.asarray(rows, jnp.int32)
    _close(_jitted(CFG, scan=True)(scan_params(params), ids, px), _jitted(CFG)(params, ids, px),
           1e-5)


def test_family_seam():
    fam = minigpt4.FAMILY
    assert fam.name == "minigpt4" and fam.model is MiniGPT4 and fam.tiny() == mg_config.tiny()
    assert CFG.image_tokens == CFG.qformer.num_query_tokens == 8
    names = [n for n, _, _ in fam.image_flops(CFG)]
    assert names == ["vision", "qformer"]
    cfg = mg_config.from_hf_dict(mg_config.to_hf_dict(CFG))
    assert cfg == CFG
