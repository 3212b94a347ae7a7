"""What a user meets with `effinfer serve` and no flags, against the alternatives, side by side in one run:
start-up (process start to the first answered request, and to decode steps running compiled, which the
default server compiles in the background while it serves: with PyTorch's compile cache warm, and cold from
an empty one), memory (resident and proportional, after the served run), served single-stream speed once compiled (ShareGPT chat prompts from the
development range, `effinfer bench serve`), and the same configuration's in-process decode (`effinfer bench
latency` pp512/tg128, with `--compile` where the server compiles: its steady state). The peer a user would
pick runs beside it with its own instruments on the same GGUF file: `llama-server` (`--parallel 1`, served
through the same `effinfer bench serve`) and `llama-bench` (pp512/tg128), both built by
`make peers` (left out of the record when absent).

Each round starts every configuration's server afresh, in turn (A, B, C, A, B, C, ...), so drifts of a shared
machine hit all alike; the record keeps every run and the median of each configuration. The tree must be
clean (the record names the commit it measured).

    python benchmarks/serve_default.py --rounds 2 --result-file benchmarks/results/serve_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
EFFINFER = [sys.executable, "-m", "effinfer.cli"]
PEER = "llama.cpp llama-server / llama-bench (same file)"
CONFIGS = {
    "default": [],
    "default, cold compile cache": [],
    "eager (--no-compile)": ["--no-compile"],
    "bf16 (--quantization none)": ["--quantization", "none"],
    "default, engine on a thread (--no-engine-process)": ["--no-engine-process"],
}
COLD = "default, cold compile cache"
"""Runs with an empty inductor cache of their own (TORCHINDUCTOR_CACHE_DIR): a first start on a new machine."""
COMPILE_WAIT_S = 900


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=8, help="ShareGPT prompts per served run, one at a time")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (effinfer: PyTorch's default)")
    sys.path.insert(0, str(ROOT))
    from effinfer.bench import llamacpp_tools
    from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg

    add_allow_dirty_arg(parser)
    args = parser.parse_args()
    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    from effinfer.loader import catalog

    model_file = catalog.pull(catalog.DEFAULT_MODEL, show_progress=False)
    servers = {name: [*EFFINFER, "serve", *flags] for name, flags in CONFIGS.items()}
    if llamacpp_tools.available("llama-server"):
        servers[PEER] = [str(llamacpp_tools.tool("llama-server")), "-m", str(model_file), "-t", str(args.threads), "--parallel", "1"]
    runs = {name: [] for name in servers}
    for round_index in range(args.rounds):
        for name, command in servers.items():
            print(f"round {round_index + 1}/{args.rounds}: {name}", flush=True)
            runs[name].append(serve_run(command, args.num_prompts, args.output_len, cold=name == COLD))
    in_process = {name: latency_run(flags) for name, flags in CONFIGS.items()
                  if "--no-engine-process" not in flags and name != COLD}
    if llamacpp_tools.available("llama-bench"):
        in_process[PEER] = llamacpp_tools.llama_bench(model_file, 512, 128, 3, args.threads)
    summary = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if isinstance(rs[0][key], float)}
               for name, rs in runs.items()}
    record = {"benchmark": "serve_default", **provenance.environment(inputs={"model": model_file}),
              "llamacpp_build": llamacpp_tools.build() if llamacpp_tools.available("llama-bench") else None,
              "num_prompts": args.num_prompts, "output_len": args.output_len, "runs": runs, "median": summary,
              "in_process_latency": in_process}
    print_table(summary, in_process)
    Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result_file).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.result_file}")
    return 0


def serve_run(command: list[str], num_prompts: int, output_len: int, cold: bool = False) -> dict:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    inductor_cache = tempfile.TemporaryDirectory(prefix="inductor-cold-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache.name} if cold else None
    started = time.monotonic()
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        first_answer = wait_first_answer(base, server, started)
        summary = engine_summary(Path(log.name).read_text())
        compiled = wait_compiled(base, started, log.name) if "compiled in the background" in summary else None
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "serve.json"
            subprocess.run([*EFFINFER, "bench", "serve", "--base-url", base, "--workload", "sharegpt",
                            "--num-prompts", str(num_prompts), "--output-len", str(output_len), "--max-concurrency", "1",
                            "--result-file", str(result)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            served = json.loads(result.read_text())
        rss, pss = memory_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        os.unlink(log.name)
        inductor_cache.cleanup()
    return {"start_to_first_answer_s": first_answer, "start_to_compiled_s": compiled,
            "output_tok_s": float(served["output_throughput"]),
            "mean_ttft_ms": float(served["mean_ttft_ms"]), "mean_tpot_ms": float(served["mean_tpot_ms"]),
            "resident_mb": rss, "proportional_mb": pss, "engine": summary}


def wait_first_answer(base: str, server: subprocess.Popen, started: float) -> float:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}) before answering")
        try:
            if httpx.post(base + "/v1/chat/completions", json=body, timeout=60).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def wait_compiled(base: str, started: float, log: str) -> float:
    """Seconds from the server's start until its decode steps run compiled (`effinfer:decode_steps_compiled`)."""
    while time.monotonic() - started < COMPILE_WAIT_S:
        failed = [line for line in Path(log).read_text().splitlines() if "decode steps stay eager" in line]
        if failed:
            raise RuntimeError(f"the server's compile failed: {failed[0]}")
        metrics = httpx.get(base + "/metrics", timeout=30).text
        if any(line.startswith("effinfer:decode_steps_compiled{") and line.endswith(" 1.0") for line in metrics.splitlines()):
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"the decode steps were not compiled within {COMPILE_WAIT_S} s")


