"""Serving-metric arithmetic on synthetic timings (the definitions of `vllm bench serve`)."""

from __future__ import annotations

import numpy as np
import pytest

from effinfer.bench.metrics import RequestResult, summarize
from effinfer.bench.provenance import file_sha256, git_state
from effinfer.bench.serve import arrival_delays


def results():
    # request A: first token at 100 ms, 5 tokens in 4 more chunks 10 ms apart -> E2EL 140 ms, TPOT 10 ms
    a = RequestResult(True, prompt_len=10, output_len=5, ttft=0.100, latency=0.140, itl=[0.01] * 4)
    # request B: first token at 300 ms; 3 tokens but only 2 chunks (one chunk carried 2 tokens)
    b = RequestResult(True, prompt_len=20, output_len=3, ttft=0.300, latency=0.400, itl=[0.100])
    failed = RequestResult(False, prompt_len=99, error="HTTP 503")
    return [a, b, failed]


def test_counts_and_throughputs():
    m = summarize(results(), duration=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, ["HTTP 503"])
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 4.0 and m["total_token_throughput"] == 19.0


def test_latency_statistics_in_ms():
    m = summarize(results(), duration=2.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile([100, 300], 99))
    assert m["mean_e2el_ms"] == pytest.approx(270.0)


def test_tpot_is_per_request_and_itl_is_per_chunk():
    m = summarize(results(), duration=2.0)
    # TPOT: A (140-100)/4 = 10 ms, B (400-300)/2 = 50 ms; ITL pools the five gaps 10,10,10,10,100 ms
    assert m["mean_tpot_ms"] == pytest.approx(30.0)
    assert m["mean_itl_ms"] == pytest.approx(28.0) and m["median_itl_ms"] == pytest.approx(10.0)


def test_goodput_counts_requests_meeting_every_slo():
    assert summarize(results(), 2.0, {"ttft": 200})["goodput"] == 0.5
    assert summarize(results(), 2.0, {"ttft": 500, "tpot": 20})["goodput"] == 0.5
    assert summarize(results(), 2.0, {"e2el": 1000})["goodput"] == 1.0
    with pytest.raises(ValueError, match="unknown SLO"):
        summarize(results(), 2.0, {"latency": 1})


def test_arrivals_poisson_mean_and_all_at_once():
    gaps = arrival_delays(4000, rate=20.0, burstiness=1.0, seed=0)
    assert np.mean(gaps) == pytest.approx(0.05, rel=0.05)
    assert np.std(gaps) == pytest.approx(0.05, rel=0.1)            # exponential: std = mean
    bursty = arrival_delays(4000, rate=20.0, burstiness=0.25, seed=0)
    assert np.mean(bursty) == pytest.approx(0.05, rel=0.1) and np.std(bursty) > 1.5 * np.std(gaps)
    assert arrival_delays(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_bench_latency_and_throughput_records(smollm2_path, tmp_path):
    import json
    import subprocess
    import sys

    common = ["--model", str(smollm2_path), "--dtype", "float32", "--no-show-progress"]
    out = tmp_path / "latency.json"
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "latency", "--prompt-len", "32",
                             "--gen-len", "8", "--repetitions", "2", "--result-file", str(out), *common],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["pp32_tok_s"] > 0 and record["tg8_tok_s"] > 0 and record["repetitions"] == 2
    assert record["warmup_s"] > 0 and record["machine_bandwidth_gb_s"] > 0
    assert 0 < record["decode_bandwidth_gb_s"] < record["machine_bandwidth_gb_s"] * 2
    assert record["config"]["engine"]["model"]["dtype"] == "float32" and record["energy_method"]
    out = tmp_path / "throughput.json"
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "throughput", "--num-prompts", "6",
                             "--input-len", "20", "--output-len", "5", "--repetitions", "2", "--result-file", str(out),
                             *common],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["num_requests"] == 6 and record["total_output_tokens"] == 30 and record["total_input_tokens"] == 120
    runs = record["runs"]
    assert len(runs) == 2 and all(r["output_throughput"] == pytest.approx(30 / r["duration"]) for r in runs)
    assert record["output_throughput"] == pytest.approx((runs[0]["output_throughput"] + runs[1]["output_throughput"]) / 2)
    assert len(record["output_throughput_ci95"]) == 2 and record["output_throughput_std"] >= 0
    assert record["peak_rss_mb"] > 100 and record["seed"] == 0
    assert record["inputs"]["model"]["sha256"] == file_sha256(smollm2_path)
    assert record["command"].startswith("effinfer bench throughput") and record["commit"] == git_state().commit
    kernels = record["config"]["kernels"]
    # the file's own blocks: qkv, o, gate_up and down in each of 30 layers, and the output head
    assert kernels["decode_attention"] and sum(k["layers"] for k in kernels["linear"]) == 30 * 4 + 1
    assert all(k["format"] and k["few_rows"] and k["many_rows"] for k in kernels["linear"])


