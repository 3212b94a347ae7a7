"""Embeddings per second: `LLM.embed` (mean-pooled final hidden states) over ShareGPT first turns from the
development range, in batches of `--batch` prompts, after a warm-up batch. The record keeps the median over
rounds of embeddings/s and prompt tokens/s, with the engine's summary line.

    .venv/bin/python benchmarks/embeddings.py --result-file benchmarks/results/embeddings.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from effinfer.bench.provenance import add_allow_dirty_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled default model")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--result-file", default=None)
    add_allow_dirty_arg(p)
    args = p.parse_args()
    from effinfer import LLM
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import keep_record
    from effinfer.bench.workloads import sharegpt_requests
    from effinfer.loader import catalog

    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    model = args.model or str(catalog.pull(catalog.DEFAULT_MODEL))
    llm = LLM(model, max_num_seqs=args.batch)
    requests = sharegpt_requests(llm.tokenizer, args.num_prompts, seed=0, output_len=4,   # (unused here)
                                 max_prompt_len=args.max_prompt_len)
    texts = [r.prompt for r in requests]
    num_tokens = sum(r.prompt_len for r in requests)
    llm.embed(texts[:args.batch])
    rounds = []
    for r in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, len(texts), args.batch):
            llm.embed(texts[i:i + args.batch])
        elapsed = time.perf_counter() - start
        rounds.append({"embeddings_per_s": len(texts) / elapsed, "prompt_tokens_per_s": num_tokens / elapsed})
        print(f"round {r + 1}: {rounds[-1]['embeddings_per_s']:.1f} embeddings/s, "
              f"{rounds[-1]['prompt_tokens_per_s']:.0f} prompt tokens/s", flush=True)
    metrics = {key: statistics.median(x[key] for x in rounds) for key in rounds[0]}
    metrics.update(mean_prompt_tokens=num_tokens / len(texts), rounds=rounds)
    print(f"median: {metrics['embeddings_per_s']:.1f} embeddings/s ({metrics['mean_prompt_tokens']:.0f} tokens each)")
    keep_record(args.result_file, "embeddings", {**vars(args), "model": model, "engine": llm.engine.summary},
                metrics, provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
