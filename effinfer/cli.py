"""`effinfer models | pull | generate | chat`: the command line.

Engine flags come from the config dataclasses' field names (`--max-num-seqs`, `--dtype`, ...), so the
CLI and `LLM(**config)` always accept the same options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing

from effinfer.config import SUB_CONFIGS, EngineConfig, all_option_names, field_docs
from effinfer.loader import catalog
from effinfer.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effinfer", description="Efficient LLM inference in PyTorch.")
    sub = parser.add_subparsers(title="commands")
    p = sub.add_parser("models", help="list the catalog models and whether they are pulled")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("pull", help="fetch a catalog model into the cache")
    p.add_argument("name", nargs="?", default=catalog.DEFAULT_MODEL)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("generate", help="stream a completion for one prompt, then report speed")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (binds 127.0.0.1 unless told otherwise)")
    add_server_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("bench", help="measure: `effinfer bench serve` loads an OpenAI endpoint")
    bench = p.add_subparsers(title="benchmarks")
    b = bench.add_parser("serve", help="TTFT/TPOT/ITL/E2EL and throughput of any OpenAI-compatible endpoint")
    b.add_argument("--base-url", default="http://127.0.0.1:8000")
    b.add_argument("--model", default=None, help="model id to send (default: the endpoint's first)")
    b.add_argument("--tokenizer", default=catalog.DEFAULT_MODEL, help="model whose tokenizer builds the prompts")
    b.add_argument("--workload", default="random", choices=["random", "shared-prefix", "long-context"])
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: 128, long-context 4000)")
    b.add_argument("--output-len", type=int, default=64)
    b.add_argument("--range-ratio", type=float, default=0.0)
    b.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    b.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1.0 = Poisson")
    b.add_argument("--max-concurrency", type=int, default=None)
    b.add_argument("--goodput", nargs="*", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:100")
    b.add_argument("--api-key", default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--label", default=None, help="name of the system under test in reports (default: the URL)")
    b.add_argument("--result-file", default="bench-serve.json")
    b.set_defaults(func=cmd_bench_serve)
    b = bench.add_parser("plot", help="PNG charts from `bench serve` JSON records")
    b.add_argument("records", nargs="+")
    b.add_argument("--out-dir", default="bench-plots")
    b.set_defaults(func=cmd_bench_plot)
    b = bench.add_parser("latency", help="llama-bench style: prefill (pp) and decode (tg) tokens/s, bandwidth")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--repetitions", type=int, default=5)
    b.add_argument("--bench-seed", type=int, default=0)
    b.add_argument("--result-file", default="bench-latency.json")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench_latency)
    b = bench.add_parser("quality", help="perplexity on a text; KL divergence and greedy agreement vs a reference")
    b.add_argument("--text", required=True, help="a UTF-8 text file")
    b.add_argument("--window", type=int, default=512)
    b.add_argument("--stride", type=int, default=256)
    b.add_argument("--max-text-tokens", type=int, default=8192, help="score at most this many tokens of the text")
    b.add_argument("--reference-model", default=None, help="reference for KL/agreement (default: --model)")
    b.add_argument("--reference-dtype", default=None, help="e.g. float32; a reference runs when either is given")
    b.add_argument("--result-file", default="bench-quality.json")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench_quality)
    b = bench.add_parser("compare", help="several configurations, interleaved, as ratios to the first")
    b.add_argument("--config", action="append", required=True, dest="configs", metavar="KEY=VALUE,...",
                   help="one configuration, e.g. name=fp32,dtype=float32 (repeat; the first is the baseline)")
    b.add_argument("--workload", choices=["latency", "throughput"], default="throughput")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--bench-seed", type=int, default=0)
    b.add_argument("--result-file", default="bench-compare.json")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench_compare)
    b = bench.add_parser("throughput", help="offline: a request set through the in-process engine")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--range-ratio", type=float, default=0.0)
    b.add_argument("--bench-seed", type=int, default=0)
    b.add_argument("--result-file", default="bench-throughput.json")
    add_engine_args(b)
    b.set_defaults(func=cmd_bench_throughput)
    p = sub.add_parser("chat", help="interactive chat with history (empty line or Ctrl-D to quit)")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, max_tokens=512, temperature=0.7)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)
    return parser


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128, temperature: float = 0.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def sampling_params_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per config field, named after it (`max_num_seqs` -> `--max-num-seqs`)."""
    for group_name, cls in {**SUB_CONFIGS, "engine": EngineConfig}.items():
        g = p.add_argument_group(f"engine: {group_name}")
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in SUB_CONFIGS and cls is EngineConfig:
                continue
            flag, kind, doc = "--" + f.name.replace("_", "-"), _arg_type(hints[f.name]), docs.get(f.name)
            if kind is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
            else:
                g.add_argument(flag, type=kind, default=f.default, dest=f.name, help=doc)


