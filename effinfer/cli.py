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

from effinfer.cli_args import (LazyChoices, add_config_file_arg, add_engine_args, add_sampling_args, arg_type,
                               engine_kwargs, given_flags, make_llm, sampling_params_from)
from effinfer.compression.prune import PRUNE_METHODS
from effinfer.config import EngineConfig, field_docs
from effinfer.loader import catalog
from effinfer.loader.checkpoint import LOAD_AS
from effinfer.utils import log_to_stderr


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.given_flags = given_flags(argv)      # for --config: a flag on the command line wins over the file
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:          # a text or corpus path that is not there
        print(f"error: {exc.strerror}: {exc.filename}" if exc.filename else f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    from effinfer.bench.cli import add_bench_parser

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
    add_config_file_arg(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (binds 127.0.0.1 unless told otherwise)")
    add_server_args(p)
    add_config_file_arg(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("tune", help="search the configurations for the fastest within a quality bound; writes a "
                                    "config file for `serve --config`, a report and a Pareto plot")
    add_tune_args(p)
    p.set_defaults(func=cmd_tune)
    add_bench_parser(sub)
    p = sub.add_parser("quantize", help="calibrated checkpoint (GPTQ, AWQ 4-bit; SmoothQuant W8A8), saved to a folder that loads as a model")
    p.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL)
    p.add_argument("--method", choices=list(LOAD_AS), required=True)
    p.add_argument("--out", required=True, help="output folder (pass it as --model to use it)")
    p.add_argument("--calib-text", required=True, help="a UTF-8 text file to calibrate on")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (in windows)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128])
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize salient columns first")
    p.add_argument("--one-pass", action="store_true",
                   help="GPTQ: every layer's Hessian from the float model in one pass (default: layer by layer, "
                        "each from inputs through the layers already quantized)")
    p.add_argument("--damp", type=float, default=None,
                   help="GPTQ: fraction of the Hessian's mean diagonal added to it (default 0.1; more: less fit "
                        "to the calibration text)")
    p.add_argument("--gptq-groups", choices=LazyChoices(_group_fit_names), default=None, metavar="FIT",
                   help="GPTQ: each group's scale and minimum searched (clipping, weighted by the Hessian's "
                        "diagonal), from its range, or (mixed, the default) searched where that at least halves "
                        "the group's rounding error")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("prune", help="prune a model (magnitude, wanda, 2:4) and save it as a checkpoint folder")
    p.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL)
    p.add_argument("--method", choices=[m.name for m in PRUNE_METHODS.values() if not m.structured], required=True,
                   help="unstructured methods (structured ones, layers and mlp_channels, apply at load: --prune)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calib-text", default=None, help="a UTF-8 text file (wanda, 2:4)")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("distill", help="train a shallow student of a model on its own outputs (a draft model for speculative decoding)")
    p.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL, help="the teacher")
    p.add_argument("--text", required=True, help="a UTF-8 development corpus to distill on")
    p.add_argument("--out", required=True, help="output folder (use it as --speculative-model)")
    p.add_argument("--num-layers", type=int, default=6, help="student depth (teacher layers, evenly spaced)")
    p.add_argument("--layers", default=None, help="explicit teacher layers to keep, e.g. 0,5,10,15,20,29")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--save-every", type=int, default=50, help="write the student folder every N steps")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("exit-heads", help="train early-exit heads of a model on its own outputs (use with --early-exit-heads)")
    p.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL)
    p.add_argument("--text", required=True, help="a UTF-8 development corpus to train on")
    p.add_argument("--out", required=True, help="output .safetensors file (a .json report is written beside it)")
    p.add_argument("--layers", default=None, help="exit after these layers, e.g. 14,21 (default: 1/2 and 3/4 of the depth)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_exit_heads)
    p = sub.add_parser("chat", help="interactive chat with history (empty line or Ctrl-D to quit)")
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, max_tokens=512, temperature=0.7)
    add_config_file_arg(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)
    return parser


