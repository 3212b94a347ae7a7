"""Where two models' perplexities part: each model's loss on every token of a text, and the tokens whose
summed loss differs most between them (which words, or which quirks of the text, make the gap).

    python benchmarks/token_loss_diff.py ckpt/qwen05-gptq-minmax ckpt/qwen05-gptq-search \\
        --text ../shared/data/wikitext-2-valid.tokens.txt --result-file benchmarks/results/token_loss_diff.json

The text is cut into windows of `--window` tokens that do not overlap (the first token of each is not
scored), so perplexities are a little above `effinfer bench quality`'s strided ones.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import torch

from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg
from effinfer.llm import LLM


def token_losses(model: str, text: str, max_tokens: int, window: int) -> tuple[torch.Tensor, list[int], object]:
    llm = LLM(model, kv_cache_memory_gb=0.25)
    ids = llm.tokenizer.encode(text)[:max_tokens]
    losses, targets = [], []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logprobs = llm.score(chunk)[:-1]
        losses.append(-logprobs.gather(1, torch.tensor(chunk[1:])[:, None])[:, 0])
        targets += chunk[1:]
    return torch.cat(losses), targets, llm.tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_a")
    parser.add_argument("model_b")
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--result-file", default=None)
    add_allow_dirty_arg(parser)
    args = parser.parse_args()
    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    text = Path(args.text).read_text(encoding="utf-8")
    loss_a, targets, tokenizer = token_losses(args.model_a, text, args.max_tokens, args.window)
    loss_b, targets_b, _ = token_losses(args.model_b, text, args.max_tokens, args.window)
    if targets != targets_b:
        raise SystemExit("the two models tokenize the text differently; compare models of one family")
    diff_sum, count = collections.defaultdict(float), collections.Counter()
    for token, diff in zip(targets, (loss_b - loss_a).tolist()):
        diff_sum[token] += diff
        count[token] += 1
    total = float((loss_b - loss_a).sum())
    top = sorted(diff_sum.items(), key=lambda kv: -abs(kv[1]))[:args.top]
    record = {"benchmark": "token_loss_diff", **provenance.environment(inputs={"text": args.text}),
              "model_a": args.model_a, "model_b": args.model_b, "text": args.text, "scored_tokens": len(targets),
              "perplexity_a": math.exp(float(loss_a.mean())), "perplexity_b": math.exp(float(loss_b.mean())),
              "summed_loss_b_minus_a": total,
              "top_tokens": [{"token": tokenizer.decode([t]), "count": count[t], "summed_loss_b_minus_a": d}
                             for t, d in top]}
    print(f"perplexity A {record['perplexity_a']:.2f}, B {record['perplexity_b']:.2f}; "
          f"summed loss B - A over {len(targets)} tokens: {total:.1f}")
    for row in record["top_tokens"]:
        print(f"{row['token']!r:>16} x{row['count']:<4} {row['summed_loss_b_minus_a']:+8.1f}")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
