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
    assert text.startswith("Intro.") and text.endswith("After.\n") and "| 1 | 79.7 (12.3 ms)" in text
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
