"""The decode benchmark A/B: this tree against another revision, in one run.

    python benchmarks/decode_ab.py --baseline 3093a13               # rounds of both, then medians
    python benchmarks/decode_ab.py --baseline 3093a13 --rounds 5 -- --batches 1 --repeats 2

The baseline revision is checked out into a temporary git worktree. Then `benchmarks/decode.py
--parts decode` (plus the arguments after `--`) of the baseline and of this tree alternate,
`--rounds` times each, each in its own process importing its own tree, so a load change on a
shared machine hits both sides alike. Every run measures HF transformers on the same machine
in the same process, so the numbers compared are decode.py's own ratios (owl-jax speed over
HF's): per round, their medians, and this tree's median over the baseline's (>= 1.0: no worse).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# decode.py's result lines: "batch B: owl-jax ... ratio R x" (the default: greedy with the
# self-draft at batch 1), and "... one pass per token ... ratio R x" (self_draft_tokens=0).
_DEFAULT = re.compile(r"^batch (\d+): owl-jax .* ratio\s+([\d.]+)x", re.M)
_ONE_PASS = re.compile(r"^batch (\d+): that is greedy .* ratio ([\d.]+)x", re.M)


def parse_ratios(text: str) -> dict[str, float]:
    """decode.py's output -> {"batch 1 default": ratio, "batch 1 one pass": ratio, ...}."""
    out = {f"batch {b} default": float(r) for b, r in _DEFAULT.findall(text)}
    out.update({f"batch {b} one pass": float(r) for b, r in _ONE_PASS.findall(text)})
    if not out:
        raise ValueError("no ratio lines in decode.py's output:\n" + text[-2000:])
    return out


def checkout(revision: str, where: str) -> str:
    """A detached worktree of `revision` under `where`, with `owl_jax.convert` / `.configs`
    importable from it (the repository's top-level folders, mapped in by setup.py on install)."""
    tree = os.path.join(where, "baseline")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, revision],
                   check=True)
    for name in ("convert", "configs"):
        if os.path.isdir(os.path.join(tree, name)):
            os.symlink(os.path.join(tree, name), os.path.join(tree, "owl_jax", name))
    return tree


def run_side(tree: str, extra: list[str]) -> dict[str, float]:
    cmd = [sys.executable, os.path.join(tree, "benchmarks", "decode.py"), "--parts", "decode",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return parse_ratios(proc.stdout)


def summarize(runs: dict[str, list[dict]]) -> list[str]:
    lines = []
    for key in runs["new"][0]:
        old = [r[key] for r in runs["baseline"] if key in r]
        new = [r[key] for r in runs["new"]]
        if not old:
            continue
        mo, mn = statistics.median(old), statistics.median(new)
        lines.append(f"{key:20s} baseline {' '.join(f'{x:.2f}' for x in old)} "
                     f"(median {mo:.2f}x HF)   this tree {' '.join(f'{x:.2f}' for x in new)} "
                     f"(median {mn:.2f}x HF)   this / baseline {mn / mo:.2f}")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Arguments after -- go to benchmarks/decode.py.")
    ap.add_argument("--baseline", required=True, help="the revision to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side (alternating)")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"baseline": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = checkout(args.baseline, tmp)
        try:
            for i in range(args.rounds):
                for side, path in (("baseline", tree), ("new", ROOT)):
                    runs[side].append(run_side(path, extra))
                    print(f"round {i + 1}/{args.rounds} {side}: " + ", ".join(
                        f"{k} {v:.2f}x" for k, v in runs[side][-1].items()), flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree])
    print(f"\ndecode speed over HF transformers, {args.baseline} against this tree:")
    print("\n".join(summarize(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
