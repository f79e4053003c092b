"""Golden values from the official mPLUG-Owl PyTorch code.

`tests/golden/official_tiny_bf16/` was produced once by running the upstream
`modeling/processing_mplug_owl.py` under transformers 4.28.1 (see its README.md): a random
bf16 single-file checkpoint with non-default sizes, the official processor's input ids and pixel
values, fp32 logits, and greedy tokens. No upstream code is in the repo, only those outputs.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from owl_jax.convert.cli import main as owl_convert
from owl_jax.checkpoint import load_checkpoint
from owl_jax.families.owl1.model import Owl
from owl_jax.families.owl1.processor import Processor
from owl_jax.tokenizer import OwlTokenizer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "official_tiny_bf16")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("golden") / "jax")
    assert owl_convert(["torch-to-jax", os.path.join(GOLDEN, "checkpoint"), dst]) == 0
    cfg, params, _ = load_checkpoint(dst, dtype=jnp.float32)
    return dst, cfg, params


def _reference():
    with open(os.path.join(GOLDEN, "reference", "reference.json")) as f:
        return json.load(f)


def _inputs(dst, cfg, k):
    prompt = _reference()["prompts"][k]
    images = [os.path.join(GOLDEN, p) for p in prompt["images"]]
    return Processor(OwlTokenizer.from_dir(dst), cfg)([prompt["text"]], [images])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_ids_pixels_and_logits_match_official(converted, k):
    dst, cfg, params = converted
    batch = _inputs(dst, cfg, k)
    ref = lambda name: np.load(os.path.join(GOLDEN, "reference", f"{name}_{k}.npy"))
    np.testing.assert_array_equal(batch["input_ids"], ref("ids"))
    if k:
        np.testing.assert_array_equal(batch["pixel_values"], ref("pixels").transpose(0, 2, 3, 1))
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(Owl(cfg).apply)({"params": params}, jnp.asarray(batch["input_ids"]),
                                         jnp.asarray(batch["pixel_values"]) if k else None)
    want = ref("logits_fp32")
    scale = np.abs(want).max()
    assert np.abs(np.asarray(logits) - want).max() <= 1e-4 * scale


def test_greedy_tokens_match_official(converted):
    """Greedy by full recomputation (independent of the generation engine)."""
    dst, cfg, params = converted
    model = Owl(cfg)
    # Right-padded to one length, so each image count compiles once; causal attention means the
    # padding never reaches position n - 1.
    step = jax.jit(lambda ids, px, n: model.apply({"params": params}, ids, px)[0, n - 1].argmax())
    for k, prompt in enumerate(_reference()["prompts"]):
        batch = _inputs(dst, cfg, k)
        ids = list(batch["input_ids"][0])
        px = jnp.asarray(batch["pixel_values"]) if prompt["n_images"] else None
        want = _reference()["greedy_fp32"][f"prompt{k}"][1:]  # HF 4.28 prepends BOS
        got = []
        while len(got) < len(want):
            seq = ids + got
            padded = jnp.asarray([seq + [0] * (320 - len(seq))])
            got.append(int(step(padded, px, len(seq))))
            if got[-1] == cfg.text.eos_token_id:
                break
        assert got == want, k


def test_jax_to_torch_is_bit_exact(converted, tmp_path):
    dst, _, _ = converted
    back = str(tmp_path / "torch")
    assert owl_convert(["jax-to-torch", dst, back]) == 0
    load = lambda d: torch.load(os.path.join(d, "pytorch_model.bin"), weights_only=True)
    orig, new = load(os.path.join(GOLDEN, "checkpoint")), load(back)
    assert sorted(orig) == sorted(new)
    for key, t in orig.items():
        assert new[key].dtype == t.dtype and torch.equal(new[key], t), key
    # The source's own config files come back, fields owl-jax does not model included.
    for name in ("config.json", "preprocessor_config.json"):
        with open(os.path.join(GOLDEN, "checkpoint", name)) as f, \
                open(os.path.join(back, name)) as g:
            assert json.load(f) == json.load(g), name