def test_bench_plot_draws_serve_records(tmp_path):
    import json
    import subprocess
    import sys

    from effinfer.bench.metrics import summarize

    paths = []
    for c in (1, 4):
        record = {"benchmark": "serve", "config": {"label": "demo", "max_concurrency": c},
                  **summarize(results(), duration=2.0 / c)}
        paths.append(tmp_path / f"c{c}.json")
        paths[-1].write_text(json.dumps(record))
    out = subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "plot", *map(str, paths), "--out-dir",
                          str(tmp_path / "plots")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("serve_throughput_vs_concurrency.png", "serve_latency_percentiles.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_parse_config_values_and_names():
    from effinfer.bench.compare import parse_config

    c = parse_config("name=small,dtype=float32,max_num_seqs=8,enable_prefix_caching=false,kv_cache_memory_gb=0.5")
    assert c.name == "small"
    assert c.options == {"dtype": "float32", "max_num_seqs": 8, "enable_prefix_caching": False, "kv_cache_memory_gb": 0.5}
    assert parse_config("dtype=bfloat16").name == "dtype=bfloat16"
    with pytest.raises(ValueError, match="key=value"):
        parse_config("dtype")


def test_bench_compare_interleaves_and_reports_ratios(smollm2_path, tmp_path):
    import json
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. The dog lay by the door, and the bird sang in the tree. " * 8)
    out, plot = tmp_path / "compare.json", tmp_path / "speed_quality.png"
    result = subprocess.run(
        [sys.executable, "-m", "effinfer.cli", "bench", "compare", "--model", str(smollm2_path), "--no-show-progress",
         "--kv-cache-memory-gb", "0.1", "--config", "name=bf16", "--config", "name=fp32,dtype=float32",
         "--config", "name=hf,system=transformers", "--workload", "throughput,quality", "--rounds", "2",
         "--num-prompts", "4", "--input-len", "16", "--output-len", "4", "--text", str(text),
         "--max-text-tokens", "120", "--window", "64", "--stride", "32", "--plot", str(plot),
         "--result-file", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["baseline"] == "bf16" and record["rounds"] == 2
    assert record["ratios"]["bf16"]["output_throughput"] == pytest.approx(1.0)
    # a headline ratio: the geometric mean of the paired rounds' ratios, inside its own 95% interval
    per_round = [f["output_throughput"] / b["output_throughput"]
                 for f, b in zip(record["per_round"]["fp32"], record["per_round"]["bf16"])]
    assert record["ratios"]["fp32"]["output_throughput"] == pytest.approx((per_round[0] * per_round[1]) ** 0.5)
    low, high = record["ratio_ci95"]["fp32"]["output_throughput"]
    assert low < record["ratios"]["fp32"]["output_throughput"] < high
    assert record["configs"]["fp32"]["engine"]["model"]["dtype"] == "float32"
    assert record["configs"]["hf"]["system"] == "transformers"
    # quality: the peer runs the same bf16 weights, so it scores the text (nearly) alike; fp32 differs a little
    m = record["metrics"]
    assert m["hf"]["perplexity"] == pytest.approx(m["bf16"]["perplexity"], rel=0.01)
    assert 0 < m["fp32"]["kl_divergence"] < 0.05 and "kl_divergence" not in m["bf16"]
    assert m["hf"]["total_output_tokens"] == 16 and m["hf"]["load_rss_mb"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compare_names_bad_settings(capsys):
    from effinfer.cli import main

    assert main(["bench", "compare", "--config", "name=x,dtype=int3"]) == 2
    assert "dtype='int3'" in capsys.readouterr().err
    assert main(["bench", "compare", "--config", "name=x", "--workload", "latency,speed"]) == 2
    assert "unknown workload(s) speed" in capsys.readouterr().err


def test_compare_records_without_quality_plot_as_speedups(tmp_path):
    from effinfer.bench.plots import plot_compare

    record = {"baseline": "plain", "metrics": {"plain": {"output_throughput": 40.0},
                                               "ngram": {"output_throughput": 60.0, "spec_acceptance_rate": 0.6}}}
    path = plot_compare(record, tmp_path / "spec.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="speed"):
        plot_compare({"baseline": "a", "metrics": {"a": {"weight_mb": 1.0}}}, tmp_path / "none.png")


def test_one_round_compare_measures_each_config_alone_on_every_workload(monkeypatch):
    from types import SimpleNamespace

    from effinfer.bench import compare

    alive = []

    class Stub:
        def __init__(self, name):
            self.name = name
            alive.append(name)

        def weight_bytes(self):
            return 0

        def describe(self):
            return {}

        def input_files(self):
            return {}

        def __del__(self):
            alive.remove(self.name)

    def measure(system, workload, args):
        assert alive == [system.name]          # the previous configuration is gone before this one runs
        return {f"{workload}_x": 1.0}

    monkeypatch.setattr(compare, "_measure", measure)
    configs = [compare.NamedConfig("a", {}), compare.NamedConfig("b", {"k": 1})]
    result = compare.run_compare(configs, lambda o: Stub("b" if o else "a"), ["latency", "throughput"], 1,
                                 SimpleNamespace())
    assert result["metrics"]["b"]["latency_x"] == result["metrics"]["b"]["throughput_x"] == 1.0


def test_the_sweep_times_decode_apart_from_prefill(monkeypatch):
    """Per batch size: output tokens/s of the whole run, and of decode alone (the run to one token subtracted);
    on a fake clock that a stub system advances by a prefill cost and a cost per decode step."""
    from types import SimpleNamespace

    from effinfer.bench import offline

    clock, cache = [0.0], {"forgotten": 0}
    monkeypatch.setattr(offline.time, "perf_counter", lambda: clock[0])
    prefill_s, step_s, runs, short = 0.5, 0.01, [], [False]

    def run_batch(prompts, output_lens, stop_at_eos):
        assert cache["forgotten"] == len(runs) + 1, "the prefix cache must be cleared before every run"
        runs.append((len(prompts), output_lens[0], len(prompts[0])))
        clock[0] += prefill_s * len(prompts) + step_s * (output_lens[0] - 1)   # a step serves the whole batch
        return sum(output_lens) - short[0]

    def forget_cache():
        cache["forgotten"] += 1

    system = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=1000, special_ids=set(), backend=None),
                             run_batch=run_batch, forget_cache=forget_cache, own_tools=False)
    monkeypatch.setattr(offline, "random_requests", lambda tok, num, input_len, output_len, seed, as_text:
                        [SimpleNamespace(prompt=[7] * input_len) for _ in range(num)])
    result = offline.run_sweep(system, [1, 4], input_len=32, output_len=11)
    assert runs == [(1, 2, 32), (1, 1, 32), (1, 11, 32), (4, 1, 32), (4, 11, 32)]   # a warm-up run first
    assert result["b4_decode_tok_s"] == pytest.approx(4 * 10 / (10 * step_s))
    assert result["b4_output_tok_s"] == pytest.approx(4 * 11 / (4 * prefill_s + 10 * step_s))
    assert result["b1_decode_tok_s"] == pytest.approx(10 / (10 * step_s))
    with pytest.raises(ValueError, match="output_len >= 2"):
        offline.run_sweep(system, [1], input_len=8, output_len=1)
    runs.clear(); cache["forgotten"] = 0; short[0] = True   # a batch cut short (a context too small) is refused
    with pytest.raises(RuntimeError, match="made 10 tokens, not 11"):
        offline.run_sweep(system, [1], input_len=8, output_len=11)
    runs.clear(); cache["forgotten"] = 0; short[0] = False; step_s = 0.0   # no measurable decode time
    with pytest.raises(RuntimeError, match="too short to time"):
        offline.run_sweep(system, [1], input_len=8, output_len=11)


def test_the_sweep_on_the_engine_records_and_plots(smollm2_path, tmp_path, capsys):
    import json

    from effinfer.cli import main

    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["bench", "compare", "--model", str(smollm2_path), "--no-show-progress", "--kv-cache-memory-gb", "0.1",
            "--config", "name=bf16", "--workload", "sweep", "--batch-sizes", "1,3", "--rounds", "1",
            "--input-len", "8", "--output-len", "12"]   # decode steps enough to time on a busy machine
    assert main(args + ["--plot", str(plot), "--result-file", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]["bf16"]
    assert all(metrics[f"b{b}_{kind}_tok_s"] > 0 for b in (1, 3) for kind in ("output", "decode"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args[:-8] + ["--workload", "sweep", "--batch-sizes", "1,128"]) == 2
    assert "batch size 128 is above bf16's max_num_seqs" in capsys.readouterr().err
    assert main(args[:-8] + ["--workload", "sweep", "--batch-sizes", "0,x"]) == 2
    assert "--batch-sizes takes positive integers" in capsys.readouterr().err
