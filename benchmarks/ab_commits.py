"""The same `effinfer bench compare` at two commits, alternating, each from a clean checkout of its commit:
the before/after of a change that should not move the figures (a refactor) or should (an optimisation).

Each commit is checked out into a temporary `git worktree` and run with this checkout's Python environment
(`PYTHONPATH` puts the worktree's `effinfer` first). The runs alternate A, B, A, B, ... (`--repeats` each),
so slow drifts of a shared machine hit both sides alike; every run writes its own `bench compare` record
(with its commit), and the summary record holds them all plus, per configuration and metric, the median of
each side and the ratio B / A.

    python benchmarks/ab_commits.py 43eabc6 HEAD --repeats 2 --result-file benchmarks/results/ab.json -- \\
        --kv-cache-memory-gb 0.25 --config name=bf16 --workload latency,throughput --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit_a")
    parser.add_argument("commit_b")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each commit, alternating")
    parser.add_argument("--result-file", required=True)
    add_allow_dirty_arg(parser)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, compare_args = parser.parse_args(argv[:split]), argv[split + 1:]   # after --: `bench compare` arguments
    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)   # this script's own code; each run's is its commit's
    commits = [_resolve(args.commit_a), _resolve(args.commit_b)]
    runs: dict[str, list[dict]] = {c: [] for c in commits}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {c: _worktree(c, Path(tmp) / c) for c in commits}
        try:
            for repeat in range(args.repeats):
                for commit in commits:
                    print(f"== run {repeat + 1}/{args.repeats} of {commit}", flush=True)
                    runs[commit].append(_run(trees[commit], compare_args, Path(tmp) / f"{commit}-{repeat}.json"))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    summary = _summarize(commits, runs)
    record = {"benchmark": "ab_commits", **provenance.environment(), "commits": commits, "repeats": args.repeats,
              "compare_args": compare_args, "summary": summary, "runs": runs}
    Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result_file).write_text(json.dumps(record, indent=1))
    _print(commits, summary)
    return 0


def _resolve(commit: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], capture_output=True, text=True,
                          check=True).stdout.strip()


def _worktree(commit: str, path: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    return path


def _run(tree: Path, compare_args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import effinfer, sys; assert effinfer.__file__.startswith(sys.argv[1]), effinfer.__file__"
    subprocess.run([sys.executable, "-c", code, str(tree)], env=env, cwd=tree, check=True)
    subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "compare", *compare_args, "--result-file",
                    str(out)], env=env, cwd=tree, check=True)
    return json.loads(out.read_text())


def _summarize(commits: list[str], runs: dict[str, list[dict]]) -> dict:
    """config -> metric -> {commit: median over the runs, "ratio": b / a}."""
    summary: dict[str, dict] = {}
    for config, first in runs[commits[0]][0]["metrics"].items():
        for metric in [m for m in first if m.endswith("_tok_s") or m in ("output_throughput", "perplexity")]:
            values = {c: [r["metrics"][config].get(metric) for r in runs[c]] for c in commits}
            if any(v is None for vs in values.values() for v in vs):
                continue
            medians = {c: statistics.median(vs) for c, vs in values.items()}
            summary.setdefault(config, {})[metric] = {**medians, "ratio": medians[commits[1]] / medians[commits[0]]}
    return summary


def _print(commits: list[str], summary: dict) -> None:
    a, b = commits
    print(f"\n| configuration | metric | {a} | {b} | {b} / {a} |\n| --- | --- | ---: | ---: | ---: |")
    for config, metrics in summary.items():
        for metric, row in metrics.items():
            print(f"| {config} | {metric} | {row[a]:.1f} | {row[b]:.1f} | {row['ratio']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
