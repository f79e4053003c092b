"""Exports of owl-train and starting a stage from one (tiny model, one CPU device).

- stage 1 state -> WORKDIR/export-style directory -> stage 2 LoRA `init_from` it: every stored
  weight arrives unchanged (bitwise), the LoRA adapters missing from it are initialised (B = 0,
  so the model starts exactly at the stage-1 function), and the frozen tree is the stored one;
- a LoRA state (non-zero adapters) exported unmerged, then through the converter's
  jax-to-torch (which merges W + alpha/r * A B) and back to JAX: the merged model's logits equal
  the unmerged adapters' logits.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.configs.owl1 import tiny_stage1, tiny_stage2_lora  # noqa: E402
from owl_jax import checkpoint as ckpt  # noqa: E402
from owl_jax import sharding as sh  # noqa: E402
from owl_jax.families.owl1.model import Owl
from owl_jax.layers.scan import unscan_params  # noqa: E402
from owl_jax.train import checkpointing  # noqa: E402
from owl_jax.train import optimizer as opt_lib  # noqa: E402
from owl_jax.train import state as state_lib  # noqa: E402
from owl_jax.train import trainable as tr  # noqa: E402


def layout_for(config):
    cfg = state_lib.model_config(config)
    model = state_lib.build_model(config, cfg)
    tx, _ = opt_lib.make_optimizer(config.optimizer, config.total_steps)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return state_lib.make_layout(config, model, cfg, tx, mesh,
                                 sh.rules_from_config(config.sharding_rules))


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory):
    c1 = tiny_stage1.get_config()
    c1.model.scan_layers = True
    layout = layout_for(c1)
    state = state_lib.init_fresh(layout, 3)
    out = str(tmp_path_factory.mktemp("export") / "stage1")
    checkpointing.export(out, state, layout, c1)
    return out, jax.device_get(state_lib.host_params_unrolled(state))


def test_stage2_lora_starts_from_stage1_export(stage1_export):
    directory, stored = stage1_export
    c2 = tiny_stage2_lora.get_config()
    c2.init_from = directory
    layout = layout_for(c2)
    state, report = state_lib.init_from_export(layout, directory, seed=1)
    got = tr.flatten(jax.device_get(state_lib.host_params_unrolled(state)))
    want = tr.flatten(stored)
    lora = sorted(k for k in got if k.split("/")[-1] in ("lora_a", "lora_b"))
    assert lora and sorted(report["initialised"]) == lora
    assert set(got) == set(want) | set(lora)
    for k, v in want.items():
        assert np.array_equal(np.asarray(got[k]), np.asarray(v)), k
    assert all(not np.any(got[k]) for k in lora if k.endswith("lora_b"))
    # Only the adapters train; everything the export held is frozen.
    assert tr.paths(unscan_params(state.trainable)) == lora


def test_merged_lora_export_gives_the_unmerged_logits(tmp_path, stage1_export):
    from owl_jax.convert.official import jax_to_torch, torch_to_jax
    c2 = tiny_stage2_lora.get_config()
    c2.init_from = stage1_export[0]
    layout = layout_for(c2)
    state, _ = state_lib.init_from_export(layout, c2.init_from, seed=1)
    # Non-zero adapters, as after training.
    rng = np.random.default_rng(0)
    trained = tr.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), state.trainable)
    state = state.replace(trainable=trained)
    unmerged_dir = str(tmp_path / "lora_export")
    meta = checkpointing.export(unmerged_dir, state, layout, c2)
    assert meta["lora"] == {"rank": 8, "alpha": 32.0, "targets": ["q_proj", "v_proj"]}
    assert json.load(open(os.path.join(unmerged_dir, ckpt.META_FILE)))["lora"]["rank"] == 8

    jax_to_torch(unmerged_dir, str(tmp_path / "torch"), progress=False)
    torch_to_jax(str(tmp_path / "torch"), str(tmp_path / "merged"), progress=False)
    cfg, merged, meta2 = ckpt.load_checkpoint(str(tmp_path / "merged"))
    assert not meta2.get("lora")
    assert not any(k.endswith(("lora_a", "lora_b")) for k in tr.flatten(merged))

    cfg_u, unmerged, _ = ckpt.load_checkpoint(unmerged_dir)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, cfg.text.vocab_size, (2, 12)).astype(np.int32)
    ids[:, 1:1 + cfg.image_tokens] = -1
    px = rng.normal(size=(2, 1, cfg.vision.image_size, cfg.vision.image_size, 3))
    px = px.astype(np.float32)
    fast = {"xla_backend_optimization_level": 0}
    with_adapters = Owl(cfg_u, lora=state_lib.lora_spec(c2), lora_targets=("q_proj", "v_proj"))
    want = jax.jit(with_adapters.apply, compiler_options=fast)({"params": unmerged}, ids, px)
    plain = jax.jit(Owl(cfg).apply, compiler_options=fast)
    got = plain({"params": merged}, ids, px)
    base = plain({"params": tr.unflatten({k: v for k, v in tr.flatten(unmerged).items()
                                          if not k.endswith(("lora_a", "lora_b"))})}, ids, px)
    assert float(jnp.max(jnp.abs(want - base))) > 1e-3  # the adapters matter
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
