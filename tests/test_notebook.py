"""notebooks/inference.ipynb runs top to bottom (nbclient, the current python's kernel) on a tiny
checkpoint built here: a tiny sentencepiece tokenizer and random Owl (or MiniGPT-4) weights, or
a BPE tokenizer.json and random mPLUG-Owl3 weights."""
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax.checkpoint import save_checkpoint
from owl_jax.testing.bpe import write_tokenizer
from owl_jax.testing.spm import train_tiny_tokenizer

pytestmark = pytest.mark.slow  # runs the notebook in a kernel process

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks",
                        "inference.ipynb")


@pytest.fixture(scope="module", params=["owl1", "minigpt4", "owl3"])
def tiny_ckpt(tmp_path_factory, request):
    from owl_jax import families
    from owl_jax.testing.models import random_params, small_config
    import dataclasses
    root = tmp_path_factory.mktemp("nb")
    if request.param == "owl3":   # Qwen2's tokenizer.json
        write_tokenizer(str(root / "tok"))
        tok = families.get("owl3").load_tokenizer(str(root / "tok"))
        cfg = families.get("owl3").tiny(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                        bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    else:
        train_tiny_tokenizer(str(root / "tok"), vocab_size=384)
    if request.param == "owl1":
        cfg = small_config()
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=384))
    elif request.param == "minigpt4":
        cfg = families.get(request.param).tiny(vocab_size=384)
    save_checkpoint(str(root / "ckpt"), random_params(cfg, seed=1), cfg,
                    tokenizer_dir=str(root / "tok"))
    img = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(root / "image.png")
    return str(root / "ckpt"), str(root / "image.png"), cfg


def test_inference_notebook_runs(tiny_ckpt, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    ckpt, image, cfg = tiny_ckpt
    monkeypatch.setenv("OWL_CKPT", ckpt)
    monkeypatch.setenv("OWL_IMAGE", image)
    monkeypatch.setenv("OWL_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # the kernel compiles a tiny model: skip LLVM optimisation (compile time dominates)
    monkeypatch.setenv("XLA_FLAGS", (os.environ.get("XLA_FLAGS", "") +
                                     " --xla_backend_optimization_level=0").strip())
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the image was not shown"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    t = cfg.text
    assert f"LLM {t.num_hidden_layers} layers x {t.hidden_size}" in text
    assert "Human: What colors do you see?" in text

    # the answer printed by the notebook is what the API gives for the same question
    import owl_jax
    owl = owl_jax.load_pretrained(ckpt, compiler_options={"xla_backend_optimization_level": 0})
    want = owl.generate(owl.family.build_prompt("What is in the image?", 1), [image],
                        max_new_tokens=6)
    answer_cell = next(c for c in nb.cells if c.cell_type == "code"
                       and c.source.startswith('question = "What is in the image?"'))
    printed = "".join(o.get("text", "") for o in answer_cell.outputs)
    assert printed == want.text + "\n"
