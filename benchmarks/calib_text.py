"""Write the calibration text used for GPTQ, AWQ, SmoothQuant and Wanda in the benchmarks: 400 ShareGPT
conversations of the development range (0-9,999), taken from the end of the seed-0 permutation that the
benchmarks' chat prompts are drawn from (they use its first positions; `distill_corpus.py` the middle), so
calibration, distillation and measured prompts do not share a conversation; unrelated to the evaluation
text, WikiText-2. Each turn's text as is, turns and conversations separated by blank lines.

    python benchmarks/calib_text.py --out calib.txt
"""

from __future__ import annotations

import argparse

import numpy as np

from effinfer.bench.workloads import SHAREGPT_DEVELOPMENT, load_sharegpt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", type=int, default=SHAREGPT_DEVELOPMENT - 400,
                        help="first position in the seed-0 permutation of the development range")
    parser.add_argument("--count", type=int, default=400)
    args = parser.parse_args()
    if not (0 <= args.first and args.first + args.count <= SHAREGPT_DEVELOPMENT):
        parser.error(f"positions {args.first}..{args.first + args.count - 1} leave the development range "
                     f"(0..{SHAREGPT_DEVELOPMENT - 1})")
    development = load_sharegpt()[:SHAREGPT_DEVELOPMENT]
    order = np.random.default_rng(0).permutation(len(development))[args.first:args.first + args.count]
    conversations = [development[i] for i in order]
    texts = ["\n\n".join(t["value"] for t in c.get("conversations") or [] if t.get("value")) for c in conversations]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(t for t in texts if t))
    print(f"{len(conversations)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
