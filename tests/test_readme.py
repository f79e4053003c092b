"""The README as a new user runs it.

- The quick start block runs as written, in a shell, with tiny stand-ins for the inputs its first
  lines name: a tiny checkpoint in the official layout (with a sentencepiece tokenizer),
  img2dataset webdataset shards, COCO Karpathy captions. It installs (a no-op once `make test`
  has), converts, generates, trains the tiny recipe on the shards through the documented
  `data=` / `eval=` / `tokenizer=` arguments past two evaluations, resumes, exports, generates
  from the export and evaluates it.
- Every other `owl-*` command line in the README parses: its flags exist and, for `owl-train`,
  the recipe builds from its ARGS.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def bash_blocks(text: str) -> list[tuple[str, str]]:
    """(section heading, body) of every ```bash block."""
    out, heading = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```bash\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1)
        else:
            out.append((heading, m.group(2)))
    return out


def quick_start() -> str:
    return next(body for heading, body in bash_blocks(open(README).read())
                if heading == "## Quick start")


def command_lines(body: str) -> list[str]:
    """Commands of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = [re.sub(r"\s+#\s.*$", "", ln).strip() for ln in joined.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from owl_jax.families.owl1.config import tiny
    from owl_jax.testing import shards
    from owl_jax.testing.checkpoints import write_official_checkpoint
    from owl_jax.testing.spm import train_tiny_tokenizer
    root = tmp_path_factory.mktemp("readme")
    tok = os.path.dirname(train_tiny_tokenizer(str(root / "tok"), vocab_size=384))
    write_official_checkpoint(str(root / "official"), tiny(vocab_size=384), tokenizer_dir=tok)
    shards.write_webdataset(str(root / "laion"), n_shards=3, per_shard=24)
    shards.write_coco(str(root / "coco"), n_images=8, karpathy=True, missing_images=0)
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "cat.jpg")
    return {"OFFICIAL": str(root / "official"), "IMAGE": str(root / "cat.jpg"),
            "SHARDS": str(root / "laion"), "COCO": str(root / "coco"), "OUT": str(root / "runs")}


@pytest.mark.slow
def test_quick_start_runs_as_written(inputs):
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        pytest.skip("the quick start activates the repository's .venv: run under `make test`")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "XDIST"))}
    env.update(inputs, JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", quick_start()], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    runs = inputs["OUT"]
    assert os.path.isfile(os.path.join(runs, "owl-jax", "owl_jax.json"))
    # trained past two evaluations on the shards, decoded with the checkpoint's tokenizer
    for step in (10, 20, 30):
        assert f"eval @ {step}: loss" in log and f"[samples @ {step}]" in log, step
    assert "resumed from checkpoint step 20" in log
    assert "resuming with a changed config: total_steps: 20 -> 30" in log
    assert "done at step 30" in log
    assert "Traceback" not in log and "nan" not in log.split("done at step 30")[1]
    with open(os.path.join(runs, "tiny", "metrics.jsonl")) as f:
        steps = {json.loads(ln)["step"] for ln in f if '"split": "train"' in ln}
    assert steps == set(range(1, 31))
    export = os.path.join(runs, "tiny", "export")
    assert os.path.isfile(os.path.join(export, "tokenizer.model"))
    with open(os.path.join(export, "owl_jax.json")) as f:
        assert json.load(f)["trained_steps"] == 30
    with open(os.path.join(runs, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert "CIDEr" in json.dumps(metrics), metrics


def _parse(argv: list[str]) -> None:
    """Parses a README command line with the tool's own parser (nothing runs)."""
    tool, args = argv[0], argv[1:]
    if tool == "owl-train":
        from owl_jax.cli import train
        recipe = train._recipe_path(args)
        assert recipe is None or os.path.isfile(os.path.join(ROOT, recipe)), recipe
        args = [os.path.join(ROOT, a) if a.startswith("configs/") else
                a.replace("--config=configs/", f"--config={ROOT}/configs/") for a in args]
        if any(a in train.HELP for a in args):
            assert "ARGS every recipe takes" in train.usage(args)
            return
        config = train._flags(args).config
        assert config is None or config.keys()
    elif tool == "owl-generate":
        from owl_jax.cli import generate
        generate.parse_args(args)
    elif tool == "owl-eval":
        from owl_jax.cli import eval as eval_cli
        eval_cli.parse_args(args)
    elif tool == "owl-data":
        from owl_jax.cli import data
        data.build_parser().parse_args(args)
    elif tool == "owl-serve":
        from owl_jax.cli import serve
        serve.parse_args(args)
    elif tool == "owl-convert":
        from owl_jax.convert import cli
        cli.build_parser().parse_args(args)
    else:
        raise AssertionError(f"unknown tool {tool}")


def test_every_readme_command_line_parses(monkeypatch):
    values = {"OFFICIAL": "/ckpt/o", "IMAGE": "cat.jpg", "SHARDS": "/d/s", "COCO": "/d/c",
              "OUT": "runs", "PWD": ROOT}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    lines = [ln for _, body in bash_blocks(open(README).read()) for ln in command_lines(body)]
    tiny = next(ln for ln in lines if ln.startswith("TINY="))
    monkeypatch.setenv("TINY", shlex.split(os.path.expandvars(tiny.split("=", 1)[1]))[0])
    checked = 0
    for line in lines:
        argv = shlex.split(os.path.expandvars(line))
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv = argv[1:]  # VAR=value prefixes
        if not argv or not argv[0].startswith("owl-"):
            continue
        try:
            _parse(argv)
        except SystemExit as e:
            raise AssertionError(f"README command does not parse: {line}") from e
        checked += 1
    assert checked >= 25, checked
