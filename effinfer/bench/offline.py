"""In-process benchmarks of a `System` (effinfer through its `LLM` API, or a peer: see systems.py).

`latency` is llama-bench's pp/tg: prefill tokens/s on an N-token prompt and decode tokens/s over M
generated tokens (first to last token, prefill excluded), repeated with mean and std, the warm-up run
timed and reported apart, and the memory bandwidth that decode achieves (bytes read per token x
tokens/s) beside the machine's own, measured in the same run. `throughput` runs a request set to
completion (effinfer: one continuous batch). Both report peak resident memory, CPU utilization and energy.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

from effinfer.compression.quant import get_kv_dtype
from effinfer.engine.kv_cache import bytes_per_block
from effinfer.bench.stats import mean_interval
from effinfer.bench.workloads import BenchRequest, random_requests
from effinfer.utils import progress

# Energy fallback when the machine exposes no power counter: an assumed per-core package power under
# load. A rough figure for server cores (TDP / cores); the record labels results from it as estimates.
ASSUMED_WATTS_PER_CORE = 5.0
RAPL_FILE = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


def run_latency(system, prompt_len: int = 512, gen_len: int = 128, repetitions: int = 5, seed: int = 0,
                measure_machine: bool = True) -> dict:
    if system.own_tools:        # a peer timed by its own tool, in its own process (no resource meter here)
        own = system.own_measurement("latency", prompt_len=prompt_len, gen_len=gen_len, repetitions=repetitions)
        machine = {"machine_bandwidth_gb_s": measure_bandwidth()} if measure_machine else {}
        return {**own, "decode_bandwidth_gb_s": system.weight_bytes() * own[f"tg{gen_len}_tok_s"] / 1e9, **machine}
    prompts = [r.prompt for r in random_requests(system.tokenizer, repetitions + 1, prompt_len, 1, seed, as_text=False)]
    warmup_start = time.perf_counter()
    _prefill_rate(system, prompts[0])
    _decode_rate(system, prompts[0][:16], gen_len)
    warmup_s = time.perf_counter() - warmup_start
    meter = ResourceMeter()
    pp = [_prefill_rate(system, p) for p in prompts[1:]]
    tg = [_decode_rate(system, p[:16], gen_len) for p in prompts[1:]]
    tokens = repetitions * (prompt_len + gen_len)
    resources = meter.report(tokens)     # before the bandwidth probe, whose 1 GiB buffer would count
    bytes_per_token = system.weight_bytes() + kv_bytes_per_token(system) * (16 + gen_len / 2)
    machine = {"machine_bandwidth_gb_s": measure_bandwidth()} if measure_machine else {}
    return {
        **speed_stats(f"pp{prompt_len}_tok_s", pp), **speed_stats(f"tg{gen_len}_tok_s", tg),
        "warmup_s": warmup_s, "repetitions": repetitions,
        "decode_bytes_per_token": bytes_per_token,
        "decode_bandwidth_gb_s": bytes_per_token * statistics.mean(tg) / 1e9,
        **machine,
        **resources,
    }


def speed_stats(name: str, values: list[float]) -> dict:
    """A speed's mean, its spread over repetitions and a 95% t-interval (`{name}_ci95`; none from one run)."""
    interval = mean_interval(values)
    out = {name: interval.value, f"{name}_std": interval.std or 0.0}
    if interval.low is not None:
        out[f"{name}_ci95"] = interval.bounds()
    return out


def run_throughput_repeated(system, requests: list[BenchRequest], stop_at_eos: bool, repetitions: int) -> dict:
    """`run_throughput` `repetitions` times: the first run's record, with the throughputs' means and intervals
    over all runs (each run starts with an empty prefix cache, so each computes every prompt)."""
    runs = [run_throughput(system, requests, stop_at_eos) for _ in range(repetitions)]
    out = dict(runs[0])
    for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput"):
        out.update(speed_stats(key, [r[key] for r in runs]))
    if "peak_rss_mb" in runs[0]:      # (a peer timed by its own tool runs in a process of its own)
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["repetitions"] = repetitions
    out["runs"] = [{"duration": r["duration"], "output_throughput": r["output_throughput"]} for r in runs]
    return out


