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
    c = importlib.import_module(f"owl_jax.configs.owl1.{name}").get_config()
    c.init_from = ""  # shapes from model.size (the data root does not exist here)
    cfg = state_lib.model_config(c)
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
    s1 = importlib.import_module("owl_jax.configs.owl1.owl_7b_stage1")
    c = s1.get_config("mesh=2x4x1,batch=512,res=448,micro=8,seq=1024")
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (2, 4, 1)
    assert (c.batch.global_size, c.batch.micro_batches, c.batch.seq_len) == (512, 8, 1024)
    assert c.model.image_size == 448
    s2 = importlib.import_module("owl_jax.configs.owl1.owl_7b_stage2_lora")
    c = s2.get_config("abstractor,decay=cosine")
    assert c.trainable == (".*/lora_[ab]", "abstractor/.*") and c.optimizer.decay == "cosine"
    assert s2.get_config().total_steps == 361_481 * 3 // 256 == 4236
    with pytest.raises(ValueError, match="unknown"):
        s1.get_config("bacth=3")
    with pytest.raises(ValueError, match="DATAxFSDPxTENSOR"):
        common.parse_mesh("8")


def test_data_eval_tokenizer_args_name_the_sources():
    """`data=` / `eval=` / `tokenizer=` (every recipe): the sources replace the recipe's, keep
    its pipeline settings, weights with @W, tasks from the spec kind; a bad spec or an unknown
    arg fails when the config is built; size=tiny honours root= instead of ignoring it."""
    s1 = importlib.import_module("owl_jax.configs.owl1.tiny_stage1")
    c = s1.get_config("data=webdataset:/d/a/{00000..00009}.tar@3+coco:/d/c.json?images=/d/i,"
                      "eval=arrayrecord:/d/held,tokenizer=/t")
    assert c.data.kind == c.eval_data.kind == "pipeline" and c.tokenizer_dir == "/t"
    assert [(s["spec"], s["weight"]) for s in c.data.sources] == [
        ("webdataset:/d/a/{00000..00009}.tar", 3.0), ("coco:/d/c.json?images=/d/i", 1.0)]
    assert [s["spec"] for s in c.eval_data.sources] == ["arrayrecord:/d/held"]
    assert c.data.packing and c.data.augment and not c.eval_data.augment
    assert c.data.workers == 0 and c.eval_every == 10
    c = s1.get_config("data=webdataset:/d/a.tar")  # no eval=: synthetic ids would be noise
    assert c.eval_data.kind == "none"
    assert s1.get_config().data.kind == "synthetic"
    c = s1.get_config("root=/r")
    assert c.data.kind == "pipeline" and c.data.sources[0]["spec"].startswith("webdataset:/r/")
    full = importlib.import_module("owl_jax.configs.owl1.owl_7b_stage1")
    assert full.get_config("data=webdataset:/d/a.tar").eval_data.kind == "none"
    assert full.get_config("data=webdataset:/d/a.tar,root=/r").eval_data.sources[0]["spec"] == (
        "coco:/r/coco/annotations/captions_val2017.json?images=/r/coco/val2017")
    s2 = importlib.import_module("owl_jax.configs.owl1.owl_7b_stage2_lora")
    c = s2.get_config("data=instruct:/d/chat.json?images=/d/i,eval=instruct:/d/held.json")
    assert [s["spec"] for s in c.data.sources] == ["instruct:/d/chat.json?images=/d/i"]
    assert c.data.packing is False and c.eval_data.packing is False  # the recipe's setting
    assert c.eval_every == 500
    with pytest.raises(ValueError, match="'foo:/x'.*must start with"):
        s1.get_config("data=foo:/x")
    with pytest.raises(ValueError, match="config arg 'rooot' unknown"):
        s1.get_config("rooot=/r")


def test_init_from_keeps_its_image_size_unless_res_says_otherwise(tmp_path):
    """The checkpoint's config.json decides the resolution; res= resizes, and says so."""
    import dataclasses
    from owl_jax.checkpoint import save_checkpoint
    from owl_jax.families.owl1.config import tiny
    cfg = tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=42))
    c = importlib.import_module("owl_jax.configs.owl1.tiny_stage1").get_config()
    state = state_lib.init_fresh(_layout(c, cfg), 0)
    save_checkpoint(str(tmp_path), jax.device_get(state_lib.host_params_unrolled(state)), cfg)
    s2 = importlib.import_module("owl_jax.configs.owl1.tiny_stage2_lora")
    assert state_lib.model_config(s2.get_config(f"init={tmp_path}")).vision.image_size == 42
    c = s2.get_config(f"init={tmp_path},res=56")
    assert state_lib.model_config(c).vision.image_size == 56
    _, report = state_lib.init_from_export(_layout(c), c.init_from, 0)
    assert report["resized"] == ("ViT position embeddings resized from the checkpoint's 42 px "
                                 "to model.image_size=56 px (bicubic)")


