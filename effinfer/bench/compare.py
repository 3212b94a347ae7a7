"""`effinfer bench compare`: several configurations (engine settings, techniques, peers) in one run.

Speed workloads run interleaved, round by round (A B C, A B C, ...), so that drift of a shared, noisy
machine hits them alike; each metric is averaged over the rounds and reported as a ratio to the first
configuration, the baseline. Quality (deterministic) runs once per configuration, with KL divergence
and greedy agreement measured against the baseline. A configuration with `system=transformers` or
`system=llamacpp` runs that peer on the same model file.
"""

from __future__ import annotations

import gc
import os
import statistics
from dataclasses import dataclass

from effinfer.bench.offline import run_latency, run_sweep, run_throughput
from effinfer.bench.workloads import prompt_set


@dataclass
class NamedConfig:
    name: str
    options: dict


def parse_config(text: str) -> NamedConfig:
    """`name=int8,dtype=bfloat16,max_num_seqs=32` -> NamedConfig; values become bool/int/float when they parse."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config items are key=value, got {item!r} in {text!r}")
        options[key.strip()] = _value(value.strip())
    name = str(options.pop("name", "") or ",".join(f"{k}={v}" for k, v in options.items()) or "default")
    return NamedConfig(name, options)


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


WORKLOADS = ("latency", "throughput", "sweep", "quality")
SWEEP_BATCH_SIZES = "1,2,4,8,16,32,64"


def run_compare(configs: list[NamedConfig], make_system, workloads: list[str], rounds: int, args) -> dict:
    """Build every configuration once; measure speed interleaved for `rounds` rounds, quality once.
    One round of speed alone builds, measures and drops one configuration at a time, so that large
    models (a 1.5B target with its draft) need the memory of one configuration, not of all."""
    systems, load, described = {}, {}, {}
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    speed = [w for w in workloads if w != "quality"]
    one_at_a_time = rounds == 1 and "quality" not in workloads
    for c in configs:
        before = current_rss_mb()
        systems[c.name] = make_system(c.options)
        load[c.name] = {"load_rss_mb": current_rss_mb() - before, "weight_mb": systems[c.name].weight_bytes() / 2**20}
        described[c.name] = systems[c.name].describe()
        if one_at_a_time:
            runs[c.name].append(_measure_all(systems.pop(c.name), speed, args))
            gc.collect()
    interleaved_rounds = rounds if speed and not one_at_a_time else 0
    for _ in range(interleaved_rounds):
        for c in configs:
            runs[c.name].append(_measure_all(systems[c.name], speed, args))
    means = {name: {**load[name], **(_mean_metrics(results) if results else {})} for name, results in runs.items()}
    if "quality" in workloads:
        _add_quality(systems, [c.name for c in configs], means, args)
    baseline = means[configs[0].name]
    ratios = {name: {k: v / baseline[k] for k, v in m.items() if isinstance(v, (int, float)) and baseline.get(k)}
              for name, m in means.items()}
    return {"workloads": workloads, "rounds": rounds, "baseline": configs[0].name,
            "configs": {c.name: {"options": c.options, **described[c.name]} for c in configs},
            "metrics": means, "ratios": ratios}


def _measure_all(system, workloads: list[str], args) -> dict:
    return {k: v for w in workloads for k, v in _measure(system, w, args).items()}


def _measure(system, workload: str, args) -> dict:
    if workload == "latency":
        return run_latency(system, args.prompt_len, args.gen_len, repetitions=1, seed=args.bench_seed,
                           measure_machine=False)
    if workload == "sweep":
        return run_sweep(system, batch_sizes(args.batch_sizes), args.input_len, args.output_len, args.bench_seed)
    requests = prompt_set(system.tokenizer, args.prompts, args.num_prompts, args.input_len, args.output_len,
                          args.bench_seed, args.text)
    return run_throughput(system, requests, args.stop_at_eos)


def batch_sizes(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (positive, in the order given)."""
    try:
        sizes = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes takes positive integers separated by commas, got {text!r}")
    return sizes


def _add_quality(systems: dict, names: list[str], means: dict, args) -> None:
    """Perplexity and multiple-choice accuracy of each; KL and greedy agreement against the baseline."""
    from effinfer.bench import quality

    baseline = systems[names[0]]
    wins = (quality.text_windows(baseline.tokenizer, args.text, args.window, args.stride, args.max_text_tokens)
            if args.text else None)
    for name in names:
        m = means[name]
        if wins:
            m.update(quality.perplexity(systems[name], wins))
            if name != names[0]:
                m.update(quality.divergence(baseline, systems[name], wins))
        accuracy = quality.task_accuracy(systems[name], args.task_names, args.limit or None)
        m.update({k: v for k, v in accuracy.items() if k != "tasks"})
        m.update({f"{task}_acc": r["acc"] for task, r in accuracy.get("tasks", {}).items()})


def _mean_metrics(results: list[dict]) -> dict:
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.mean(r[k] for r in results) for k in keys}


def current_rss_mb() -> float:
    """Resident memory now (not the peak), from /proc; 0 where the platform has no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def print_compare_table(result: dict) -> None:
    names = list(result["metrics"])
    keys = list(dict.fromkeys(k for n in names for k, v in result["metrics"][n].items() if isinstance(v, (int, float))))
    print(f"{'metric':<28}" + "".join(f"{n[:20]:>22}" for n in names))
    for key in keys:
        cells = []
        for n in names:
            value, ratio = result["metrics"][n].get(key), result["ratios"][n].get(key)
            cells.append("-" if value is None else f"{value:.4g}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        print(f"{key[:28]:<28}" + "".join(f"{c:>22}" for c in cells))
