"""One JSON record per benchmark run (where, what, with which settings, and every metric) plus a table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def environment() -> dict:
    import torch

    return {"commit": _commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpu": _cpu_name(), "num_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def write_record(path: str | os.PathLike, kind: str, config: dict, metrics: dict) -> dict:
    record = {"benchmark": kind, **environment(), "config": config, **metrics}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, default=str))
    return record


def tree_is_clean(root: str | os.PathLike) -> bool:
    """Whether the git tree at `root` has no uncommitted change: a record names the commit it measured, so a
    benchmark checks this when it starts (the code it runs is loaded then)."""
    out = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=root)
    return out.returncode == 0 and not out.stdout.strip()


def keep_record(path: str | os.PathLike | None, kind: str, config: dict, metrics: dict, clean: bool) -> None:
    """Write the record if a path was given and the tree was clean when the run began; else say why not."""
    if path and clean:
        write_record(path, kind, config, metrics)
        print(f"wrote {path}")
    elif path:
        print("(uncommitted tree: no record written)")


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


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
