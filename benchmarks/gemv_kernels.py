"""effinfer's int8 and int4 CPU kernels against PyTorch's (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`),
side by side in one process.

The weights of a whole model's decoder (SmolLM2-135M's shapes by default: 30 layers of fused q/k/v, o,
gate/up and down) are separate tensors as in the engine, so each step streams them from memory as decode
does; the int8 output head is timed alone. Prints milliseconds per pass and effective GB/s (weights and
their scales) per row count, and what a plain read (a sum) of the same weights takes: the memory's pace.

    .venv/bin/python benchmarks/gemv_kernels.py [--bits 8|4] [--group-size 64] [--layers 30] [--hidden 576] ...
"""

from __future__ import annotations

import argparse
import time

import torch

from effinfer.kernels import int4_gemv, int4_layout, int8_gemv


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Seconds per call of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def int8_weights(n: int, k: int) -> dict:
    return {"q": torch.randint(-127, 128, (n, k), dtype=torch.int8), "scales": torch.rand(n)}


def int4_weights(n: int, k: int, group_size: int) -> dict:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, minimum = torch.rand(n, k // group_size) / 10, -torch.rand(n, k // group_size)
    packed, records, block = int4_layout.pack(q, scale, minimum, group_size)
    aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale, minimum + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16()
    return {"q": packed, "records": records, "block": block, "aten": aten, "scales_and_zeros": scales_and_zeros}


def kernels_for(bits: int, group_size: int) -> dict:
    """name -> (fn(x, weights), bytes a pass reads for these weights)"""
    if bits == 8:
        ours = int8_gemv()
        return {"aten": (lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w["q"], w["scales"].to(x.dtype)),
                         lambda w: w["q"].numel() + 2 * w["scales"].numel()),
                "effinfer": (lambda x, w: ours(x, w["q"], w["scales"]),
                             lambda w: w["q"].numel() + 4 * w["scales"].numel())} if ours else {}
    ours = int4_gemv()
    return {"aten": (lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w["aten"], group_size, w["scales_and_zeros"]),
                     lambda w: w["aten"].numel() + 2 * w["scales_and_zeros"].numel()),
            "effinfer": (lambda x, w: ours(x, w["q"], w["records"], w["block"]),
                         lambda w: w["q"].numel() + 2 * w["records"].numel())} if ours else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, choices=(8, 4), default=8)
    p.add_argument("--group-size", type=int, default=64, help="int4 only")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--qkv", type=int, default=960, help="rows of the fused q/k/v projection")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels = kernels_for(args.bits, args.group_size)
    if not kernels:
        raise SystemExit(f"effinfer's int{args.bits} kernel is not available here (see the warning above)")
    h, i = args.hidden, args.intermediate
    shapes = [(args.qkv, h), (h, h), (2 * i, h), (h, i)]
    make = int8_weights if args.bits == 8 else lambda n, k: int4_weights(n, k, args.group_size)
    layers = [[(k, make(n, k)) for n, k in shapes] for _ in range(args.layers)]
    head = int8_weights(args.vocab, h)
    head_kernel = kernels_for(8, 0)
    # what memory gives: the packed weights only read (summed as int64 words), per pass
    read = timed(lambda: [w["q"].view(torch.int64).sum() for layer in layers for _, w in layer], args.repeats)
    weight_bytes = sum(w["q"].numel() for layer in layers for _, w in layer)
    print(f"int{args.bits}, {args.layers} layers, {weight_bytes / 1e6:.0f} MB of packed weights, {args.threads} "
          f"threads; a plain read of them: {read * 1e3:.2f} ms, {weight_bytes / read / 1e9:.1f} GB/s")
    print(f"{'rows':>4} {'kernel':>9} {'layers ms':>10} {'GB/s':>6} {'head ms':>8} {'ratio':>6}")
    for rows in (1, 2, 4, 8, 16):
        x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (h, i)}
        results = {}
        for name, (kernel, nbytes) in kernels.items():
            step = timed(lambda: [kernel(x[k], w) for layer in layers for k, w in layer], args.repeats)
            head_s = timed(lambda: head_kernel[name][0](x[h], head), args.repeats)
            total_bytes = sum(nbytes(w) for layer in layers for _, w in layer)
            results[name] = step
            ratio = f"{results['aten'] / step:.2f}x" if name == "effinfer" else ""
            print(f"{rows:>4} {name:>9} {step * 1e3:>10.2f} {total_bytes / step / 1e9:>6.1f} {head_s * 1e3:>8.3f} {ratio:>6}")


if __name__ == "__main__":
    main()
