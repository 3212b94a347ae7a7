"""The docs' tables are rendered from the records: a figure in a marked table is the figure in its record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from effinfer.bench import tables
from effinfer.bench.provenance import RESULTS_DIR


def test_every_marked_table_in_the_docs_matches_its_records():
    paths = tables.doc_paths()
    assert any("<!-- table: " in p.read_text() for p in paths), "no marked table in the docs"
    assert tables.report(paths, check=True) == []
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "bench", "report", "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_changed_record_shows_as_a_differing_table(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS_DIR / "structured_output.json", results)
    doc = tmp_path / "doc.md"
    doc.write_text("Intro.\n\n<!-- table: structured_output -->\nstale\n<!-- /table -->\n\nAfter.\n")
    assert tables.report([doc], results, check=True) == [str(doc)]
    assert "stale" in doc.read_text()                                    # --check writes nothing
    assert tables.report([doc], results) == [str(doc)]
    text = doc.read_text()
    first = json.loads((results / "structured_output.json").read_text())["rows"][0]
    cell = f"| {first['concurrency']} | {first['unconstrained_output_tok_s']:.1f} ({first['unconstrained_tpot_ms']:.1f} ms)"
    assert text.startswith("Intro.") and text.endswith("After.\n") and cell in text
    assert tables.report([doc], results, check=True) == []
    record = json.loads((results / "structured_output.json").read_text())
    record["rows"][0]["json_schema_output_tok_s"] = 12.0
    (results / "structured_output.json").write_text(json.dumps(record))
    assert tables.report([doc], results, check=True) == [str(doc)]       # the record moved, the doc did not


def test_unknown_tables_and_missing_records_are_errors(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: no_such_table -->\n<!-- /table -->\n")
    with pytest.raises(ValueError, match="unknown table 'no_such_table'"):
        tables.report([doc], tmp_path, check=True)
    doc.write_text("<!-- table: embeddings -->\n<!-- /table -->\n")
    with pytest.raises(FileNotFoundError, match="embeddings.json"):
        tables.report([doc], tmp_path, check=True)


def test_compare_and_tune_tables_render_named_records(tmp_path):
    compare = {"benchmark": "compare", "commit": "a" * 40, "dirty": False, "date": "2026-12-05T00:00:00",
               "command": "effinfer bench compare ...", "rounds": 3, "baseline": "effinfer",
               "metrics": {"effinfer": {"tg128_tok_s": 130.0, "peak_rss_mb": 500.0},
                           "llama.cpp": {"tg128_tok_s": 120.0}},
               "ratios": {"effinfer": {"tg128_tok_s": 1.0}, "llama.cpp": {"tg128_tok_s": 120 / 130}},
               "ratio_ci95": {"llama.cpp": {"tg128_tok_s": [0.85, 0.99]}}}
    tune = {"benchmark": "tune", "commit": "b" * 40, "workload": "throughput", "max_kl": 0.01, "elapsed_s": 600,
            "best": "quantization=int8", "best_options": {"model": "m", "quantization": "int8"},
            "candidates": [{"name": "quantization=int8", "kl": 0.005, "perplexity": 15.1, "dropped": "",
                            "speed": {"output_throughput": {"mean": 300.0, "ci95": [290.0, 310.0], "rounds": 3}},
                            "speedup_vs_default": {"ratio": 1.2, "ci95": [1.1, 1.3]}},
                           {"name": "quantization=int4,group_size=64", "kl": 0.27, "perplexity": 20.6,
                            "dropped": "KL 0.2700 above the bound 0.01", "speed": {}}]}
    (tmp_path / "cmp.json").write_text(json.dumps(compare))
    (tmp_path / "tn.json").write_text(json.dumps(tune))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: compare:cmp -->\n<!-- /table -->\n\n<!-- table: tune:tn -->\n<!-- /table -->\n")
    tables.report([doc], tmp_path)
    text = doc.read_text()
    assert "| tg128 tok s | 130.0 | 120.0 (0.92x [0.85, 0.99]) |" in text and "peak" not in text
    assert "| **quantization=int8** | 0.0050 | 15.10 | 300 [290, 310] | 1.20x [1.10, 1.30] | chosen |" in text
    assert "KL 0.2700 above the bound" in text and "at aaaaaaaaaa" in text
    assert tables.report([doc], tmp_path, check=True) == []


def test_unpaired_markers_are_an_error_not_lost_prose(tmp_path):
    doc = tmp_path / "doc.md"
    text = ("<!-- table: embeddings -->\nold\n\nprose that must survive\n\n"
            "<!-- table: structured_output -->\nold\n<!-- /table -->\n")
    doc.write_text(text)
    with pytest.raises(ValueError, match="do not pair up"):
        tables.report([doc], RESULTS_DIR)
    assert doc.read_text() == text


def test_the_records_table_says_which_records_pin_what_ran(tmp_path):
    (tmp_path / "new.json").write_text(json.dumps({"benchmark": "compare", "commit": "c" * 40, "dirty": False,
                                                   "command": "effinfer bench compare ..."}))
    (tmp_path / "old.json").write_text(json.dumps({"benchmark": "compare", "commit": "abc1234"}))
    (tmp_path / "tuned.config.json").write_text(json.dumps({"model": "m", "quantization": "int8"}))
    text = tables.TABLES["records"](tmp_path)
    assert "| `new.json` | compare | cccccccccc | yes |" in text
    assert "| `old.json` | compare | abc1234 | no: full commit, clean-tree flag, command |" in text
    assert "tuned.config" not in text and "1 of 2 records" in text