def add_server_args(p: argparse.ArgumentParser) -> None:
    from effinfer.serving.api_server import ServerConfig
    from effinfer.serving.async_engine import ON_ENGINE_FAILURE
    from effinfer.serving.replicas import ROUTING

    g = p.add_argument_group("server")
    hints, docs = typing.get_type_hints(ServerConfig), field_docs(ServerConfig)
    choices = {"on_engine_failure": ON_ENGINE_FAILURE, "routing": ROUTING}
    for f in dataclasses.fields(ServerConfig):
        if f.name == "api_keys":
            g.add_argument("--api-key", action="append", dest="api_keys", default=[],
                           help=f"{docs['api_keys']} Repeat --api-key for several.")
        elif hints[f.name] is bool:
            g.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default,
                           dest=f.name, help=docs.get(f.name))
        elif f.name in choices:
            g.add_argument("--" + f.name.replace("_", "-"), choices=choices[f.name], default=f.default, dest=f.name,
                           help=docs.get(f.name))
        else:
            g.add_argument("--" + f.name.replace("_", "-"), type=arg_type(hints[f.name]), default=f.default,
                           dest=f.name, help=docs.get(f.name))


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effinfer.compression.quant.gptq import GPTQOptions
    from effinfer.tools.quantize import quantize_calibrated

    text = Path(args.calib_text).read_text(encoding="utf-8")
    chosen = {"damp": args.damp, "groups": args.gptq_groups}
    gptq = GPTQOptions(args.act_order, not args.one_pass, **{k: v for k, v in chosen.items() if v is not None})
    report = quantize_calibrated(args.model, args.method, args.out, text, args.calib_tokens, args.window,
                                 args.group_size, gptq, args.cache_dir)
    errors = report["output_mse_sum"]
    print(f"{args.method}: {report['calibration']['windows']} windows, {report['seconds']:.0f} s")
    if errors:
        print(f"layer output MSE summed over layers: {errors[args.method]:.4g} (round-to-nearest: {errors['rtn']:.4g})")
    print(f"saved {report['path']}; use it with --model {report['path']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from effinfer.llm import LLM
    from effinfer.tools.quantize import save_pruned

    llm = LLM(args.model, dtype="float32", cache_dir=args.cache_dir, kv_cache_memory_gb=0.1, prune=args.method,
              sparsity=args.sparsity, prune_calibration_text=args.calib_text)
    saved = save_pruned(llm, args.out, llm.prune_report)
    print(f"{args.method}: {saved['prune']['sparsity']:.1%} of the decoder's weights are zero; saved {saved['path']}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effinfer.tools.distill import DistillConfig, distill

    cfg = DistillConfig(num_layers=args.num_layers, layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, save_every=args.save_every)
    report = distill(args.model, Path(args.text).read_text(encoding="utf-8"), args.out, cfg, args.cache_dir)
    before, after = report["held_out_before"], report["held_out_after"]
    print(f"student of layers {report['teacher_layers']}: held-out KL {before['kl']} -> {after['kl']}, "
          f"top-1 agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%} ({report['seconds']:.0f} s)")
    print(f"saved {report['path']}; use it with --speculative-method draft_model --speculative-model {report['path']}")
    return 0


def cmd_exit_heads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effinfer.tools.distill import ExitHeadsConfig, distill_exit_heads

    cfg = ExitHeadsConfig(layers=args.layers, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr)
    report = distill_exit_heads(args.model, Path(args.text).read_text(encoding="utf-8"), args.out, cfg, args.cache_dir)
    for layer in report["exit_layers"]:
        before, after = report["held_out_before"][f"layer_{layer}"], report["held_out_after"][f"layer_{layer}"]
        print(f"exit after layer {layer}: held-out KL {before['kl']} -> {after['kl']}, "
              f"top-1 agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}")
    for key, row in report["held_out_after"].items():
        if key.startswith("threshold_"):
            print(f"  confidence > {key.split('_')[1]}: {row['exit_rate']:.1%} of tokens exit, "
                  f"{row['agreement_of_exits'] or 0:.1%} of them agree, {row['layers_skipped']:.1%} of layers skipped")
    print(f"saved {report['path']} ({report['seconds']:.0f} s); serve with --early-exit-heads {report['path']}")
    return 0


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


def _group_fit_names() -> list[str]:
    from effinfer.compression.quant.group_search import GROUP_FITS

    return list(GROUP_FITS)


def add_tune_args(p: argparse.ArgumentParser) -> None:
    from effinfer.bench.provenance import add_allow_dirty_arg

    p.add_argument("model", nargs="?", default=catalog.DEFAULT_MODEL)
    p.add_argument("--text", required=True, help="a UTF-8 text: the quality bound is KL vs bf16 on its first tokens")
    p.add_argument("--workload", default="latency", choices=["latency", "throughput"],
                   help="latency: one request at a time (prompt + decode time); throughput: a batch (output tokens/s)")
    p.add_argument("--max-kl", type=float, default=0.01, help="quality bound: mean KL divergence vs bf16 per token")
    p.add_argument("--quality-tokens", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=512, help="latency: prompt tokens")
    p.add_argument("--gen-len", type=int, default=128, help="latency: generated tokens")
    p.add_argument("--num-prompts", type=int, default=32, help="throughput: requests at once")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--finalists", type=int, default=2, help="eager formats carried into the interleaved final")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the final")
    p.add_argument("--no-compile-candidates", dest="compile", action="store_false",
                   help="do not try compiled steps (each takes minutes on a cold compile cache)")
    p.add_argument("--time-budget", type=float, default=1800.0, metavar="SECONDS")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="tuned.json", help="the winner's engine options (`effinfer serve --config`)")
    p.add_argument("--report", default="tune-report.json", help="every candidate, measured or dropped, and why")
    p.add_argument("--plot", default="tune-pareto.png", help="speed against KL (PNG)")
    add_allow_dirty_arg(p)


