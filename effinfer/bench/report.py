"""One JSON record per benchmark run (where, what, with which settings, and every metric) plus a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from effinfer.bench.provenance import RunProvenance


def write_record(path: str | os.PathLike, kind: str, config: dict, metrics: dict, run: RunProvenance,
                 seed: int | None = None, inputs: dict | None = None) -> dict:
    """One JSON record: what ran (`run`, taken when it began; the seed; the input files with their sha256),
    the settings and every metric."""
    record = {"benchmark": kind, **run.environment(seed, inputs), "config": config, **metrics}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, default=str))
    return record


def keep_record(path: str | os.PathLike | None, kind: str, config: dict, metrics: dict, run: RunProvenance,
                seed: int | None = None, inputs: dict | None = None) -> None:
    """Write the record if a path was given (`RunProvenance.begin` has already refused a dirty tree's record
    for the repository's results)."""
    if path:
        write_record(path, kind, config, metrics, run, seed, inputs)
        print(f"wrote {path}")


def print_serve_table(m: dict) -> None:
    print(f"{'completed / failed':<32}{m['completed']} / {m['failed']}")
    print(f"{'duration (s)':<32}{m['duration']:.2f}")
    print(f"{'request throughput (req/s)':<32}{m['request_throughput']:.2f}")
    print(f"{'output throughput (tok/s)':<32}{m['output_throughput']:.1f}")
    print(f"{'total token throughput (tok/s)':<32}{m['total_token_throughput']:.1f}")
    if "goodput" in m:
        print(f"{'goodput (req/s)':<32}{m['goodput']:.2f}")
    print(f"\n{'ms':<8}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2el"):
        print(f"{name.upper():<8}" + "".join(f"{m[f'{s}_{name}_ms']:>10.1f}" for s in ("mean", "median", "p90", "p99")))
    for error in m.get("errors", []):
        print(f"error: {error}")
