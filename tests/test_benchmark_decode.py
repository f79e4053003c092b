"""benchmarks/decode.py runs end to end on a tiny local HF LLaMA (grouped-query attention): its
comparisons print, and both sides make the same tokens. Speed is the benchmark's business, not
this test's."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_benchmark_runs_on_a_local_checkpoint(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=4100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )).save_pretrained(tmp_path / "llama")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"), "--parts", "decode",
         "--hf_llama", str(tmp_path / "llama"), "--batches", "1,2", "--repeats", "1",
         "--prompt_tokens", "16", "--new_tokens", "8", "--lookup", "3"],
        capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "LLM: 2 layers, 64 wide, 4 heads (2 kv)" in text
    assert "first 16 tokens identical in 1/1 rows" in text
    assert "first 16 tokens identical in 2/2 rows" in text
    assert "same tokens as HF: True" in text
    for line in ("batch 1: owl-jax", "batch 2: owl-jax", "bandwidth limit", "weight matmuls",
                 "one pass per token (self_draft_tokens=0)"):
        assert line in text, line
    # benchmarks/decode_ab.py reads these lines (both revisions' runs)
    sys.path.insert(0, ROOT)
    from benchmarks.decode_ab import parse_ratios
    ratios = parse_ratios(text)
    assert sorted(ratios) == ["batch 1 default", "batch 1 one pass", "batch 2 default"]
    assert all(r > 0 for r in ratios.values())
