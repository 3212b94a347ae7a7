"""Write the calibration text used for GPTQ, AWQ, SmoothQuant and Wanda in the benchmarks: ShareGPT
conversations 10,000-10,399 (outside the development range 0-9,999 and unrelated to the evaluation
text, WikiText-2), each turn's text as is, turns and conversations separated by blank lines.

    python benchmarks/calib_text.py --out calib.txt
"""

from __future__ import annotations

import argparse

from effinfer.bench.workloads import load_sharegpt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--first", type=int, default=10_000)
    parser.add_argument("--count", type=int, default=400)
    args = parser.parse_args()
    conversations = load_sharegpt()[args.first:args.first + args.count]
    texts = ["\n\n".join(t["value"] for t in c.get("conversations") or [] if t.get("value")) for c in conversations]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n\n".join(t for t in texts if t))
    print(f"{len(conversations)} conversations -> {args.out}")


if __name__ == "__main__":
    main()