def run_throughput(system, requests: list[BenchRequest], stop_at_eos: bool = False) -> dict:
    if system.own_tools:
        return _own_throughput(system, requests, stop_at_eos)
    system.forget_cache()
    meter = ResourceMeter()
    spec_before = system.spec_stats()
    start = time.perf_counter()
    num_out = system.run_batch([r.prompt for r in requests], [r.output_len for r in requests], stop_at_eos)
    duration = time.perf_counter() - start
    num_in = sum(r.prompt_len for r in requests)
    return {"duration": duration, "num_requests": len(requests), "total_input_tokens": num_in,
            "total_output_tokens": num_out, "request_throughput": len(requests) / duration,
            "output_throughput": num_out / duration, "total_token_throughput": (num_in + num_out) / duration,
            **spec_metrics(spec_before, system.spec_stats()), **meter.report(num_in + num_out)}


def run_sweep(system, batch_sizes: list[int], input_len: int, output_len: int, seed: int = 0) -> dict:
    """Each batch size B: B random prompts of `input_len` tokens, each to `output_len` tokens, at once. Output
    tokens/s with prefill included (`b{B}_output_tok_s`), and after the first token (`b{B}_decode_tok_s`: the
    same batch run to one token is subtracted; with chunked prefill, the first sequences of a large batch
    decode while the last ones prefill, so this is the steps after prefill, not a pure decode). For a system
    that runs its batch at once (effinfer; not llama-cpp-python's one request at a time); needs max_num_seqs
    >= B and a KV pool that holds B sequences (else preemption slows what is measured)."""
    if output_len < 2:
        raise ValueError(f"the sweep needs output_len >= 2 (decode steps to time), got {output_len}")
    if system.own_tools:
        return system.own_measurement("sweep", batch_sizes=batch_sizes, input_len=input_len, output_len=output_len)
    warmup = [r.prompt for r in random_requests(system.tokenizer, min(batch_sizes), input_len, 1, seed, as_text=False)]
    _timed_batch(system, warmup, 2)   # first-touch costs (KV blocks, kernel scratch) out of the first size's figures
    out = {}
    for size in progress(batch_sizes, "batch sizes"):
        prompts = [r.prompt for r in random_requests(system.tokenizer, size, input_len, 1, seed + size, as_text=False)]
        first_s, first_tokens = _timed_batch(system, prompts, 1)
        whole_s, whole_tokens = _timed_batch(system, prompts, output_len)
        if whole_tokens != size * output_len:
            raise RuntimeError(f"the sweep's batch of {size} made {whole_tokens} tokens, not {size * output_len} "
                               "(a context or KV pool too small for it?)")
        if whole_s <= first_s:
            raise RuntimeError(f"the batch of {size} to {output_len} tokens took no longer than to one token: "
                               "too short to time; raise --output-len")
        out[f"b{size}_output_tok_s"] = whole_tokens / whole_s
        out[f"b{size}_decode_tok_s"] = (whole_tokens - first_tokens) / (whole_s - first_s)
    return out


def _own_throughput(system, requests: list[BenchRequest], stop_at_eos: bool) -> dict:
    """A request set run by a peer's own batched tool: all at once, one shape (its own random prompts)."""
    shapes = {(r.prompt_len, r.output_len) for r in requests}
    if len(shapes) != 1 or stop_at_eos:
        raise ValueError(f"{system.name} runs one batch of equal requests to their full length: use random prompts "
                         "with --range-ratio 0 and without --stop-at-eos")
    (input_len, output_len), size = shapes.pop(), len(requests)
    m = system.own_measurement("sweep", batch_sizes=[size], input_len=input_len, output_len=output_len)
    out_rate = m[f"b{size}_output_tok_s"]
    duration = size * output_len / out_rate
    return {"duration": duration, "num_requests": size, "total_input_tokens": size * input_len,
            "total_output_tokens": size * output_len, "request_throughput": size / duration,
            "output_throughput": out_rate, "total_token_throughput": size * (input_len + output_len) / duration}


