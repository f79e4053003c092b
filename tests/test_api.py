"""`owl_jax.load_pretrained` end to end, against outputs of the official PyTorch code
(tests/golden/official_tiny_bf16: processor ids and pixels, greedy tokens of the official
`generate`; its fp32 logits are checked against the model in test_golden_official.py), plus
LoRA merging on load, streaming, errors and a tensor-sharded load."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import owl_jax
from owl_jax.convert.cli import main as owl_convert
from owl_jax.checkpoint import load_checkpoint, save_checkpoint
from owl_jax.families.owl1.model import Owl
from owl_jax.testing.models import FAST
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "official_tiny_bf16")


def _reference():
    with open(os.path.join(GOLDEN, "reference", "reference.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("api") / "jax")
    assert owl_convert(["torch-to-jax", os.path.join(GOLDEN, "checkpoint"), dst]) == 0
    return dst


@pytest.fixture(scope="module")
def owl(ckpt):
    return owl_jax.load_pretrained(ckpt, dtype="float32", compiler_options=FAST)


def _prompts():
    ref = _reference()["prompts"]
    return ([p["text"] for p in ref],
            [[os.path.join(GOLDEN, i) for i in p["images"]] for p in ref])


def test_prepare_matches_official_and_logits_are_the_models(owl):
    """`prepare` builds the official processor's ids and pixels (tests/golden), and `logits` is
    the model's fp32 forward on them, for one prompt and for a right-padded batch. (The forward
    itself is checked against the official fp32 logits once, in test_golden_official.py.)"""
    texts, images = _prompts()
    model = Owl(owl.config)
    forward = jax.jit(lambda p, ids, px: model.apply({"params": p}, ids, px),
                      compiler_options=FAST)
    single = {}
    for k in (0, 2):
        batch = owl.prepare(texts[k], images[k])
        ref = lambda name: np.load(os.path.join(GOLDEN, "reference", f"{name}_{k}.npy"))  # noqa
        np.testing.assert_array_equal(batch["input_ids"], ref("ids"))
        px = batch["pixel_values"] if len(batch["pixel_values"]) else None
        if k:
            np.testing.assert_array_equal(px, ref("pixels").transpose(0, 2, 3, 1))
        got = owl.logits(batch)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(forward(owl.params, batch["input_ids"], px))
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), k
        single[k] = got[0]
    # a batch: right-padded with EOS, mask 0 there, and the same logits on the real positions
    batch = owl.prepare(texts, images)
    n = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (3, n.max()) and batch["pixel_values"].shape[0] == 3
    assert (batch["input_ids"][0, n[0]:] == 2).all() and (batch["attention_mask"][0, n[0]:] == 0).all()
    got = owl.logits(batch)
    for k, want in single.items():
        assert np.abs(got[k, :n[k]] - want).max() <= 1e-5 * np.abs(want).max(), k


def test_generate_matches_official_greedy(owl):
    texts, images = _prompts()
    want = {k: v[1:] for k, v in _reference()["greedy_fp32"].items()}  # drop HF 4.28's BOS
    outs = owl.generate(texts, images, max_new_tokens=12)
    assert isinstance(outs, list) and len(outs) == 3
    for k, out in enumerate(outs):
        w = want[f"prompt{k}"]
        if w[-1] == owl.tokenizer.eos_id:  # we return the answer without its EOS
            assert out.finish_reason == "eos" and out.token_ids == w[:-1]
        else:
            assert out.finish_reason == "length" and out.token_ids == w
        assert out.text == owl.tokenizer.decode(out.token_ids)
    one = owl.generate(texts[1], images[1], max_new_tokens=12)  # one prompt -> one result
    assert one.token_ids == outs[1].token_ids and one.text == outs[1].text
    for k, (text, imgs) in enumerate(zip(texts, images)):  # prompt lookup: the same answers
        got = owl.generate(text, imgs, max_new_tokens=12, prompt_lookup_num_tokens=4)
        assert got.token_ids == outs[k].token_ids


def test_streaming_text_and_errors(owl):
    texts, images = _prompts()
    seen = []
    out = owl.generate(texts[1], images[1], max_new_tokens=12, stream=seen.append)
    assert seen[-1] == out.text and len(seen) >= 2
    assert all(out.text.startswith(s.rstrip("\ufffd")) for s in seen)
    with pytest.raises(ValueError, match="prompt 1 has 1 <image> but 2 images"):
        owl.generate(texts[:2], [[], images[2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
        owl.generate(texts[:2], [[]], max_new_tokens=2)


def test_unmerged_lora_is_merged_on_load(ckpt, owl, tmp_path):
    cfg, params, _ = load_checkpoint(ckpt)
    rng = np.random.default_rng(0)
    rank, alpha = 4, 8.0
    for i in range(cfg.text.num_hidden_layers):
        for name in ("q_proj", "v_proj"):
            dense = params["language_model"][f"layers_{i}"]["self_attn"][name]
            d_in, d_out = dense["kernel"].shape
            dense["lora_a"] = (rng.standard_normal((d_in, rank)) * 0.3).astype(np.float32)
            dense["lora_b"] = (rng.standard_normal((rank, d_out)) * 0.3).astype(np.float32)
    save_checkpoint(str(tmp_path / "lora"), params, cfg, tokenizer_dir=ckpt,
                    lora={"rank": rank, "alpha": alpha})
    lora_owl = owl_jax.load_pretrained(str(tmp_path / "lora"), dtype="float32",
                                       compiler_options=FAST)
    k = lora_owl.params["language_model"]["layers_1"]["self_attn"]["v_proj"]
    dense = params["language_model"]["layers_1"]["self_attn"]["v_proj"]
    assert set(k) == {"kernel"}
    np.testing.assert_allclose(np.asarray(k["kernel"]), dense["kernel"] + alpha / rank * (
        dense["lora_a"].astype(np.float64) @ dense["lora_b"]), rtol=1e-5, atol=1e-5)
    texts, images = _prompts()
    batch = owl.prepare(texts[0])
    assert np.abs(lora_owl.logits(batch) - owl.logits(batch)).max() > 1e-2  # adapters count


@pytest.mark.slow
def test_load_pretrained_into_a_tensor_mesh(ckpt, owl):
    """Weights restored straight into a 4-way `tensor` sharding generate the same tokens."""
    texts, images = _prompts()
    want = owl.generate(texts[1], images[1], max_new_tokens=6).token_ids
    code = textwrap.dedent(f"""
        import owl_jax
        from owl_jax.sharding import make_mesh
        owl = owl_jax.load_pretrained({ckpt!r}, dtype="float32",
                                      mesh=make_mesh(data=1, fsdp=1, tensor=4),
                                      compiler_options={FAST!r})
        k = owl.params["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert len(k.sharding.device_set) == 4 and not k.is_fully_replicated, k.sharding
        out = owl.generate({texts[1]!r}, {images[1]!r}, max_new_tokens=6)
        print(out.token_ids)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == str(want)


def test_owl_generate_cli(ckpt, owl, monkeypatch):
    """owl-generate: the official template, the streamed answer, and a chat turn (the model is
    the fixture's, so no recompiles)."""
    import io
    from owl_jax.cli.generate import main
    monkeypatch.setattr(owl_jax, "load_pretrained", lambda *a, **k: owl)
    texts, images = _prompts()
    want = owl.tokenizer.decode(_reference()["greedy_fp32"]["prompt1"])
    args = ["--ckpt", ckpt, "--image", images[1][0], "--max_new_tokens", "12",
            "--stream_chunk", "4"]
    out = io.StringIO()
    assert main(args + ["--prompt", "What is in the image?"], stdout=out) == 0
    assert out.getvalue() == want + "\n"
    out = io.StringIO()
    assert main(args + ["--raw", "--prompt", texts[1], "--prompt_lookup_num_tokens", "3"],
                stdout=out) == 0
    assert out.getvalue() == want + "\n"
    out = io.StringIO()
    assert main(args + ["--chat"], stdin=io.StringIO("What is in the image?\n/exit\n"),
                stdout=out) == 0
    assert out.getvalue() == f"Human: AI: {want}\nHuman: "


def test_owl_generate_tokenizer_flag_and_bad_checkpoints(ckpt, owl, tmp_path, monkeypatch,
                                                         capsys):
    """A checkpoint without tokenizer files (a synthetic-data owl-train export) answers with
    --tokenizer DIR, and without it is refused with that advice; a bad --ckpt is one line, not a
    traceback; /reset in --chat says that the conversation was cleared."""
    import io
    import shutil
    from owl_jax.cli.generate import main
    bare = str(tmp_path / "bare")
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    seen = {}
    real_load = owl_jax.load_pretrained

    def load(path, **kw):  # the real loader's checks, the fixture's compiled model
        seen["tokenizer"] = real_load(path, tokenizer=kw.get("tokenizer"),
                                      compiler_options=FAST).tokenizer
        return owl if seen["tokenizer"] is not None else real_load(path, **kw)
    monkeypatch.setattr(owl_jax, "load_pretrained", load)
    _, images = _prompts()
    args = ["--image", images[1][0], "--max_new_tokens", "4", "--prompt", "What is it?"]
    assert main(["--ckpt", bare] + args, stdout=io.StringIO()) == 2
    assert "--tokenizer DIR" in capsys.readouterr().err
    out = io.StringIO()
    assert main(["--ckpt", bare, "--tokenizer", ckpt] + args, stdout=out) == 0
    assert seen["tokenizer"].model_file == os.path.join(ckpt, "tokenizer.model")
    assert out.getvalue().strip()
    for bad in (str(tmp_path / "nowhere"), str(tmp_path)):
        assert main(["--ckpt", bad] + args, stdout=io.StringIO()) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"owl-generate: cannot use --ckpt {bad}:") and "Traceback" not in err
    out = io.StringIO()
    assert main(["--ckpt", ckpt, "--chat"] + args[:4], stdin=io.StringIO("/reset\n/exit\n"),
                stdout=out) == 0
    assert out.getvalue() == "Human: (conversation cleared)\nHuman: "
