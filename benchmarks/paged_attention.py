"""Decode attention over paged KV caches, three ways side by side in one process, per decoder layer:

- `in place`: effinfer's kernel (effinfer/kernels/paged_attention.cpp), reading each block where it is;
- `compiled gather`: the compiled decode step's formulation without it (`attend_decodes_traced` under
  `torch.compile`: the blocks gathered into an fp32 copy, products and sums fused around it);
- `eager gather`: the eager backend's (`torch_sdpa`: one gather of the blocks, two batched matmuls).

SmolLM2-135M's attention shape by default (9 query heads over 3 KV heads of 64, 16-token blocks, bf16 pages),
block tables scattered at random through a pool, one context length for every sequence of a batch. Rounds
interleave the three so that a shared machine's drifts hit all alike; the record keeps the median of each.

    .venv/bin/python benchmarks/paged_attention.py --result-file benchmarks/results/paged_attention.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.gemv_kernels import timed  # noqa: E402


def contestants(q, pages, tables, lens, scale: float) -> dict:
    from effinfer import kernels
    from effinfer.layers.attention import PagedKVCache
    from effinfer.layers.attn_backends.torch_sdpa import _attend_decodes
    from effinfer.layers.attn_backends.traced_decode import attend_decodes_traced, decode_mask

    kernel, cache = kernels.paged_decode_attention(), PagedKVCache(pages)
    mask = decode_mask(lens, tables.shape[1], pages.shape[3], None)
    traced = torch.compile(attend_decodes_traced, dynamic=False)
    return {"in place": lambda: kernel(q, pages, tables, lens, scale, 0),
            "compiled gather": lambda: traced(q, cache, tables, mask, scale),
            "eager gather": lambda: _attend_decodes(q, cache, tables, mask, scale)}


def main() -> int:
    from effinfer.bench.provenance import add_allow_dirty_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--result-file", default=None)
    add_allow_dirty_arg(p)
    args = p.parse_args()
    from effinfer import kernels
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import keep_record

    if kernels.paged_decode_attention() is None:
        sys.exit("effinfer's paged attention kernel is not available here (it needs a C++ compiler and AVX-512)")
    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    torch.manual_seed(0)
    rows = []
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            width = -(-context // args.block_size)
            num_blocks = batch * width + 8
            pages = torch.randn(2, args.kv_heads, num_blocks, args.block_size, args.head_dim).bfloat16()
            tables = torch.randperm(num_blocks)[:batch * width].view(batch, width)
            q = torch.randn(batch, args.heads, args.head_dim).bfloat16()
            lens = torch.full((batch,), context)
            ways = contestants(q, pages, tables, lens, args.head_dim ** -0.5)
            times = {name: [] for name in ways}
            for _ in range(args.rounds):
                for name, fn in ways.items():
                    times[name].append(timed(fn, args.repeats, warmup=5) * 1e6)
            row = {"context": context, "batch": batch, **{f"{n}_us": statistics.median(t) for n, t in times.items()}}
            rows.append(row)
            print(f"context {context:>5} batch {batch:>3}: " + "  ".join(
                f"{n} {row[f'{n}_us']:8.1f} us" for n in ways) +
                f"   in place: {row['compiled gather_us'] / row['in place_us']:.2f}x compiled gather, "
                f"{row['eager gather_us'] / row['in place_us']:.2f}x eager", flush=True)
    keep_record(args.result_file, "paged_attention", vars(args), {"rows": rows}, provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
