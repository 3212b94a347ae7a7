"""Ablation for GPTQ and AWQ: a 4-bit checkpoint made with their group search alone (each group's scale
and minimum clipped and refitted for the calibration inputs' squared norms per channel), without GPTQ's
error feedback or AWQ's input scales. Measured beside them with `effinfer bench compare --workload quality`.

    python benchmarks/group_search_only.py --calib-text calib.txt --out ckpt/smollm2-search-g64 [--unweighted]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effinfer.compression.quant.calibrate import calibration_windows, collect_stats, decoder_linears
from effinfer.tools.quantize import _shard_tensors, _write_checkpoint
from effinfer.compression.quant.group_search import quantize_groups
from effinfer.llm import LLM
from effinfer.loader import catalog


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL)
    parser.add_argument("--calib-text", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--unweighted", action="store_true", help="search without the inputs' weights (data-free)")
    args = parser.parse_args()
    llm = LLM(args.model, dtype="float32", kv_cache_memory_gb=0.25, max_num_batched_tokens=512)
    windows = calibration_windows(llm.tokenizer, Path(args.calib_text).read_text(encoding="utf-8"), args.calib_tokens, 512)
    stats = collect_stats(llm.engine.model, windows, llm.score, keep_hessian=False)
    net, tensors = llm.engine.model, {}
    for name, linear in decoder_linears(net).items():
        importance = None if args.unweighted else stats[name].sq_sum
        tensors.update(_shard_tensors(net, name, quantize_groups(linear.weight.detach().float(), args.group_size, importance)))
    config = {"quant_method": "group-search", "load_as": "int4", "bits": 4, "group_size": args.group_size,
              "base_model": str(llm.engine.loaded.path), "weighted": not args.unweighted, "output_mse_sum": {}}
    print("saved", _write_checkpoint(args.out, tensors, config)["path"])


if __name__ == "__main__":
    main()