def memory_mb(pid: int) -> tuple[float, float]:
    """The server's memory, its own process and the engine core's together: resident (RSS: pages the two
    processes share, such as PyTorch's libraries in each, count twice) and proportional (PSS: each shared page
    split between its processes, so the sum is what the server holds)."""
    process = psutil.Process(pid)
    members = [process, *[c for c in process.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]]
    infos = [p.memory_full_info() for p in members]
    return sum(i.rss for i in infos) / 2**20, sum(i.pss for i in infos) / 2**20


def engine_summary(log: str) -> str:
    return next((line.removeprefix("engine: ") for line in log.splitlines() if line.startswith("engine: ")), "")


def latency_run(flags: list[str]) -> dict:
    """In-process decode of the configuration's steady state: compiled unless it says --no-compile (offline
    runs do not compile unless asked; the server does, in the background)."""
    flags = flags if "--no-compile" in flags else [*flags, "--compile"]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "latency.json"
        subprocess.run([*EFFINFER, "bench", "latency", "--repetitions", "3", "--result-file", str(result), *flags],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        record = json.loads(result.read_text())
    return {key: record[key] for key in ("pp512_tok_s", "tg128_tok_s")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(summary: dict, in_process: dict) -> None:
    print(f"\n{'configuration':<52}{'start s':>9}{'compiled s':>11}{'served tok/s':>14}{'TPOT ms':>9}{'RSS MB':>9}{'PSS MB':>9}"
          f"{'in-process tg128':>18}")
    print("(start: to the first answer; compiled: to decode steps running compiled; in-process: effinfer bench "
          "latency, or llama-bench for the peer)")
    for name, m in summary.items():
        tg = in_process.get(name, {}).get("tg128_tok_s")
        compiled = m.get("start_to_compiled_s")
        print(f"{name:<52}{m['start_to_first_answer_s']:>9.1f}{'-' if compiled is None else f'{compiled:.1f}':>11}"
              f"{m['output_tok_s']:>14.1f}{m['mean_tpot_ms']:>9.1f}{m['resident_mb']:>9.0f}{m['proportional_mb']:>9.0f}"
              f"{tg if tg is None else round(tg, 1)!s:>18}")


if __name__ == "__main__":
    sys.exit(main())
