"""`effinfer bench compare`: several configurations (engine settings, techniques, peers) in one run.

Speed workloads run interleaved, round by round (A B C, A B C, ...), so that drift of a shared, noisy
machine hits them alike; each metric is averaged over the rounds and reported as a ratio to the first
configuration, the baseline. Quality (deterministic) runs once per configuration, with KL divergence
and greedy agreement measured against the baseline. A configuration with `system=transformers` or
`system=llamacpp` runs that peer on the same model file.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

from effinfer.bench.offline import current_rss_mb, peak_rss_mb, reset_peak_rss, run_latency, run_sweep, run_throughput
from effinfer.bench.provenance import describe_inputs
from effinfer.bench.stats import mean_interval, ratio_interval
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


def run_compare(configs: list[NamedConfig], make_system, workloads: list[str], rounds: int, args,
                target_ci: float | None = None, max_rounds: int = 20, time_cap_s: float = 1800.0) -> dict:
    """Build every configuration once; measure speed interleaved for `rounds` rounds, quality once.
    With `target_ci` (a relative half-width, 0.05 for +-5%), rounds are added until every headline ratio's
    95% interval is that narrow, or `max_rounds` or `time_cap_s` is reached. A headline speed's ratio is the
    geometric mean of its per-round ratios (the centre of its interval); other metrics' are ratios of means.
    Each configuration's peak memory is its own: the process before any was built, plus the most its build
    and its measurements rose above where each began (resident high-water marks, reset for each). One round
    of speed alone builds,
    measures and drops one configuration at a time, so that large models (a 1.5B target with its draft) need
    the memory of one configuration, not of all."""
    systems, load, described = {}, {}, {}
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    speed = [w for w in workloads if w != "quality"]
    one_at_a_time = rounds == 1 and not target_ci and "quality" not in workloads
    base_rss = current_rss_mb()
    for c in configs:
        before, own_peak = current_rss_mb(), reset_peak_rss()
        systems[c.name] = make_system(c.options)
        after = current_rss_mb()
        load[c.name] = {"load_rss_mb": after - before, "weight_mb": systems[c.name].weight_bytes() / 2**20,
                        "load_peak_increase_mb": max(0.0, peak_rss_mb() - before) if own_peak else 0.0}
        described[c.name] = {**systems[c.name].describe(), "inputs": describe_inputs(systems[c.name].input_files())}
        if one_at_a_time:
            runs[c.name].append(_measure_all(systems.pop(c.name), speed, args))
            gc.collect()
    start = time.perf_counter()
    done = 0
    most = max(rounds, max_rounds) if target_ci else rounds
    while speed and not one_at_a_time and done < most:
        if done >= rounds and (not target_ci or _widest(runs, configs[0].name) <= target_ci
                               or time.perf_counter() - start > time_cap_s):
            break
        for c in configs:
            runs[c.name].append(_measure_all(systems[c.name], speed, args))
        done += 1
    means = {name: {**load[name], **(_summarize_rounds(results) if results else {})} for name, results in runs.items()}
    for name, m in means.items():   # this configuration's own memory (a peer's own tool: its process's, not here)
        if "peak_rss_increase_mb" in m:
            rise = max(r["peak_rss_increase_mb"] for r in runs[name])
            m["peak_rss_mb"] = base_rss + max(m["load_peak_increase_mb"], m["load_rss_mb"] + rise)
    if "quality" in workloads:
        _add_quality(systems, [c.name for c in configs], means, args)
    baseline = means[configs[0].name]
    ratios = {name: {k: v / baseline[k] for k, v in m.items() if _is_number(v) and baseline.get(k)}
              for name, m in means.items()}
    paired = _paired_ratios(runs, configs[0].name)
    for name, intervals in paired.items():
        ratios[name].update({k: i.value for k, i in intervals.items()})
    return {"workloads": workloads, "rounds": max(map(len, runs.values())), "baseline": configs[0].name,
            "target_ci": target_ci, "configs": {c.name: {"options": c.options, **described[c.name]} for c in configs},
            "metrics": means, "ratios": ratios,
            "ratio_ci95": {name: {k: i.bounds() for k, i in intervals.items() if i.low is not None}
                           for name, intervals in paired.items()},
            "per_round": runs}


HEADLINE_SUFFIXES = ("_tok_s", "_throughput")
"""Speed metrics whose ratio intervals `--target-ci` narrows (throughputs and tokens/s, not memory or time)."""


def _headline(key: str) -> bool:
    return key.endswith(HEADLINE_SUFFIXES)


def _paired_ratios(runs: dict[str, list[dict]], baseline: str) -> dict[str, dict]:
    """{config: {metric: Interval}}: each headline speed's ratio to the baseline over the paired rounds."""
    out = {}
    base = runs[baseline]
    for name, results in runs.items():
        if name == baseline or len(results) < 2 or len(results) != len(base):
            continue
        keys = [k for k, v in results[0].items() if _headline(k) and _is_number(v) and k in base[0]]
        out[name] = {k: ratio_interval([r[k] for r in results], [r[k] for r in base]) for k in keys}
    return out