def cmd_tune(args: argparse.Namespace) -> int:
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import write_record
    from effinfer.tools.tune import Tuner, TuneSettings, pareto_plot, write_config

    run = RunProvenance.begin(args.report, args.allow_dirty)
    base = {k: v for k, v in {"num_threads": args.num_threads, "cache_dir": args.cache_dir, "show_progress": False}.items()
            if v is not None}
    settings = TuneSettings(args.model, args.text, args.workload, args.max_kl, args.quality_tokens, args.prompt_len,
                            args.gen_len, args.num_prompts, args.input_len, args.output_len, args.finalists,
                            args.rounds, args.compile, args.time_budget, base)
    log_to_stderr()
    tuner = Tuner(settings)
    result = tuner.run()
    config = {k: v for k, v in vars(args).items() if k not in ("func", "allow_dirty", "given_flags")}
    write_record(args.report, "tune", config, result, run, inputs={"text": args.text, **tuner.model_files})
    if result["best"] is None:
        print(f"error: no configuration met the quality bound and ran (every candidate and why: {args.report}); "
              "raise --max-kl or the time budget", file=sys.stderr)
        return 1
    write_config(result["best_options"], args.out)
    print(f"best: {result['best']} -> {args.out}  (report {args.report}, plot {pareto_plot(result, args.plot)})")
    versus = result.get("best_vs_runner_up")
    if versus:
        print(f"  against the runner-up ({versus['runner_up']}): {versus['ratio']:.2f}x"
              + (f" [{versus['ci95'][0]:.2f}, {versus['ci95'][1]:.2f}]" if versus["ci95"] else "")
              + (": a tie within the interval" if versus["tie"] else ""))
    for row in result["candidates"]:
        ratio = row.get("speedup_vs_default")
        note = f"{ratio['ratio']:.2f}x the default" + (f" [{ratio['ci95'][0]:.2f}, {ratio['ci95'][1]:.2f}]"
                                                       if ratio["ci95"] else "") if ratio else row["dropped"]
        kl = f"KL {row['kl']:.4f}" if row["kl"] is not None else "KL -"
        print(f"  {row['name'][:60]:<60} {kl:<12} {note}")
    print(f"serve it: effinfer serve --config {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from effinfer.serving.api_server import ServerConfig, build_app

    server_config = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    log_to_stderr()
    if not server_config.engine_process:
        from effinfer.build import build_engine

        engine = build_engine(EngineConfig.from_kwargs(**engine_kwargs(args)), serving=True)
        return _serve(build_app(engine, server_config), server_config)
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    if server_config.replicas > 1 or server_config.ray_address:
        from effinfer.serving.replicas import ReplicaSet

        engine = ReplicaSet(config, server_config.replicas, server_config.routing, server_config.ray_address,
                            stall_timeout=server_config.engine_stall_timeout)
    else:
        from effinfer.serving.engine_core import ProcessEngine

        engine = ProcessEngine(config, stall_timeout=server_config.engine_stall_timeout,
                               on_failure=server_config.on_engine_failure)
    try:
        engine.start()
        return _serve(build_app(engine, server_config), server_config)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.stop()


def _serve(app, server_config) -> int:
    from effinfer.serving.api_server import DrainingServer

    name, info = app.state.server.model_name, app.state.server.async_engine.info
    base = f"http://{server_config.host}:{server_config.port}"
    auth = ' -H "Authorization: Bearer $KEY"' if server_config.api_keys else ""
    if info.summary:
        print(f"engine: {info.summary}", flush=True)
    print(f"\neffinfer serving {name!r} at {base}  (chat page: {base}/ , metrics: {base}/metrics)\n"
          f"try:\n  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n",
          flush=True)
    return DrainingServer(app, server_config).run()


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
