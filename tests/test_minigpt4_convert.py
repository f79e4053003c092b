"""MiniGPT-4 checkpoints in both layouts (MiniGPT-4's LAVIS release files and transformers'
Blip2ForConditionalGeneration), written from the reference's random weights: the two load as
the same params, which give the reference's image embeddings and logits; export round trips
are bit-exact and transformers loads the Blip2 export with strict keys; bad files are named
errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from owl_jax import checkpoint as ckpt
from owl_jax.convert import minigpt4 as conv
from owl_jax.convert.cli import main as cli_main
from owl_jax.convert.keymap import flatten
from owl_jax.convert.torch_io import CheckpointError
from owl_jax.families.minigpt4.model import MiniGPT4
from owl_jax.testing.models import FAST

from minigpt4_reference import CFG, Reference, save_blip2, write_lavis  # tests/ on sys.path

pytestmark = pytest.mark.xdist_group("minigpt4_convert")
HEADS = dict(vit_heads=CFG.vision.num_attention_heads,
             qformer_heads=CFG.qformer.num_attention_heads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    model = Reference(CFG, seed=11)
    root = tmp_path_factory.mktemp("minigpt4")
    write_lavis(model, str(root / "lavis"))
    save_blip2(model, str(root / "blip2"))
    return model, root


def _params(directory):
    return {"/".join(k): np.asarray(v) for k, v in flatten(ckpt.load_checkpoint(directory)[1])
            .items()}


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def converted(files):
    model, root = files
    conv.torch_to_jax(str(root / "lavis"), str(root / "j_lavis"), **HEADS, progress=False)
    conv.torch_to_jax(str(root / "blip2"), str(root / "j_hf"), progress=False)
    return model, root


def test_lavis_files_equal_blip2_layout_and_give_the_reference(converted):
    model, root = converted
    cfg_l, _, meta = ckpt.load_checkpoint(str(root / "j_lavis"))
    cfg_h = ckpt.load_checkpoint(str(root / "j_hf"))[0]
    assert cfg_l == cfg_h == CFG
    assert meta["dropped_vit_blocks"] == [CFG.vision.num_hidden_layers]
    assert meta["source_layout"] == "lavis"
    lavis, hf = _params(str(root / "j_lavis")), _params(str(root / "j_hf"))
    _same(lavis, hf)
    # the loaded weights give the reference's image embeddings and logits
    params = ckpt.load_checkpoint(str(root / "j_lavis"))[1]
    px = np.random.default_rng(3).standard_normal((2, 3, 28, 28)).astype(np.float32)
    m = MiniGPT4(CFG)
    ours = jax.jit(lambda p, x: m.apply({"params": p}, x, method=MiniGPT4.encode_images),
                   compiler_options=FAST)(params, jnp.asarray(px.transpose(0, 2, 3, 1)))
    t = CFG.image_tokens
    row = [1, 5, 7] + [-1] * t + [9, 11]
    with torch.no_grad():
        want = model.encode_img(torch.from_numpy(px)).numpy()
        logits = model.logits([row], torch.from_numpy(px[:1])).numpy()
    assert np.abs(np.asarray(ours) - want).max() <= 1e-5 * np.abs(want).max()
    got = jax.jit(lambda p, i, x: m.apply({"params": p}, i, x), compiler_options=FAST)(
        params, jnp.asarray([row], jnp.int32), jnp.asarray(px[:1].transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(got) - logits).max() <= 1e-4 * np.abs(logits).max()
    assert np.array_equal(np.argmax(np.asarray(got), -1), np.argmax(logits, -1))


def test_transformers5_spelling_loads_the_same(converted, tmp_path):
    _, root = converted
    src = tmp_path / "v5"
    os.makedirs(src)
    for name in ("config.json",):
        (src / name).write_text((root / "blip2" / name).read_text())
    sd = load_file(str(root / "blip2" / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        if k == "language_model.lm_head.weight":
            renamed["lm_head.weight"] = v
        elif k.startswith("language_model.model."):
            renamed["model.language_model." + k[len("language_model.model."):]] = v
        else:
            renamed["model." + k] = v
    save_file(renamed, str(src / "model.safetensors"))
    conv.torch_to_jax(str(src), str(tmp_path / "j"), progress=False)
    _same(_params(str(tmp_path / "j")), _params(str(root / "j_hf")))


def test_blip2_export_round_trips_and_loads_in_transformers(converted, tmp_path):
    from transformers import Blip2ForConditionalGeneration
    _, root = converted
    conv.jax_to_torch(str(root / "j_hf"), str(tmp_path / "hf"), progress=False)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = load_file(str(root / "blip2" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    d = CFG.vision.hidden_size
    for k in want:
        if k.endswith("self_attn.qkv.bias"):  # EVA has no key bias: exported as zeros
            assert not got[k][d:2 * d].any()
            assert np.array_equal(got[k][:d], want[k][:d]) and \
                np.array_equal(got[k][2 * d:], want[k][2 * d:])
        else:
            assert np.array_equal(got[k], want[k]), k
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.num_query_tokens == CFG.image_tokens
    conv.torch_to_jax(str(tmp_path / "hf"), str(tmp_path / "back"), progress=False)
    _same(_params(str(tmp_path / "back")), _params(str(root / "j_hf")))


def test_lavis_export_round_trips_through_the_cli(converted, tmp_path):
    _, root = converted
    assert cli_main(["jax-to-torch", str(root / "j_lavis"), str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted([conv.EVA_FILE, conv.BLIP2_FILE, conv.MINIGPT4_FILE,
                                              conv.SIDECAR, conv.LLAMA_DIR])
    # the files hold what MiniGPT-4 loads, as the release names it
    orig = conv.read_pth(str(root / "lavis" / conv.BLIP2_FILE))
    new = conv.read_pth(str(out / conv.BLIP2_FILE))
    assert sorted(new) == sorted(k for k in orig if not k.startswith("t5_proj")
                                 and "position_ids" not in k and ".intermediate." not in k)
    assert all(np.array_equal(new[k], orig[k]) for k in new)
    eva = conv.read_pth(str(out / conv.EVA_FILE))
    assert "blocks.1.attn.q_bias" in eva and "blocks.2.attn.q_bias" not in eva
    # no head flags: the sidecar holds them and the depth
    assert cli_main(["torch-to-jax", str(out), str(tmp_path / "back"), "--quiet"]) == 0
    _same(_params(str(tmp_path / "back")), _params(str(root / "j_lavis")))
    assert cli_main(["jax-to-torch", str(root / "j_lavis"), str(tmp_path / "as_hf"), "--layout",
                     "hf", "--quiet"]) == 0
    conv.torch_to_jax(str(tmp_path / "as_hf"), str(tmp_path / "back_hf"), progress=False)
    _same(_params(str(tmp_path / "back_hf")), _params(str(root / "j_lavis")))


def test_without_a_minigpt4_pth_llama_proj_starts_fresh(files, tmp_path):
    model, _ = files
    write_lavis(model, str(tmp_path / "s1"), with_proj=False)
    meta = conv.torch_to_jax(str(tmp_path / "s1"), str(tmp_path / "j"), **HEADS, seed=3,
                             progress=False)
    assert meta["random_init"] == ["llama_proj"]
    p = _params(str(tmp_path / "j"))
    bound = 1 / np.sqrt(CFG.qformer.hidden_size)
    k = p["llama_proj/kernel"]
    assert k.shape == (CFG.qformer.hidden_size, CFG.text.hidden_size)
    assert np.abs(k).max() <= bound and np.abs(k).std() > bound / 4
    again = conv.init_proj(CFG, 3)
    assert np.array_equal(np.asarray(again["kernel"]), k)


class Payload:
    """An object a weights-only load refuses."""


def _rewrite(path, edit, wrap=True):
    obj = torch.load(path, weights_only=True)
    sd = obj["model"] if wrap else obj
    edit(sd)
    torch.save(obj, path)


def test_bad_files_are_named_errors(files, tmp_path):
    model, root = files
    src = tmp_path / "bad"
    write_lavis(model, str(src))
    with pytest.raises(CheckpointError, match="--vit_heads"):
        conv.torch_to_jax(str(src), str(tmp_path / "j0"), progress=False)
    os.rename(src / conv.MINIGPT4_FILE, src / "checkpoint_4.pth")
    with pytest.raises(CheckpointError, match=r"\['checkpoint_4.pth'\] are not MiniGPT-4"):
        conv.torch_to_jax(str(src), str(tmp_path / "j0"), **HEADS, progress=False)
    os.rename(src / "checkpoint_4.pth", src / conv.MINIGPT4_FILE)
    blip2 = str(src / conv.BLIP2_FILE)

    def edit(sd):
        sd["Qformer.bert.encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
        del sd["ln_vision.weight"]
        sd["Qformer.bert.encoder.layer.1.attention.output.dense.bias"] = torch.zeros(3)
    _rewrite(blip2, edit)
    with pytest.raises(CheckpointError) as e:
        conv.torch_to_jax(str(src), str(tmp_path / "j1"), **HEADS, progress=False)
    msg = str(e.value)
    assert "unexpected key Qformer.bert.encoder.layer.0.attention.self.extra.weight" in msg
    assert "missing key ln_vision.weight" in msg
    assert "Qformer.bert.encoder.layer.1.attention.output.dense.bias: the config implies " \
        "shape [32]" in msg
    assert not os.path.exists(tmp_path / "j1" / ckpt.PARAMS_DIR)
    torch.save({"model": {"llama_proj.weight": Payload()}}, str(src / conv.MINIGPT4_FILE))
    with pytest.raises(CheckpointError, match="pretrained_minigpt4.pth: cannot be read"):
        conv.torch_to_jax(str(src), str(tmp_path / "j2"), **HEADS, progress=False)
    # a Blip2 directory with a mis-shaped tensor
    hf = tmp_path / "hf"
    os.makedirs(hf)
    (hf / "config.json").write_text((root / "blip2" / "config.json").read_text())
    sd = load_file(str(root / "blip2" / "model.safetensors"))
    sd["language_projection.bias"] = sd["language_projection.bias"][:-1].copy()
    save_file(sd, str(hf / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"language_projection.bias: the config implies"):
        conv.torch_to_jax(str(hf), str(tmp_path / "j3"), progress=False)
    d = json.loads((root / "blip2" / "config.json").read_text())
    d["vision_config"]["hidden_act"] = "quick_gelu"
    (hf / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="vision_config: hidden_act 'quick_gelu'"):
        conv.torch_to_jax(str(hf), str(tmp_path / "j4"), progress=False)
    assert cli_main(["torch-to-jax", str(hf), str(tmp_path / "j5"), "--quiet"]) == 2


def test_export_merges_lora(converted, tmp_path):
    _, root = converted
    cfg, params, _ = ckpt.load_checkpoint(str(root / "j_hf"))
    params = jax.tree.map(np.array, params)
    q = params["language_model"]["layers_0"]["self_attn"]["q_proj"]
    rng = np.random.default_rng(0)
    d = q["kernel"].shape
    q["lora_a"] = rng.standard_normal((d[0], 2)).astype(np.float32)
    q["lora_b"] = rng.standard_normal((2, d[1])).astype(np.float32)
    ckpt.save_checkpoint(str(tmp_path / "lora"), params, cfg,
                         lora={"rank": 2, "alpha": 8.0, "targets": ["q_proj"]})
    conv.jax_to_torch(str(tmp_path / "lora"), str(tmp_path / "out"), layout="hf",
                      progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[
        "language_model.model.layers.0.self_attn.q_proj.weight"]
    want = (q["kernel"] + q["lora_a"] @ q["lora_b"] * 4.0).T
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
