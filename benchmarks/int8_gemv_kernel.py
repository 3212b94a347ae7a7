"""effinfer's int8 CPU kernel against PyTorch's `_weight_int8pack_mm`, side by side in one process.

The weights of a whole model's decoder (SmolLM2-135M's shapes by default: 30 layers of fused q/k/v, o,
gate/up and down) are separate tensors as in the engine, so each step streams them from memory as decode
does; the output head is timed alone. Prints milliseconds per pass and effective GB/s per row count, and
what a plain read (a sum) of the same tensors takes: the memory's pace.

    .venv/bin/python benchmarks/int8_gemv_kernel.py [--layers 30] [--hidden 576] [--intermediate 1536]
"""

from __future__ import annotations

import argparse
import time

import torch

from effinfer.kernels import int8_gemv


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--qkv", type=int, default=960, help="rows of the fused q/k/v projection")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours = int8_gemv()
    if ours is None:
        raise SystemExit("effinfer's int8 kernel is not available here (see the warning above)")
    h, i = args.hidden, args.intermediate
    shapes = [(args.qkv, h), (h, h), (2 * i, h), (h, i)]
    layers = [[(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)) for n, k in shapes]
              for _ in range(args.layers)]
    nbytes = sum(w.numel() for layer in layers for w, _ in layer)
    head = torch.randint(-127, 128, (args.vocab, h), dtype=torch.int8), torch.rand(args.vocab)
    kernels = {"aten": lambda x, w, s: torch.ops.aten._weight_int8pack_mm(x, w, s.to(x.dtype)),
               "effinfer": lambda x, w, s: ours(x, w, s)}
    # what memory gives: the same tensors only read (summed as int64 words), per pass
    read = timed(lambda: [w.view(torch.int64).sum() for layer in layers for w, _ in layer], args.repeats)
    print(f"{args.layers} layers, {nbytes / 1e6:.0f} MB of int8 weights, {args.threads} threads; "
          f"isa {torch.ops.effinfer_kernels.gemv_isa()}; a plain read of them: {read * 1e3:.2f} ms, "
          f"{nbytes / read / 1e9:.1f} GB/s")
    print(f"{'rows':>4} {'kernel':>9} {'layers ms':>10} {'GB/s':>6} {'head ms':>8} {'ratio':>6}")
    for rows in (1, 2, 4, 8, 16):
        x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (h, i)}
        results = {}
        for name, kernel in kernels.items():
            step = timed(lambda: [kernel(x[w.shape[1]], w, s) for layer in layers for w, s in layer], args.repeats)
            head_s = timed(lambda: kernel(x[h], *head), args.repeats)
            results[name] = step
            ratio = f"{results['aten'] / step:.2f}x" if name == "effinfer" else ""
            print(f"{rows:>4} {name:>9} {step * 1e3:>10.2f} {nbytes / step / 1e9:>6.1f} {head_s * 1e3:>8.3f} {ratio:>6}")


if __name__ == "__main__":
    main()
