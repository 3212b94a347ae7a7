"""Prefix caching: 32 requests that share a ~1,000-token system prompt, time to first token with the
prefix cache on and off, in one run (the two configurations interleaved, warm-up excluded).

    python benchmarks/prefix_cache.py --out benchmarks/results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/prefix_cache.json")
    add_allow_dirty_arg(p)
    args = p.parse_args()
    provenance = RunProvenance.begin(args.out, args.allow_dirty)
    torch.set_num_threads(args.threads)
    engines = {mode: LLM(args.model, dtype=args.dtype, max_num_seqs=32, max_num_batched_tokens=2048,
                         enable_prefix_caching=(mode == "on"), show_progress=False) for mode in ("off", "on")}
    llm = engines["on"]
    ids = llm.tokenizer.encode(TEXT.read_text()[:200_000], add_special_tokens=False)
    prefix = ids[:args.prefix_len]
    prompts = [prefix + ids[5000 + 40 * i: 5000 + 40 * i + 20] for i in range(args.num_requests)]
    results = {"on": [], "off": []}
    for engine in engines.values():  # warm-up
        run_once(engine, prompts[:2])
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            results[mode].append(run_once(engines[mode], prompts))
    summary = {mode: {k: statistics.mean(r[k] for r in runs) for k in runs[0]} for mode, runs in results.items()}
    record = {"benchmark": "prefix_cache", **provenance.environment(inputs={"model": llm.engine.loaded.path, "text": TEXT}),
              "model": args.model, "dtype": args.dtype, "num_requests": args.num_requests, "prefix_tokens": args.prefix_len,
              "resolved_config": llm.config.to_dict(), "engine": llm.engine.summary, "summary": summary, "rounds": results,
              # off's TTFT over on's, paired round by round (geometric mean and its 95% interval)
              **_speedup([r["mean_ttft_s"] for r in results["off"]], [r["mean_ttft_s"] for r in results["on"]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'prefix cache':<13} {'mean TTFT s':>12} {'p50 TTFT s':>11} {'total s':>8} {'hit rate':>9}")
    for mode in ("off", "on"):
        s = summary[mode]
        print(f"{mode:<13} {s['mean_ttft_s']:>12.3f} {s['median_ttft_s']:>11.3f} {s['total_s']:>8.2f} {s['hit_rate']:>9.2f}")
    print(f"TTFT speedup with the cache: {record['ttft_speedup']:.1f}x {record['ttft_speedup_ci95']}   JSON record: {args.out}")


def _speedup(off: list[float], on: list[float]) -> dict:
    from effinfer.bench.stats import ratio_interval

    ratio = ratio_interval(off, on)
    return {"ttft_speedup": ratio.value, "ttft_speedup_ci95": ratio.bounds()}


def run_once(llm, prompts) -> dict:
    """All requests arrive at once (TTFT from their common arrival), the cache emptied first so that
    only hits between the requests of this batch count."""
    blocks = llm.engine.block_manager
    blocks.reset_prefix_cache()
    hits0, queried0 = blocks.num_hit_tokens, blocks.num_queried_tokens
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    total = time.perf_counter() - start
    ttfts = [o.outputs[0].metrics.ttft for o in outs]
    queried = blocks.num_queried_tokens - queried0
    return {"mean_ttft_s": statistics.mean(ttfts), "median_ttft_s": statistics.median(ttfts), "total_s": total,
            "hit_rate": (blocks.num_hit_tokens - hits0) / queried if queried else 0.0}


if __name__ == "__main__":
    main()
