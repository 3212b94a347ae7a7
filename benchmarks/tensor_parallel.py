"""Tensor parallelism on this machine: the same model split over N ranks with T/N threads each against one rank with
T threads, in one run (the configurations interleaved round by round): single-stream decode, prefill, and a batch.

On one CPU the split cannot gain (the ranks share the cores and the memory bandwidth, and add two all-reduces per
layer); what this shows is the price of the path, which is what a machine with N sockets or GPUs then buys back.

    python benchmarks/tensor_parallel.py --model qwen2.5-coder-0.5b-instruct --out benchmarks/results/tensor_parallel_qwen05.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg
from effinfer.bench.stats import mean_interval, ratio_interval
from effinfer.utils import progress

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--threads", type=int, default=2, help="threads in all: one rank gets them all, N ranks a share each")
    p.add_argument("--size", type=int, default=2, help="ranks of the split configuration")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/tensor_parallel_qwen05.json")
    add_allow_dirty_arg(p)
    args = p.parse_args()
    provenance = RunProvenance.begin(args.out, args.allow_dirty)
    # no prefix cache: every round runs the same prompts, and each must be computed again
    common = dict(dtype=args.dtype, quantization=args.quantization, max_num_seqs=max(args.batch, 1),
                  kv_cache_memory_gb=0.25, enable_prefix_caching=False, show_progress=False)
    sizes = {"tp1": 1, f"tp{args.size}": args.size}
    threads = {"tp1": args.threads, f"tp{args.size}": max(1, args.threads // args.size)}
    engines = {name: LLM(args.model, tensor_parallel_size=size, num_threads=threads[name], **common)
               for name, size in sizes.items()}
    try:
        tokenizer = engines["tp1"].tokenizer
        ids = tokenizer.encode(TEXT.read_text()[:100_000], add_special_tokens=False)
        prompt = ids[:args.prompt_len]
        batch = [ids[1000 + 64 * i:1000 + 64 * i + 128] for i in range(args.batch)]
        same = {name: greedy(llm, prompt[:64], 32) for name, llm in engines.items()}
        for name, llm in engines.items():    # warm-up
            measure(llm, threads[name], prompt[:64], batch[:2], 8)
        rounds = {name: [] for name in engines}
        for _ in progress(range(args.rounds), "rounds", True):
            for name, llm in engines.items():
                rounds[name].append(measure(llm, threads[name], prompt, batch, args.gen_len))
        summaries = {name: summarize(runs) for name, runs in rounds.items()}
        split = f"tp{args.size}"
        ratios = {metric: asdict(ratio_interval([r[metric] for r in rounds[split]], [r[metric] for r in rounds["tp1"]]))
                  for metric in rounds["tp1"][0]}
        record = {"benchmark": "tensor_parallel",
                  **provenance.environment(inputs={"model": engines["tp1"].engine.loaded.path, "text": TEXT}),
                  "model": args.model, "threads": threads, "sizes": sizes, "prompt_len": args.prompt_len,
                  "gen_len": args.gen_len, "batch": args.batch,
                  "engines": {name: llm.engine.summary for name, llm in engines.items()},
                  "same_greedy_tokens": len({tuple(v) for v in same.values()}) == 1,
                  "summary": summaries, "ratio_vs_tp1": ratios, "rounds": rounds}
    finally:
        for llm in engines.values():
            llm.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'':<6} {'threads':>7} {'decode tok/s':>13} {'prefill tok/s':>14} {'batch tok/s':>12}")
    for name, s in summaries.items():
        print(f"{name:<6} {threads[name]:>7} {s['decode_tok_s']['value']:>13.1f} {s['prefill_tok_s']['value']:>14.1f} "
              f"{s['batch_output_tok_s']['value']:>12.1f}")
    for metric, r in ratios.items():
        bounds = f" [{r['low']:.3f}, {r['high']:.3f}]" if r["low"] is not None else ""
        print(f"{split}/tp1 {metric}: {r['value']:.3f}{bounds}")
    print(f"same greedy tokens: {record['same_greedy_tokens']}   JSON record: {args.out}")


def greedy(llm: LLM, prompt: list[int], tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def measure(llm: LLM, threads: int, prompt: list[int], batch: list[list[int]], gen_len: int) -> dict:
    """Prefill rate (one prompt, one output token), single-stream decode rate, and a batch's output rate."""
    torch.set_num_threads(threads)     # the process's pool is shared by its engines: each runs with its own count
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate([prompt], one, use_tqdm=False)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    greedy(llm, prompt[:16], gen_len)
    decode_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    batch_s = time.perf_counter() - started
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": gen_len / decode_s,
            "batch_output_tok_s": len(batch) * gen_len / batch_s}


def summarize(runs: list[dict]) -> dict:
    return {metric: asdict(mean_interval([r[metric] for r in runs])) for metric in runs[0]}


if __name__ == "__main__":
    main()
