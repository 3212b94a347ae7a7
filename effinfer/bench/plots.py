"""PNG charts from benchmark records (matplotlib, imported only here): serving throughput against
concurrency per system, and the latency percentiles of each run."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p90", "p99")


def plot_serve(records: list[dict], out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_system = defaultdict(list)
    for r in records:
        by_system[_label(r)].append(r)
    ordered = sorted(records, key=lambda r: (_label(r), _concurrency(r)))
    return [_throughput_chart(plt, by_system, out_dir / "serve_throughput_vs_concurrency.png"),
            _latency_chart(plt, ordered, out_dir / "serve_latency_percentiles.png")]


def _label(record: dict) -> str:
    return record["config"].get("label") or record["config"].get("base_url", "?")


def _concurrency(record: dict) -> int:
    return record["config"].get("max_concurrency") or record["completed"] + record["failed"]


def _throughput_chart(plt, by_system: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for system, runs in sorted(by_system.items()):
        runs = sorted(runs, key=_concurrency)
        ax.plot([_concurrency(r) for r in runs], [r["output_throughput"] for r in runs], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Serving throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _latency_chart(plt, records: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4 * len(LATENCIES), 3.8))
    width = 0.8 / max(len(records), 1)
    for ax, metric in zip(axes, LATENCIES):
        for i, r in enumerate(records):
            xs = [j + i * width for j in range(len(STATS))]
            ax.bar(xs, [r[f"{s}_{metric}_ms"] for s in STATS], width, label=f"{_label(r)} c={_concurrency(r)}")
        ax.set_xticks([j + width * (len(records) - 1) / 2 for j in range(len(STATS))], STATS)
        ax.set_title(f"{metric.upper()} (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SPEED_KEYS = ("tg*_tok_s", "output_throughput")   # single-stream decode first, else batched throughput
QUALITY_KEYS = ("perplexity", "kl_divergence", "mean_acc_per_char", "mean_acc")


def plot_speed_quality(result: dict, path: str | Path) -> Path:
    """One point per configuration of a `bench compare` record: a speed metric against a quality metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    speed = _first_key(metrics, SPEED_KEYS, "speed (a latency or throughput workload)")
    quality = _first_key(metrics, QUALITY_KEYS, "quality (the quality workload)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, m in metrics.items():
        if speed in m and quality in m:
            ax.scatter(m[quality], m[speed], s=40)
            ax.annotate(name, (m[quality], m[speed]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    xs = [m[quality] for m in metrics.values() if quality in m and m[quality] > 0]
    if xs and max(xs) / min(xs) > 5:   # a few far-off points would squeeze the rest together
        ax.set_xscale("log")
    better = "lower is better" if quality in ("perplexity", "kl_divergence") else "higher is better"
    ax.set_xlabel(f"{quality} ({better})")
    ax.set_ylabel(f"{speed} (tokens/s)")
    ax.set_title(f"Speed vs quality (baseline: {result['baseline']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_compare(result: dict, path: str | Path) -> Path:
    """A `bench compare` record's plot: tokens/s by batch size for a sweep, speed against quality when it
    measured quality, else speed-ups."""
    if "sweep" in result.get("workloads", []):
        return plot_sweep(result, path)
    has_quality = any(k in m for m in result["metrics"].values() for k in QUALITY_KEYS)
    return plot_speed_quality(result, path) if has_quality else plot_speedups(result, path)


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Output tokens/s against batch size, one line per configuration: after the first token, and with prefill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind, title in zip(axes, ("decode", "output"), ("after the first token", "with prefill")):
        for name, metrics in result["metrics"].items():
            points = sorted((int(k[1:].split("_")[0]), v) for k, v in metrics.items()
                            if k.startswith("b") and k.endswith(f"_{kind}_tok_s"))
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences at once")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"Output tokens/s, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedups(result: dict, path: str | Path) -> Path:
    """Bars of each configuration's speed over the baseline's, with its draft acceptance where it speculated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    speed = _first_key(metrics, SPEED_KEYS, "speed (a latency or throughput workload)")
    base = metrics[result["baseline"]][speed]
    names = [n for n, m in metrics.items() if speed in m]
    ratios = [metrics[n][speed] / base for n in names]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 4.5))
    bars = ax.bar(names, ratios, color=["#999999" if r < 1 else "#4c72b0" for r in ratios])
    for bar, name, ratio in zip(bars, names, ratios):
        acceptance = metrics[name].get("spec_acceptance_rate")
        label = f"{ratio:.2f}x" + (f"\n{acceptance:.0%} acc." if acceptance else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, ratio), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylim(0, max(ratios) * 1.15)   # room for the labels
    ax.set_ylabel(f"{speed} / baseline's ({base:.1f})")
    ax.set_title(f"Speed-up over {result['baseline']}")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _first_key(metrics: dict, patterns: tuple[str, ...], what: str) -> str:
    from fnmatch import fnmatch

    for pattern in patterns:
        for m in metrics.values():
            key = next((k for k in m if fnmatch(k, pattern)), None)
            if key:
                return key
    raise ValueError(f"the record has no {what} metric to plot; run compare with that workload")