def _widest(runs: dict[str, list[dict]], baseline: str) -> float:
    """The widest relative half-width among the headline intervals: every configuration's ratios to the
    baseline (a baseline alone: its own speeds), inf until there are two rounds."""
    base = runs[baseline]
    if len(base) < 2:
        return float("inf")
    others = [results for name, results in runs.items() if name != baseline]
    widths = []
    for results in others or [base]:
        for key in (k for k, v in results[0].items() if _headline(k) and _is_number(v) and k in base[0]):
            values = [r[key] for r in results]
            i = ratio_interval(values, [r[key] for r in base]) if others else mean_interval(values)
            widths.append(float("inf") if i.low is None else i.relative_half_width())
    return max(widths, default=0.0)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _measure_all(system, workloads: list[str], args) -> dict:
    """One round of every speed workload, and how far the process's resident memory rose during it (the KV
    pages a sweep touches count: the high-water mark is reset for the round)."""
    start, own_peak = current_rss_mb(), reset_peak_rss()
    out = {k: v for w in workloads for k, v in _measure(system, w, args).items()}
    out.pop("interval_peak_rss_mb", None)      # process-wide: every loaded configuration's memory, not this one's
    if own_peak:
        out["peak_rss_increase_mb"] = max(0.0, peak_rss_mb() - start)
    return out


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
        for task, r in accuracy.get("tasks", {}).items():
            m.update({f"{task}_acc": r["acc"], f"{task}_acc_stderr": r["acc_stderr"]})


def _summarize_rounds(results: list[dict]) -> dict:
    """Each metric's mean over the rounds; for the speeds, also a 95% interval (`{key}_ci95`) from two rounds on."""
    out = {}
    for key in (k for k, v in results[0].items() if _is_number(v)):
        interval = mean_interval([r[key] for r in results])
        out[key] = interval.value
        if _headline(key) and interval.low is not None:
            out[f"{key}_ci95"] = interval.bounds()
    return out


def print_compare_table(result: dict) -> None:
    """Each metric's mean per configuration with its ratio to the baseline and, after two rounds or more, the
    ratio's 95% interval: `86.1 (1.22x [1.15, 1.29])`."""
    names = list(result["metrics"])
    keys = list(dict.fromkeys(k for n in names for k, v in result["metrics"][n].items() if _is_number(v)))
    intervals = result.get("ratio_ci95", {})
    print(f"{'metric':<28}" + "".join(f"{n[:28]:>32}" for n in names))
    for key in keys:
        cells = []
        for n in names:
            value, ratio = result["metrics"][n].get(key), result["ratios"][n].get(key)
            bounds = intervals.get(n, {}).get(key)
            ratio_text = "" if ratio is None else f" ({ratio:.2f}x" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "") + ")"
            cells.append("-" if value is None else f"{value:.4g}{ratio_text}")
        print(f"{key[:28]:<28}" + "".join(f"{c:>32}" for c in cells))
    print(f"({result['rounds']} interleaved round(s); [intervals]: 95% over paired rounds)")
