"""benchmarks/long_visual.py runs end to end in its --smoke mode (tiny models): every point
prints its figures and ratios, and the memory budget comparison ends it. Speed is the
benchmark's business, not this test's."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_long_visual_benchmark_smoke():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "long_visual.py"),
                          "--smoke"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "hyper layers [1, 3] (gate)" in text
    for n in (2, 4):
        line = next(x for x in text.splitlines() if x.startswith(f"N={n:4d}:"))
        assert "first-token latency splice/hyper" in line and "decode tok/s hyper/splice" in line
        # the hyper prompt: one 3-token placeholder per image; the splice prompt: 4 features
        hyper, splice = map(int, re.findall(r"(\d+) tokens", line))
        assert splice - hyper == n * (4 - 3)
    assert "largest N both ran: 4" in text
    budget = r"memory budget .* splice fits (>= )?\d+ images, hyper (>= )?\d+: .* more images"
    assert len(re.findall(budget, text)) == 1
