"""Quantized matmuls for steps of many rows (prefill chunks, decode batches), side by side in one process:

- `bf16`: `F.linear` on bf16 weights (what a bf16 model runs);
- `int4 kernel`: what an int4 layer runs (`int4_mm`: effinfer's GEMV up to 8 rows, its GEMM above);
- `int4 dequantize + bf16`: the weight unpacked to bf16 for the call, then `F.linear`;
- `int8 kernel`: what an int8 layer runs: effinfer's int8 GEMV (int16 activations) up to 16 rows, its GEMM
  (int8 activations per block of 32 columns) above;
- `int8 dequantize + bf16`: the weight unpacked to bf16 for the call, then `F.linear`.

The weights of `--layers` decoder layers of SmolLM2-135M's shapes (fused q/k/v, o, gate/up, down; int4 in
groups of 32, as the file's Q4_1 blocks), separate tensors as in the engine; milliseconds per pass over them,
per row count. Rounds interleave the ways so that a shared machine's drifts hit all alike; the record keeps
the median of each.

    .venv/bin/python benchmarks/many_rows.py --result-file benchmarks/results/many_rows.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.gemv_kernels import int4_weights, int8_weights, timed  # noqa: E402


def ways(layers: list, x: dict) -> dict:
    from effinfer import kernels
    from effinfer.compression.quant.weight_only import KERNEL_MAX_ROWS

    mm, gemv8, gemm8 = kernels.int4_mm(), kernels.int8_gemv(), kernels.int8_gemm()
    int8_op = gemv8 if next(iter(x.values())).shape[0] <= KERNEL_MAX_ROWS else gemm8
    unpack = torch.ops.effinfer_kernels.int4_dequantize
    return {
        "bf16": lambda: [F.linear(x[k], w["bf16"]) for layer in layers for k, w in layer],
        "int4 kernel": lambda: [mm(x[k], w["q"], w["records"], w["block"]) for layer in layers for k, w in layer],
        "int4 dequantize + bf16": lambda: [F.linear(x[k], unpack(w["q"], w["records"], w["block"], torch.bfloat16))
                                          for layer in layers for k, w in layer],
        "int8 kernel": lambda: [int8_op(x[k], w["q8"], w["scales"]) for layer in layers for k, w in layer],
        "int8 dequantize + bf16": lambda: [F.linear(x[k], w["q8"].to(torch.bfloat16) * w["scales"][:, None].bfloat16())
                                          for layer in layers for k, w in layer],
    }


def main() -> int:
    from effinfer.bench.provenance import add_allow_dirty_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,16,32,64,128,256,512")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--qkv", type=int, default=960, help="rows of the fused q/k/v projection")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--result-file", default=None)
    add_allow_dirty_arg(p)
    args = p.parse_args()
    from effinfer import kernels
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import keep_record

    if kernels.int4_mm() is None or kernels.int8_gemm() is None:
        sys.exit("effinfer's int4/int8 kernels are not available here (a C++ compiler and AVX512-VNNI are needed)")
    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h, i = args.hidden, args.intermediate
    shapes = [(args.qkv, h), (h, h), (2 * i, h), (h, i)]
    layers = []
    for _ in range(args.layers):
        layer = []
        for n, k in shapes:
            q8 = int8_weights(n, k)
            layer.append((k, {**int4_weights(n, k, 32), "q8": q8["q"], "scales": q8["scales"],
                              "bf16": torch.randn(n, k, dtype=torch.bfloat16)}))
        layers.append(layer)
    results = []
    for rows in map(int, args.rows.split(",")):
        x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (h, i)}
        contestants = ways(layers, x)
        times = {name: [] for name in contestants}
        for _ in range(args.rounds):
            for name, fn in contestants.items():
                times[name].append(timed(fn, args.repeats) * 1e3)
        row = {"rows": rows, **{f"{n}_ms": statistics.median(t) for n, t in times.items()}}
        results.append(row)
        print(f"{rows:>4} rows: " + "  ".join(f"{n} {row[f'{n}_ms']:7.2f}" for n in contestants) +
              f"  (ms per pass; int4 kernel {row['bf16_ms'] / row['int4 kernel_ms']:.2f}x bf16)", flush=True)
    keep_record(args.result_file, "many_rows", vars(args), {"rows": results}, provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
