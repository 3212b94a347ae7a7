"""llama.cpp timed by its own tools (llama-bench, llama-batched-bench, llama-quantize) beside effinfer.

`make test` builds the tools first (`make test-peers`); the tests that run them are skipped only where that
build did not happen (running pytest by hand on a machine without them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from effinfer.bench import llamacpp_tools
from effinfer.bench.offline import run_throughput
from effinfer.bench.provenance import file_sha256
from effinfer.bench.systems import make_system
from effinfer.bench.workloads import BenchRequest

TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
needs_tools = pytest.mark.skipif(not llamacpp_tools.available(*TOOLS),
                                 reason="llama.cpp's tools are not built (`make test-peers`; `make test` builds them)")


def test_a_missing_tool_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFINFER_LLAMACPP_BIN", str(tmp_path))
    monkeypatch.setattr(llamacpp_tools, "DEFAULT_BIN", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make peers"):
        llamacpp_tools.tool("llama-bench")
    assert not llamacpp_tools.available("llama-bench")


@needs_tools
def test_bench_latency_runs_llama_bench(smollm2_path, tmp_path):
    out = tmp_path / "latency.json"
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "latency", "--system", "llamacpp-native",
                             "--model", str(smollm2_path), "--prompt-len", "32", "--gen-len", "8", "--repetitions", "2",
                             "--num-threads", "2", "--result-file", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["pp32_tok_s"] > 0 and record["tg8_tok_s"] > 0 and record["repetitions"] == 2
    assert len(record["tg8_tok_s_ci95"]) == 2                 # from llama-bench's own per-repetition samples
    assert record["config"]["llamacpp_build"] and record["config"]["n_threads"] == 2
    assert record["inputs"]["model"]["sha256"] == file_sha256(smollm2_path)


@needs_tools
def test_compare_runs_effinfer_and_the_native_peer_on_the_same_shapes(smollm2_path, tmp_path):
    out = tmp_path / "compare.json"
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "compare", "--model", str(smollm2_path),
                             "--config", "name=effinfer", "--config", "name=llama.cpp,system=llamacpp-native",
                             "--workload", "sweep,throughput", "--batch-sizes", "1,2", "--input-len", "16",
                             "--output-len", "4", "--num-prompts", "3", "--rounds", "2", "--num-threads", "2",
                             "--no-show-progress", "--result-file", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    peer = record["metrics"]["llama.cpp"]
    assert peer["b2_decode_tok_s"] > 0 and peer["output_throughput"] > 0
    assert set(record["ratio_ci95"]["llama.cpp"]) >= {"b1_output_tok_s", "b2_output_tok_s", "output_throughput"}
    assert "[" in result.stdout and "x [" in result.stdout          # the table prints the ratios' intervals


@needs_tools
def test_native_peer_requantizes_with_llama_quantize_and_refuses_scoring(smollm2_path, tmp_path):
    system = make_system({"system": "llamacpp-native", "quant": "Q8_0"},
                         {"model": str(smollm2_path), "cache_dir": str(tmp_path), "num_threads": 2})
    assert system.path != smollm2_path and system.path.read_bytes()[:4] == b"GGUF"
    assert system.path.stat().st_size > smollm2_path.stat().st_size          # 8-bit blocks are larger than Q4_1
    assert system.describe()["quant"] == "Q8_0" and system.input_files()["requantized_model"] == system.path
    with pytest.raises(ValueError, match="system=llamacpp"):
        system.score([1, 2, 3])
    with pytest.raises(ValueError, match="--range-ratio 0"):
        run_throughput(system, [BenchRequest("a", 4, 2), BenchRequest("b", 5, 2)])