def add_server_args(p: argparse.ArgumentParser) -> None:
    from effinfer.serving.api_server import ServerConfig

    g = p.add_argument_group("server")
    for f in dataclasses.fields(ServerConfig):
        if f.name == "api_keys":
            g.add_argument("--api-key", action="append", dest="api_keys", default=[],
                           help="accepted bearer token (repeat for several); none means no authentication")
        else:
            g.add_argument("--" + f.name.replace("_", "-"), type=_arg_type(typing.get_type_hints(ServerConfig)[f.name]),
                           default=f.default, dest=f.name, help=field_docs(ServerConfig).get(f.name))


def _arg_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in all_option_names()}


def make_llm(args: argparse.Namespace):
    from effinfer.llm import LLM

    EngineConfig.from_kwargs(**engine_kwargs(args))  # validate flags before the model loads
    return LLM(**engine_kwargs(args))


def cmd_models(args: argparse.Namespace) -> int:
    for entry in catalog.CATALOG.values():
        mark = "pulled" if catalog.is_pulled(entry.name, args.cache_dir) else "-"
        default = " (default)" if entry.name == catalog.DEFAULT_MODEL else ""
        print(f"{entry.name:<30} {entry.size / 1e6:>8.1f} MB  {mark:<7} {entry.description}{default}")
    print(f"\ncache: {catalog.cache_dir(args.cache_dir)}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    print(catalog.pull(args.name, args.cache_dir))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from(args)
    llm = make_llm(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    start = time.perf_counter()
    first = last = None
    for out in llm.stream(prompt, params):
        now = time.perf_counter()
        first = first or now
        last = now
        print(out.new_text, end="", flush=True)
    print()
    report_speed(len(out.prompt_token_ids), len(out.token_ids), first - start, last - first)
    return 0


def report_speed(num_prompt: int, num_output: int, ttft: float, decode_time: float) -> None:
    decode_rate = (num_output - 1) / decode_time if num_output > 1 and decode_time > 0 else float("nan")
    print(f"\nprompt tokens: {num_prompt}  output tokens: {num_output}  "
          f"time to first token: {ttft * 1000:.0f} ms  decode: {decode_rate:.1f} tokens/s", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from effinfer.serving.api_server import ServerConfig, build_app

    server_config = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    llm = make_llm(args)
    app = build_app(llm.engine, server_config)
    name = app.state.server.model_name
    base = f"http://{server_config.host}:{server_config.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if server_config.api_keys else ""
    print(f"\neffinfer serving {name!r} at {base}  (chat page: {base}/ , metrics: {base}/metrics)\n"
          f"try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n",
          flush=True)
    uvicorn.run(app, host=server_config.host, port=server_config.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from effinfer.bench.metrics import summarize
    from effinfer.bench.report import print_serve_table, write_record
    from effinfer.bench.serve import ServeConfig, run_serve_benchmark
    from effinfer.bench.workloads import WORKLOADS, random_requests
    from effinfer.models import load_tokenizer

    slos = dict(_parse_slo(item) for item in args.goodput)
    shape = {"input_len": 128, **WORKLOADS[args.workload]}
    if args.input_len is not None:
        shape["input_len"] = args.input_len
    tokenizer = load_tokenizer(args.tokenizer)
    requests = random_requests(tokenizer, args.num_prompts, output_len=args.output_len, seed=args.seed,
                               range_ratio=args.range_ratio, **shape)
    cfg = ServeConfig(args.base_url, args.model, args.request_rate, args.burstiness, args.max_concurrency,
                      args.api_key, args.seed)
    results, duration = asyncio.run(run_serve_benchmark(requests, cfg))
    metrics = summarize(results, duration, slos)
    config = {**vars(args), "func": None, "workload_shape": shape, "slos_ms": slos}
    write_record(args.result_file, "serve", config, metrics)
    print_serve_table(metrics)
    print(f"\nJSON record: {args.result_file}")
    return 0 if metrics["completed"] else 1


def cmd_bench_plot(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from effinfer.bench.plots import plot_serve

    records = [json.loads(Path(p).read_text()) for p in args.records]
    not_serve = [p for p, r in zip(args.records, records) if r.get("benchmark") != "serve"]
    if not_serve:
        raise ValueError(f"not `bench serve` records: {', '.join(not_serve)}")
    for path in plot_serve(records, args.out_dir):
        print(path)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from effinfer.bench.offline import run_latency

    llm = make_llm(args)
    metrics = run_latency(llm, args.prompt_len, args.gen_len, args.repetitions, args.bench_seed)
    _finish_offline_bench(args, llm, "latency", metrics)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from effinfer.bench.offline import run_throughput
    from effinfer.bench.workloads import random_requests

    llm = make_llm(args)
    requests = random_requests(llm.tokenizer, args.num_prompts, args.input_len, args.output_len, args.bench_seed,
                               args.range_ratio, as_text=False)
    _finish_offline_bench(args, llm, "throughput", run_throughput(llm, requests))
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effinfer.bench import quality
    from effinfer.llm import LLM

    text = Path(args.text).read_text(encoding="utf-8")
    llm = make_llm(args)
    wins = quality.windows(llm.tokenizer.encode(text), args.window, args.stride, args.max_text_tokens)
    metrics = quality.perplexity(llm, wins)
    if args.reference_model or args.reference_dtype:
        ref_kwargs = {**engine_kwargs(args), "model": args.reference_model or args.model,
                      "dtype": args.reference_dtype or args.dtype}
        reference = LLM(**ref_kwargs)
        metrics["reference"] = {"model": ref_kwargs["model"], "dtype": ref_kwargs["dtype"],
                                **quality.perplexity(reference, wins)}
        metrics.update(quality.divergence(reference, llm, wins))
    _finish_offline_bench(args, llm, "quality", metrics)
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from effinfer.bench.compare import parse_config, run_compare
    from effinfer.bench.report import write_record
    from effinfer.llm import LLM

    configs = [parse_config(text) for text in args.configs]
    if len({c.name for c in configs}) != len(configs):
        raise ValueError("configuration names must differ (set name=... in each --config)")
    base = engine_kwargs(args)
    for c in configs:  # validate every configuration before any model loads
        EngineConfig.from_kwargs(**{**base, **c.options})
    result = run_compare(configs, lambda options: LLM(**{**base, **options}), args.workload, args.rounds, args)
    bench_args = {k: v for k, v in vars(args).items() if k not in all_option_names() and k != "func"}
    write_record(args.result_file, "compare", {"bench": bench_args}, result)
    names = [c.name for c in configs]
    print(f"{'metric':<28}" + "".join(f"{n[:18]:>20}" for n in names))
    for key in result["metrics"][names[0]]:
        cells = [f"{result['metrics'][n][key]:.4g} ({result['ratios'][n].get(key, float('nan')):.2f}x)" for n in names]
        print(f"{key:<28}" + "".join(f"{cell:>20}" for cell in cells))
    print(f"\nJSON record: {args.result_file}")
    return 0


def _finish_offline_bench(args, llm, kind: str, metrics: dict) -> None:
    from effinfer.bench.report import write_record

    bench_args = {k: v for k, v in vars(args).items() if k not in all_option_names() and k != "func"}
    write_record(args.result_file, kind, {"bench": bench_args, "engine": llm.config.to_dict()}, metrics)
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.5g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"\nJSON record: {args.result_file}")


def _parse_slo(item: str) -> tuple[str, float]:
    name, _, value = item.partition(":")
    try:
        return name, float(value)
    except ValueError:
        raise ValueError(f"--goodput expects METRIC:MILLISECONDS (e.g. ttft:500), got {item!r}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params_from(args)
    llm = make_llm(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("effinfer chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            message = input("\n> ").strip()
        except EOFError:
            return 0
        if not message:
            return 0
        history.append({"role": "user", "content": message})
        reply = ""
        for out in llm.stream(history, params):
            print(out.new_text, end="", flush=True)
            reply = out.text
        print()
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
