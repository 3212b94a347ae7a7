"""llama.cpp measured with its own instruments: `llama-bench` (prefill and decode tokens/s), `llama-batched-bench`
(many sequences at once) and `llama-quantize` (the same file in another of its formats), run as subprocesses on
the same GGUF file with the same thread count.

These are what a llama.cpp user would measure with; the Python binding (`system=llamacpp`) adds Python per token
and runs one sequence at a time. The tools are built from the llama.cpp source in the llama-cpp-python sdist by
`make peers` (`benchmarks/build_llamacpp.sh`); they are looked for in `$EFFINFER_LLAMACPP_BIN`, then in that
script's output folder, then on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from effinfer.bench.provenance import llamacpp_build

DEFAULT_BIN = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llamacpp-tools" / "llamacpp-build" / "bin"
TIMEOUT_S = 3600


def tool(name: str) -> Path:
    """The path of llama.cpp tool `name`, or FileNotFoundError saying how to build it."""
    folders = [os.environ.get("EFFINFER_LLAMACPP_BIN"), DEFAULT_BIN]
    for folder in filter(None, folders):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise FileNotFoundError(f"llama.cpp's {name} was not found (in $EFFINFER_LLAMACPP_BIN, {DEFAULT_BIN} or PATH); "
                            "build the peer's tools with `make peers` (~7 minutes on 2 cores)")


def available(*names: str) -> bool:
    try:
        for name in names:
            tool(name)
        return True
    except FileNotFoundError:
        return False


def build() -> str | None:
    """The tools' build (`0.5.0-dev (build 1, commit 0c1e570)`), for records."""
    return llamacpp_build(tool("llama-bench"))


def _run(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{Path(command[0]).name} failed (exit {out.returncode}): {tail}")
    return out.stdout


def llama_bench(model: Path, prompt_len: int, gen_len: int, repetitions: int, threads: int) -> dict:
    """pp{prompt_len} and tg{gen_len} tokens/s as `bench latency` names them, with llama-bench's own samples
    (one per repetition; it warms up first) summarised the same way: mean, std, 95% interval. llama-bench
    decodes from an empty context, effinfer's `bench latency` after a 16-token prompt: a few positions of
    attention apart, negligible beside the weights each token reads."""
    from effinfer.bench.offline import speed_stats

    rows = json.loads(_run([str(tool("llama-bench")), "-m", str(model), "-p", str(prompt_len), "-n", str(gen_len),
                            "-r", str(repetitions), "-t", str(threads), "-o", "json"]))
    out = {}
    for row in rows:
        name = f"pp{prompt_len}_tok_s" if row["n_prompt"] else f"tg{gen_len}_tok_s"
        out.update(speed_stats(name, [float(x) for x in row["samples_ts"]]))
    out["repetitions"] = repetitions
    return out


def batched_bench(model: Path, batch_sizes: list[int], input_len: int, output_len: int, threads: int) -> dict:
    """Per batch size B (B sequences of `input_len` prompt tokens, each to `output_len` tokens, at once), as the
    sweep names them: `b{B}_output_tok_s` (B x output_len over the whole run, prefill included) and
    `b{B}_decode_tok_s` (llama-batched-bench's S_TG, its decode alone)."""
    context = max(batch_sizes) * (input_len + output_len) + 256
    stdout = _run([str(tool("llama-batched-bench")), "-m", str(model), "-c", str(context), "-b", "2048", "-ub", "512",
                   "-npp", str(input_len), "-ntg", str(output_len), "-npl", ",".join(map(str, batch_sizes)),
                   "-t", str(threads), "--output-format", "jsonl"])
    metrics = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            metrics[f"b{row['pl']}_decode_tok_s"] = row["speed_tg"]
            metrics[f"b{row['pl']}_output_tok_s"] = row["pl"] * row["tg"] / row["t"]
    missing = [b for b in batch_sizes if f"b{b}_output_tok_s" not in metrics]
    if missing:
        raise RuntimeError(f"llama-batched-bench reported no result for batch size(s) {missing}")
    return metrics


def requantize(model: Path, quant: str, out_dir: Path, threads: int) -> Path:
    """The GGUF file in llama.cpp format `quant` (Q8_0, Q4_0, Q4_K_M, ...) by `llama-quantize`, made once."""
    out = Path(out_dir) / f"{model.stem}.requant-{quant.upper()}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        _run([str(tool("llama-quantize")), "--allow-requantize", str(model), str(partial), quant.upper(), str(threads)])
        partial.rename(out)
    return out
