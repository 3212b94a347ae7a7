"""In-process benchmarks through the public `LLM` API.

`latency` is llama-bench's pp/tg: prefill tokens/s on an N-token prompt and decode tokens/s over M
generated tokens (first to last token, prefill excluded), repeated with mean and std, the warm-up run
timed and reported apart, and the memory bandwidth that decode achieves (bytes read per token x
tokens/s) beside the machine's own, measured in the same run. `throughput` runs a request set to
completion in one continuous batch. Both report peak resident memory, CPU utilization and energy.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from effinfer.bench.workloads import BenchRequest, random_requests
from effinfer.sampling_params import SamplingParams

# Energy fallback when the machine exposes no power counter: an assumed per-core package power under
# load. A rough figure for server cores (TDP / cores); the record labels results from it as estimates.
ASSUMED_WATTS_PER_CORE = 5.0
RAPL_FILE = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def run_latency(llm, prompt_len: int = 512, gen_len: int = 128, repetitions: int = 5, seed: int = 0,
                measure_machine: bool = True) -> dict:
    prompts = [r.prompt for r in random_requests(llm.tokenizer, repetitions + 1, prompt_len, 1, seed, as_text=False)]
    warmup_start = time.perf_counter()
    _prefill_rate(llm, prompts[0])
    _decode_rate(llm, prompts[0][:16], gen_len)
    warmup_s = time.perf_counter() - warmup_start
    meter = ResourceMeter()
    pp = [_prefill_rate(llm, p) for p in prompts[1:]]
    tg = [_decode_rate(llm, p[:16], gen_len) for p in prompts[1:]]
    tokens = repetitions * (prompt_len + gen_len)
    resources = meter.report(tokens)     # before the bandwidth probe, whose 1 GiB buffer would count
    bytes_per_token = decode_bytes_per_token(llm, 16 + gen_len / 2)
    machine = {"machine_bandwidth_gb_s": measure_bandwidth()} if measure_machine else {}
    return {
        f"pp{prompt_len}_tok_s": statistics.mean(pp), f"pp{prompt_len}_tok_s_std": statistics.pstdev(pp),
        f"tg{gen_len}_tok_s": statistics.mean(tg), f"tg{gen_len}_tok_s_std": statistics.pstdev(tg),
        "warmup_s": warmup_s, "repetitions": repetitions,
        "decode_bytes_per_token": bytes_per_token,
        "decode_bandwidth_gb_s": bytes_per_token * statistics.mean(tg) / 1e9,
        **machine,
        **resources,
    }


def run_throughput(llm, requests: list[BenchRequest]) -> dict:
    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
    meter = ResourceMeter()
    start = time.perf_counter()
    results = llm.generate([r.prompt for r in requests], params, use_tqdm=True)
    duration = time.perf_counter() - start
    num_in = sum(len(r.prompt_token_ids) for r in results)
    num_out = sum(len(o.token_ids) for r in results for o in r.outputs)
    return {"duration": duration, "num_requests": len(requests), "total_input_tokens": num_in,
            "total_output_tokens": num_out, "request_throughput": len(requests) / duration,
            "output_throughput": num_out / duration, "total_token_throughput": (num_in + num_out) / duration,
            **meter.report(num_in + num_out)}


def _prefill_rate(llm, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    return len(prompt) / (time.perf_counter() - start)


def _decode_rate(llm, prompt: list[int], gen_len: int) -> float:
    first = last = None
    for _ in llm.stream(prompt, SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)):
        last = time.perf_counter()
        first = first or last
    return (gen_len - 1) / (last - first)


def decode_bytes_per_token(llm, mean_context: float) -> float:
    """Bytes one decode step reads: every weight once, plus the K/V of the context."""
    engine = llm.engine
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    cfg = engine.loaded.config
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=engine.dtype).element_size()
    return weights + kv_per_token * mean_context


def measure_bandwidth(num_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: the best of a few sums over a buffer far larger than the caches."""
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


class ResourceMeter:
    """Peak resident memory, CPU utilization and energy between construction and `report`."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.energy_uj = _read_rapl()

    def report(self, num_tokens: int) -> dict:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        end_uj = _read_rapl()
        if self.energy_uj is not None and end_uj is not None and end_uj >= self.energy_uj:
            joules, method = (end_uj - self.energy_uj) / 1e6, "measured (RAPL package counter)"
        else:
            joules, method = cpu * ASSUMED_WATTS_PER_CORE, f"estimate: CPU seconds x {ASSUMED_WATTS_PER_CORE} W per busy core"
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "cpu_utilization": cpu / wall if wall else 0.0,
                "energy_j_per_1k_tokens": joules / num_tokens * 1000 if num_tokens else 0.0,
                "energy_method": method}


def _read_rapl() -> int | None:
    try:
        return int(RAPL_FILE.read_text())
    except (OSError, ValueError):
        return None
