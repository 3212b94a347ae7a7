"""`effinfer bench serve` against a live effinfer server: every request completes and the JSON record
holds the vLLM-named metrics, the resolved settings and where the run happened."""

from __future__ import annotations

import json
import subprocess
import sys

from effinfer.bench.provenance import git_state
from helpers import API_KEY


def test_bench_serve_writes_a_complete_record(live, tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, "-m", "effinfer.cli", "bench", "serve", "--base-url", live.base_url, "--api-key", API_KEY,
         "--num-prompts", "12", "--input-len", "48", "--output-len", "8", "--request-rate", "20",
         "--max-concurrency", "6", "--goodput", "ttft:60000", "--result-file", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["completed"] == 12 and record["failed"] == 0
    assert record["total_output_tokens"] == 12 * 8
    assert 12 * 40 <= record["total_input_tokens"] <= 12 * 60          # re-tokenized text stays close to 48
    for key in ("mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "p90_e2el_ms", "output_throughput", "goodput",
                "commit", "dirty", "command", "cpu", "cpu_flags", "versions", "seed", "config"):
        assert key in record, key
    assert record["commit"] == git_state().commit and record["versions"]["torch"]
    assert record["command"].startswith("effinfer bench serve --base-url")
    low, high = record["mean_ttft_ms_ci95"]
    assert low <= record["mean_ttft_ms"] <= high
    assert record["goodput"] == record["request_throughput"]
    assert "TTFT" in result.stdout
    assert live.wait_idle()
