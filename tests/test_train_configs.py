"""Every training recipe builds; the 7B ones give the right trainable sets from abstract shapes
(no memory); each tiny one runs a real step through `owl_jax.train.loop.train`."""
from __future__ import annotations

import importlib
import os

import jax
import pytest


from owl_jax.configs import common  # noqa: E402
from owl_jax import sharding as sh  # noqa: E402
from owl_jax.train import optimizer as opt_lib  # noqa: E402
from owl_jax.train import state as state_lib  # noqa: E402
from owl_jax.train import trainable as tr  # noqa: E402
from owl_jax.train.loop import read_metrics, train  # noqa: E402

# Trainable parameter counts of the released 7B shapes (mplug_owl.md section 1):
VIT, ABSTRACTOR, QUERIES = 303_179_776, 81_408_000, 64 * 1024
LLAMA = 6_738_415_616
LORA_QV = 32 * 2 * (4096 * 8 + 8 * 4096)
SEVEN_B = {"owl_7b_stage1": VIT + ABSTRACTOR + QUERIES, "owl_7b_stage2_lora": LORA_QV,
           "owl_7b_stage2_ft": LLAMA}


@pytest.mark.parametrize("name", sorted(SEVEN_B))
def test_7b_recipe_abstract_layout(name):
    c = importlib.import_module(f"owl_jax.configs.{name}").get_config()
    c.init_from = ""  # shapes from model.size (the data root does not exist here)
    cfg = state_lib.owl_config(c)
    model = state_lib.build_model(c, cfg)
    tx, _ = opt_lib.make_optimizer(c.optimizer, c.total_steps)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = state_lib.make_layout(c, model, cfg, tx, mesh, sh.rules_from_config(c.sharding_rules))
    assert tr.count(layout.abstract.trainable) == SEVEN_B[name]
    total = VIT + ABSTRACTOR + QUERIES + LLAMA + (LORA_QV if c.lora.rank else 0)
    assert tr.count(layout.abstract.trainable) + tr.count(layout.abstract.frozen) == total
    # No optimizer state for the frozen tree: Adam's two moments of the trainable one only.
    assert tr.count(layout.abstract.opt_state) <= 2 * SEVEN_B[name] + 16


def test_recipe_args_and_typos():
    s1 = importlib.import_module("owl_jax.configs.owl_7b_stage1")
    c = s1.get_config("mesh=2x4x1,batch=512,res=448,micro=8,seq=1024")
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (2, 4, 1)
    assert (c.batch.global_size, c.batch.micro_batches, c.batch.seq_len) == (512, 8, 1024)
    assert c.model.image_size == 448
    s2 = importlib.import_module("owl_jax.configs.owl_7b_stage2_lora")
    c = s2.get_config("abstractor,decay=cosine")
    assert c.trainable == (".*/lora_[ab]", "abstractor/.*") and c.optimizer.decay == "cosine"
    assert s2.get_config().total_steps == 361_481 * 3 // 256 == 4236
    with pytest.raises(ValueError, match="unknown"):
        s1.get_config("bacth=3")
    with pytest.raises(ValueError, match="DATAxFSDPxTENSOR"):
        common.parse_mesh("8")


@pytest.mark.parametrize("name", ["tiny_stage1", "tiny_stage2_lora", "tiny_stage2_ft"])
def test_tiny_recipe_trains_one_step(name, tmp_path):
    c = importlib.import_module(f"owl_jax.configs.{name}").get_config("steps=1")
    evaluate = name == "tiny_stage2_lora"  # held-out loss + greedy samples (adapters merged)
    if not evaluate:
        c.eval_data.kind = "none"
        c.num_samples = 0
    c.export_at_end = False
    out = train(c, str(tmp_path))
    assert out["step"] == 1 and not out["preempted"]
    assert 0 < out["loss"] < 10 and out["trained_tokens"] > 0
    assert read_metrics(str(tmp_path))[1]["loss"] == out["loss"]
    assert os.path.isdir(tmp_path / "checkpoints" / "1")
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    if evaluate:
        assert 0 < out["eval_loss"] < 10
        samples = read_metrics(str(tmp_path), split="samples")[1]["text"]
        assert samples.count("generated=") == c.num_samples


def test_dry_run_tiny_reports_memory_and_flops(capsys):
    """The dry run compiles the real step from shapes only; its FLOP accounting is consistent:
    the unrolled HLO count covers the analytic model FLOPs (plus elementwise work), while the
    compiled count (scanned layers counted once) is below it."""
    from owl_jax.train.dry_run import dry_run
    c = importlib.import_module("owl_jax.configs.tiny_stage1").get_config("mesh=1x1x1,micro=2")
    out = dry_run(c, peak_tflops=100.0, step_time=2.0, target_mfu=0.5,
                  devices=jax.devices()[:1])
    text = capsys.readouterr().out
    assert "memory per device" in text and "MFU" in text
    assert out["mem_arguments_gib"] > 0 and out["mem_peak_gib"] >= out["mem_arguments_gib"]
    assert out["params_trainable"] == 59_104
    a = out["analytic_model_flops_per_step"]
    assert a < out["hlo_flops_per_step_unrolled"] < 2 * a
    assert out["compiled_flops_per_device_loops_once"] < out["hlo_flops_per_step_unrolled"]
    assert out["mfu_at_step_time"] == pytest.approx(a / 2.0 / 100e12)
    assert out["step_time_at_target_mfu_s"] == pytest.approx(a / (0.5 * 100e12))


def test_topology_dry_run_is_skipped_without_libtpu(capsys):
    from owl_jax.cli.train import main
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert main(["--config", f"{root}/configs/tiny_stage1.py", "--dry_run",
                 "--topology", "v5p:2x2x2"]) == 0
    assert "skipping the topology dry run" in capsys.readouterr().err
