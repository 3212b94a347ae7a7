"""`effinfer tune`: the quality bound prunes, the winner is the fastest admissible candidate measured, and its
file runs through `--config`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from effinfer.cli import build_parser
from effinfer.cli_args import engine_kwargs, given_flags
from effinfer.config import EngineConfig
from effinfer.tools import tune
from tiny_models import save_tiny_folder

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "A stitch in time saves nine. " * 40)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_folder("llama", folder)
    return folder


def test_tune_writes_a_config_a_report_and_a_plot(tiny_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out, report, plot = tmp_path / "tuned.json", tmp_path / "report.json", tmp_path / "pareto.png"
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "tune", str(tiny_llama), "--text", str(text),
                             "--max-kl", "0.05", "--quality-tokens", "256", "--prompt-len", "16", "--gen-len", "4",
                             "--rounds", "2", "--no-compile-candidates", "--time-budget", "300",
                             "--out", str(out), "--report", str(report), "--plot", str(plot)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(report.read_text())
    rows = {r["name"]: r for r in record["candidates"]}
    scored = [r for r in rows.values() if r["kl"] is not None]
    assert len(scored) >= 4 and rows["quantization=none,kv_cache_dtype=auto"]["kl"] == pytest.approx(0, abs=1e-6)
    for r in scored:                     # what the bound drops is dropped for it, and only that
        assert (r["kl"] > 0.05) == r["dropped"].startswith("KL "), r
    final = [r for r in record["candidates"] if r["stage"] == "final"]
    assert "default" in {r["name"] for r in final} and len(final) >= 2
    assert all("speedup_vs_default" in r for r in final if r["name"] != "default")
    assert record["chosen_on"] == "interleaved final" and record["best_vs_runner_up"]["runner_up"] in rows
    best = rows[record["best"]]
    assert best["kl"] <= 0.05 and not best["dropped"]
    key = "request_latency_s"
    assert best["speed"][key]["mean"] == min(r["speed"][key]["mean"] for r in final if r["kl"] is not None
                                             and r["kl"] <= 0.05)
    assert plot.stat().st_size > 1000 and record["commit"] and record["inputs"]["text"]["sha256"]
    options = json.loads(out.read_text())
    assert options["model"] == str(tiny_llama) and EngineConfig.from_kwargs(**options)   # a valid configuration
    args = build_parser().parse_args(["serve", "--config", str(out)])
    assert engine_kwargs(args) == {**engine_kwargs(build_parser().parse_args(["serve"])), **options}


def test_config_file_flags_win_and_bad_files_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"quantization": "int8", "max_num_seqs": 8}))
    kwargs = engine_kwargs(build_parser().parse_args(["serve", "--config", str(path), "--max-num-seqs", "4"]))
    assert kwargs["quantization"] == "int8" and kwargs["max_num_seqs"] == 4
    # a flag typed at its default value still wins over the file (the CLI records what was given)
    path.write_text(json.dumps({"enable_prefix_caching": False, "compile": True}))
    argv = ["serve", "--config", str(path), "--enable-prefix-caching", "--no-compile"]
    args = build_parser().parse_args(argv)
    args.given_flags = given_flags(argv)
    kwargs = engine_kwargs(args)
    assert kwargs["enable_prefix_caching"] is True and kwargs["compile"] is False
    path.write_text(json.dumps({"quantisation": "int8"}))
    with pytest.raises(ValueError, match="unknown engine option.*quantisation"):
        engine_kwargs(build_parser().parse_args(["serve", "--config", str(path)]))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        engine_kwargs(build_parser().parse_args(["serve", "--config", str(path)]))


def test_tune_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        tune.TuneSettings("m", __file__, workload="serve")
    with pytest.raises(ValueError, match="max_kl"):
        tune.TuneSettings("m", __file__, max_kl=0)
    with pytest.raises(FileNotFoundError):
        tune.TuneSettings("m", str(tmp_path / "missing.txt"))


def test_tune_for_throughput_tries_step_budgets(tiny_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "tune", str(tiny_llama), "--text", str(text),
                             "--workload", "throughput", "--max-kl", "0.05", "--quality-tokens", "256",
                             "--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--finalists", "1",
                             "--rounds", "2", "--no-compile-candidates", "--out", str(tmp_path / "tuned.json"),
                             "--report", str(report), "--plot", str(tmp_path / "pareto.png")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(report.read_text())
    final = {r["name"]: r for r in record["candidates"] if r["stage"] == "final"}
    assert sum("max_num_batched_tokens" in r["options"] for r in final.values()) == len(tune.STEP_BUDGETS)
    best = final[record["best"]]
    assert best["speed"]["output_throughput"]["mean"] == max(r["speed"]["output_throughput"]["mean"]
                                                             for r in final.values())
