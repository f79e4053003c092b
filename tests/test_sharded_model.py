"""The Owl forward on an 8-device (data 2, fsdp 2, tensor 2) mesh equals the single-device one.

Runs in a subprocess with 8 host CPU devices (XLA_FLAGS must be set before jax starts). Params
are placed with `owl_jax.sharding.param_shardings` under `DEFAULT_RULES`; the forward is jitted
under `jax.set_mesh` + `nn.logical_axis_rules`. Checks: the big kernels really are split over
fsdp / tensor, the logits (unrolled, and scanned + remat) equal the single-device logits and the
float64 numpy reference, and the image splice needs no all-gather.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs in a subprocess


def test_sharded_forward_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "SHARDED_OK" in r.stdout, r.stdout[-3000:]


# --------------------------------------------------------------------------------------------
# The subprocess


def _main():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import numpy_ref as ref  # this file's directory is on sys.path when run as a script
    from official_layout import nchw_to_nhwc, official_to_flax, random_official_state_dict
    from owl_jax import sharding
    from owl_jax.connectors.abstractor import AbstractorConfig
    from owl_jax.families.owl1.config import OwlConfig
    from owl_jax.decoder.llama import TextConfig
    from owl_jax.encoders.vit import VisionConfig
    from owl_jax.families.owl1.model import Owl
    from owl_jax.layers.scan import scan_params

    assert jax.device_count() == 8, jax.devices()
    # Every sharded dimension divisible by 2, widths still all different.
    cfg = OwlConfig(
        vision=VisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=2, image_size=28, patch_size=14),
        abstractor=AbstractorConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=36, encoder_hidden_size=24),
        text=TextConfig(vocab_size=98, hidden_size=40, intermediate_size=56,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
        num_query_tokens=3,
    )
    t = cfg.image_tokens
    img = [-1] * t
    model = Owl(cfg)
    sd = random_official_state_dict(cfg, seed=5)
    host = official_to_flax(sd, cfg)

    # Batch of 4 (= data x fsdp): rows with 1, 0, 2, 1 images, per-row pixel layout [B, M, ...].
    rows = [[1, 5, 6] + img + [7, 8, 9, 10, 11, 12, 13, 14, 15],
            [1] + list(range(20, 35)),
            [1] + img + [40, 41, 42] + img + [43, 44, 45, 46],
            [1, 60] + img + [61, 62, 0, 0, 0, 0, 0, 0, 0, 0]]
    seg = [[1] * 16, [1] * 16, [1] * 16, [1] * 8 + [0] * 8]
    ids = np.asarray(rows, np.int32)
    px_nchw = np.random.default_rng(6).standard_normal((4, 3, 28, 28)).astype(np.float32)
    px = nchw_to_nhwc(px_nchw)
    per_row = np.zeros((4, 2, 28, 28, 3), np.float32)
    per_row[0, 0], per_row[2, 0], per_row[2, 1], per_row[3, 0] = px
    seg = np.asarray(seg, np.int32)

    def forward(p, ids, pixel_values, seg):
        return model.apply({"params": p}, ids, pixel_values, seg)

    # single device
    single = np.asarray(jax.jit(forward)(jax.tree.map(jnp.asarray, host), ids, per_row, seg))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.DEFAULT_RULES
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, per_row, seg)["params"]
    shardings = sharding.param_shardings(abstract, mesh, rules)
    assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(host)
    params = sharding.shard_params(host, shardings)

    spec = lambda *path: _get(params, path).sharding.spec
    lm = ("language_model",)
    assert spec(*lm, "layers_0", "mlp", "gate_proj", "kernel") == P("fsdp", "tensor")
    assert spec(*lm, "layers_1", "mlp", "down_proj", "kernel") == P("tensor", "fsdp")
    assert spec(*lm, "layers_0", "self_attn", "q_proj", "kernel") == P("fsdp", "tensor")
    assert spec(*lm, "layers_0", "self_attn", "o_proj", "kernel") == P("tensor", "fsdp")
    assert spec(*lm, "embed_tokens", "embedding") == P(None, "fsdp")
    assert spec(*lm, "lm_head", "kernel") == P("fsdp", "tensor")
    assert spec("vision_model", "layers_0", "self_attn", "query_key_value", "kernel") \
        == P("fsdp", "tensor")
    assert spec("vision_model", "layers_1", "mlp", "fc1", "kernel") == P("fsdp", "tensor")
    assert spec("abstractor", "layers_0", "w1", "kernel") == P("fsdp", "tensor")
    assert spec("abstractor", "visual_fc", "kernel")[0] == "fsdp"
    gate = _get(params, lm + ("layers_0", "mlp", "gate_proj", "kernel"))
    assert {s.data.shape for s in gate.addressable_shards} == {(20, 28)}  # 40/2 x 56/2

    batch = sharding.global_batch({"ids": ids, "px": per_row, "seg": seg}, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(forward)(params, batch["ids"], batch["px"], batch["seg"])
    # batch over data x fsdp, vocab over tensor (the model's activation constraints)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor"), out.sharding.spec
    sharded = np.asarray(out)
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)

    # The training layout: scanned + rematerialised LLM layers, stacked on an unsharded
    # `layers` axis, same logits.
    scanned = Owl(cfg, scan_layers=True, remat_policy="full")
    abstract_s = jax.eval_shape(scanned.init, jax.random.key(0), ids, per_row, seg)["params"]
    params_s = sharding.shard_params(scan_params(host),
                                     sharding.param_shardings(abstract_s, mesh, rules))
    stacked = params_s["language_model"]["layers"]["layer"]["mlp"]["up_proj"]["kernel"]
    assert stacked.sharding.spec == P(None, "fsdp", "tensor"), stacked.sharding.spec
    vit_stacked = params_s["vision_model"]["layers"]["layer"]["mlp"]["fc1"]["kernel"]
    assert vit_stacked.sharding.spec == P(None, "fsdp", "tensor"), vit_stacked.sharding.spec
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out_s = jax.jit(lambda p, *a: scanned.apply({"params": p}, *a))(
            params_s, batch["ids"], batch["px"], batch["seg"])
    np.testing.assert_allclose(np.asarray(out_s), single, atol=1e-5, rtol=0)

    # and both equal the float64 reference (official flat image order), on the real tokens
    want = ref.owl_logits(sd, cfg, ids[:3], px_nchw[:3].astype(np.float64))
    err = np.abs(sharded[:3] - want).max() / np.abs(want).max()
    assert err < 1e-5, err
    want3 = ref.owl_logits(sd, cfg, ids[3:, :8], px_nchw[3:])
    assert np.abs(sharded[3, :8] - want3[0]).max() / np.abs(want3).max() < 1e-5
    # The image splice partitions with the batch: no row's image tokens are all-gathered.
    from owl_jax.layers.splice import splice_images
    rows_sharded = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    emb = jax.device_put(np.ones((4, 2, t, 40), np.float32), rows_sharded)
    text = jax.device_put(np.zeros((4, 16, 40), np.float32), rows_sharded)
    with jax.set_mesh(mesh):
        splice = jax.jit(splice_images).lower(text, batch["ids"], emb).compile().as_text()
    assert "all-gather" not in splice, [l for l in splice.splitlines() if "all-gather" in l][:3]
    print("SHARDED_OK", float(np.abs(sharded - single).max()))


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


if __name__ == "__main__":
    _main()
