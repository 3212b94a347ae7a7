"""`effinfer bench compare`: several engine configurations on one workload in one run.

The configurations run interleaved, round by round (A B C, A B C, ...), so that drift of a shared,
noisy machine hits them alike; each metric is averaged over the rounds and reported as a ratio to the
first configuration, the baseline.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from effinfer.bench.offline import run_latency, run_throughput
from effinfer.bench.workloads import random_requests


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


def run_compare(configs: list[NamedConfig], make_llm, workload: str, rounds: int, args) -> dict:
    """Build every configuration once, then measure them interleaved for `rounds` rounds."""
    llms = {c.name: make_llm(c.options) for c in configs}
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            runs[c.name].append(_measure(llms[c.name], workload, args))
    means = {name: _mean_metrics(results) for name, results in runs.items()}
    baseline = means[configs[0].name]
    ratios = {name: {k: v / baseline[k] for k, v in m.items() if baseline.get(k)} for name, m in means.items()}
    return {"workload": workload, "rounds": rounds, "baseline": configs[0].name,
            "configs": {c.name: {"options": c.options, "resolved": llms[c.name].config.to_dict()} for c in configs},
            "metrics": means, "ratios": ratios}


def _measure(llm, workload: str, args) -> dict:
    if workload == "latency":
        return run_latency(llm, args.prompt_len, args.gen_len, repetitions=1, seed=args.bench_seed,
                           measure_machine=False)
    requests = random_requests(llm.tokenizer, args.num_prompts, args.input_len, args.output_len, args.bench_seed,
                               as_text=False)
    return run_throughput(llm, requests)


def _mean_metrics(results: list[dict]) -> dict:
    keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.mean(r[k] for r in results) for k in keys}