def _timed_batch(system, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    """(seconds, output tokens) of one batch run to completion."""
    system.forget_cache()   # the same prompts again must not hit the prefix cache
    start = time.perf_counter()
    tokens = system.run_batch(prompts, [output_len] * len(prompts), False)
    return time.perf_counter() - start, tokens


def spec_metrics(before: dict, after: dict) -> dict:
    """Acceptance rate, mean accepted drafts per verifying step, tokens per verifying step; the early-exit rate."""
    if not after:
        return {}
    drafts, accepted, steps = (after[k] - before.get(k, 0) for k in ("draft_tokens", "accepted_tokens", "verify_steps"))
    out = {"spec_draft_tokens": drafts, "spec_acceptance_rate": accepted / drafts if drafts else 0.0,
           "spec_mean_accepted": accepted / steps if steps else 0.0,
           "spec_tokens_per_step": (accepted + steps) / steps if steps else 1.0}
    if "exit_candidates" in after:   # early exit: the share of decode tokens that left the model early
        candidates = after["exit_candidates"] - before.get("exit_candidates", 0)
        out["early_exit_rate"] = (after["exited_tokens"] - before.get("exited_tokens", 0)) / candidates if candidates else 0.0
    return out


def _prefill_rate(system, prompt: list[int]) -> float:
    system.forget_cache()
    start = time.perf_counter()
    system.prefill(prompt)
    return len(prompt) / (time.perf_counter() - start)


def _decode_rate(system, prompt: list[int], gen_len: int) -> float:
    times = system.decode_times(prompt, gen_len)
    return (len(times) - 1) / (times[-1] - times[0])


def kv_bytes_per_token(system) -> int:
    """K and V of one token in every layer, at the width each system keeps them (16-bit for the peers)."""
    engine = getattr(getattr(system, "llm", None), "engine", None)
    if engine is None:
        return 0     # a peer: its KV layout is its own; weights dominate at these context lengths
    block_size = engine.config.cache.block_size
    return bytes_per_block(engine.model, block_size, engine.dtype, get_kv_dtype(engine.config.cache.kv_cache_dtype)) // block_size


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
    """Peak resident memory, CPU utilization and energy between construction and `report`.

    `peak_rss_mb` is the process's peak over its life (model loading included); `interval_peak_rss_mb` the peak
    of this interval alone (Linux's high-water mark is reset when the meter starts, `/proc/self/clear_refs`), and
    `peak_rss_increase_mb` how far it rose above the resident memory at the start: what `bench compare`
    attributes to the configuration measured."""

    def __init__(self):
        self.peak_is_own = reset_peak_rss()
        self.start_rss_mb = current_rss_mb()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.energy_uj = _read_rapl()

    def report(self, num_tokens: int) -> dict:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        end_uj = _read_rapl()
        if self.energy_uj is not None and end_uj is not None and end_uj >= self.energy_uj:
            joules, method = (end_uj - self.energy_uj) / 1e6, "measured (RAPL package counter)"
        else:
            joules, method = cpu * ASSUMED_WATTS_PER_CORE, f"estimate: CPU seconds x {ASSUMED_WATTS_PER_CORE} W per busy core"
        interval = {}
        if self.peak_is_own:
            peak = peak_rss_mb()
            interval = {"interval_peak_rss_mb": peak, "peak_rss_increase_mb": max(0.0, peak - self.start_rss_mb)}
        return {"peak_rss_mb": lifetime_peak_rss_mb(), **interval,
                "cpu_utilization": cpu / wall if wall else 0.0,
                "energy_j_per_1k_tokens": joules / num_tokens * 1000 if num_tokens else 0.0,
                "energy_method": method}


_earlier_peak_mb = 0.0
"""The process's high-water mark before the last reset (a reset forgets it; the lifetime peak must not)."""


def reset_peak_rss() -> bool:
    """Reset the process's resident high-water mark (Linux >= 4.0); False where that cannot be done."""
    global _earlier_peak_mb
    _earlier_peak_mb = lifetime_peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The resident high-water mark since the last reset."""
    return _status_kb("VmHWM") / 1024


def lifetime_peak_rss_mb() -> float:
    current = peak_rss_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(_earlier_peak_mb, current)


def current_rss_mb() -> float:
    """Resident memory now (not the peak), from /proc; 0 where the platform has no /proc."""
    return _status_kb("VmRSS") / 1024


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def _read_rapl() -> int | None:
    try:
        return int(RAPL_FILE.read_text())
    except (OSError, ValueError):
        return None
