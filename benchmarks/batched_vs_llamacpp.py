"""effinfer's batch sweep against llama.cpp's own batched benchmark on the same GGUF file, alternating round by
round (effinfer, llama.cpp, effinfer, ...) so that a shared machine's drifts hit both alike.

Per batch size B (B requests of --input-len prompt tokens, each to --output-len tokens, at once): output
tokens/s with prefill included and of decode alone. effinfer: `effinfer bench compare --workload sweep` with
the given configuration (the default: the file's own blocks). llama.cpp: `llama-batched-bench` (built by
`make peers`), whose S_TG is its decode rate and B x TG / T its output rate with
prefill. The record keeps every run and the median of each; `--plot` draws both as `bench compare`'s sweep.

    python benchmarks/batched_vs_llamacpp.py --rounds 2 --result-file benchmarks/results/batched_vs_llamacpp.json \
        --plot benchmarks/results/plots/batched_vs_llamacpp.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = "llama.cpp (llama-batched-bench)"


def effinfer_sweep(args, model: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "sweep.json"
        command = [sys.executable, "-m", "effinfer.cli", "bench", "compare", "--model", model, "--no-show-progress",
                   "--config", args.config, "--workload", "sweep", "--rounds", "1", "--batch-sizes", args.batch_sizes,
                   "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                   "--num-threads", str(args.threads), "--result-file", str(record)]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        metrics = json.loads(record.read_text())["metrics"]
    return next(iter(metrics.values()))


def llamacpp_sweep(args, model: str) -> dict:
    from effinfer.bench.llamacpp_tools import batched_bench

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    return batched_bench(Path(model), sizes, args.input_len, args.output_len, args.threads)


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from effinfer.bench.provenance import add_allow_dirty_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a catalog name or a GGUF file")
    p.add_argument("--config", default="name=default", help="effinfer's configuration, as `bench compare --config`")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of both")
    p.add_argument("--result-file", default=None)
    add_allow_dirty_arg(p)
    p.add_argument("--plot", default=None, metavar="PNG")
    args = p.parse_args()
    args.batch_sizes = ",".join(item.strip() for item in args.batch_sizes.split(",") if item.strip())
    from effinfer.bench.compare import parse_config
    from effinfer.bench import llamacpp_tools
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import keep_record
    from effinfer.bench.stats import ratio_interval
    from effinfer.loader import catalog

    llamacpp_tools.tool("llama-batched-bench")      # (says how to build it when it is missing)
    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    model = str(catalog.pull(args.model)) if args.model in catalog.CATALOG else args.model
    name = parse_config(args.config).name
    runs = {f"effinfer {name}": [], PEER: []}
    for round_index in range(args.rounds):
        for label, sweep in ((f"effinfer {name}", effinfer_sweep), (PEER, llamacpp_sweep)):
            runs[label].append(sweep(args, model))
            print(f"round {round_index + 1}, {label}: " + "  ".join(
                f"b{b} {runs[label][-1][f'b{b}_output_tok_s']:.1f}/{runs[label][-1][f'b{b}_decode_tok_s']:.1f}"
                for b in args.batch_sizes.split(",")) + "  (output/decode tokens/s)", flush=True)
    medians = {label: {k: statistics.median(r[k] for r in results) for k in results[0] if k.startswith("b")}
               for label, results in runs.items()}
    ours = medians[f"effinfer {name}"]
    ratios = {k: ours[k] / medians[PEER][k] for k in medians[PEER] if k in ours}
    intervals = {k: ratio_interval([r[k] for r in runs[f"effinfer {name}"]], [r[k] for r in runs[PEER]]).bounds()
                 for k in ratios}     # paired rounds: the ratio of means' 95% interval (None from one round)
    for b in args.batch_sizes.split(","):
        print(f"b{b}: output {ratios[f'b{b}_output_tok_s']:.2f}x, decode {ratios[f'b{b}_decode_tok_s']:.2f}x llama.cpp")
    result = {"workloads": ["sweep"], "metrics": medians, "ratios_to_peer": ratios, "ratio_ci95": intervals,
              "runs": runs, "llamacpp_build": llamacpp_tools.build()}
    if args.plot:
        from effinfer.bench.plots import plot_sweep

        print(plot_sweep(result, args.plot))
    keep_record(args.result_file, "batched_vs_llamacpp", vars(args), result, provenance, inputs={"model": model})
    return 0


if __name__ == "__main__":
    sys.exit(main())