def _layout(c, cfg=None):
    cfg = cfg or state_lib.model_config(c)
    tx, _ = opt_lib.make_optimizer(c.optimizer, int(c.total_steps))
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return state_lib.make_layout(c, state_lib.build_model(c, cfg), cfg, tx, mesh,
                                 sh.rules_from_config(c.sharding_rules))


def test_owl_train_help_and_bad_command_lines(capsys):
    """--help / -h list the flags and, with --config, the recipe's ARGS; a bad recipe arg,
    field, flag or file is one line on stderr and exit 2, not a traceback."""
    from owl_jax.cli.train import main
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for flag in ("--help", "-h"):
        assert main([flag]) == 0
        out = capsys.readouterr().out
        assert "--workdir" in out and "--dry_run" in out and "configs/FAMILY/*.py" in out
    assert main(["--config", f"{root}/configs/owl1/tiny_stage1.py", "--help"]) == 0
    out = capsys.readouterr().out
    assert "seq=L" in out and "root=DIR" in out and "data=SPEC[+SPEC]" in out
    for argv, want in [
            ([f"--config={root}/configs/owl1/tiny_stage1.py:bogus=1"], "config arg 'bogus' unknown"),
            ([f"--config={root}/configs/owl1/tiny_stage1.py", "--config.bogus=1"],
             "names a field the recipe does not have"),
            (["--config", f"{root}/configs/nope.py"], "no recipe file"),
            (["--bogus"], "Unknown command line flag 'bogus'")]:
        assert main(argv + ["--workdir", "/nonexistent/w"]) == 2, argv
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, (argv, err)


def test_config_overrides_come_from_the_given_args(tmp_path):
    """`main(argv)` (not only the console script's sys.argv) applies --config.FIELD=VALUE."""
    from owl_jax.cli.train import _flags
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fv = _flags(["--config", f"{root}/configs/owl1/tiny_stage1.py", "--config.optimizer.lr=0.25",
                 "--workdir", str(tmp_path)])
    assert fv.config.optimizer.lr == 0.25


@pytest.mark.parametrize("name", ["tiny_stage1", "tiny_stage2_lora", "tiny_stage2_ft"])
def test_tiny_recipe_trains_one_step(name, tmp_path):
    c = importlib.import_module(f"owl_jax.configs.owl1.{name}").get_config("steps=1")
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


def test_resume_with_no_steps_left_says_so(tmp_path, capsys):
    """A finished run rerun as is: nothing trains, the log says why (not `loss nan`); the
    console shows plain step lines when stderr is not a terminal."""
    from owl_jax.cli.train import main
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--config", f"{root}/configs/owl1/tiny_stage1.py:steps=2", "--workdir", str(tmp_path),
            "--config.eval_data.kind=none", "--config.export_at_end=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "step 2/2: loss=" in out and "done at step 2; loss" in out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "nothing to do: the checkpoint in" in out and "is at step 2" in out
    assert "nan" not in out and "done at step" not in out


def test_dry_run_tiny_reports_memory_and_flops(capsys):
    """The dry run compiles the real step from shapes only; its FLOP accounting is consistent:
    the unrolled HLO count covers the analytic model FLOPs (plus elementwise work), while the
    compiled count (scanned layers counted once) is below it."""
    from owl_jax.train.dry_run import dry_run
    c = importlib.import_module("owl_jax.configs.owl1.tiny_stage1").get_config("mesh=1x1x1,micro=2")
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
    assert main(["--config", f"{root}/configs/owl1/tiny_stage1.py", "--dry_run",
                 "--topology", "v5p:2x2x2"]) == 0
    assert "skipping the topology dry run" in capsys.readouterr().err


def test_start_up_lines_print_before_the_first_batch(tmp_path, capsys, monkeypatch):
    """A pipeline that stalls while the first batch is read: the banner (devices, trainable
    set, init, the sources it reads) is already on the console, and the error reaches the user."""
    from owl_jax.data.pipeline import PipelineStalled
    from owl_jax.train import loop

    class Stalled:
        def __next__(self):
            print("(reading)")
            raise PipelineStalled("the input pipeline dropped 1000 samples in a row")
    monkeypatch.setattr(loop, "make_iterator", lambda data_cfg, *a, **k: Stalled())
    c = importlib.import_module("owl_jax.configs.owl1.tiny_stage1").get_config()
    with pytest.raises(PipelineStalled, match="1000 samples in a row"):
        train(c, str(tmp_path))
    out = capsys.readouterr().out
    banner = out.index("owl-train: trainable"), out.index("reading the first batch (synthetic)")
    assert max(banner) < out.index("(reading)")
