"""A checkpoint opened, not yet read: a catalog name, GGUF file or Hugging Face folder -> its architecture
config, a weight iterator and a tokenizer loader. Imports no torch until weights are read: the server's API
process opens models here for their tokenizers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from effinfer.loader import catalog
from effinfer.loader.arch_config import ArchConfig
from effinfer.loader.checkpoint import is_quantized_checkpoint, read_config
from effinfer.loader.tokenizer import Tokenizer
from effinfer.utils import ModelLoadError


def resolve_model_path(name: str, cache_dir: str | None = None, show_progress: bool = True) -> Path:
    """A local GGUF file or HF folder as is; a catalog name pulled into the cache if needed."""
    from effinfer.loader.safetensors import is_hf_folder

    path = Path(name).expanduser()
    if path.is_file() or path.is_dir():
        if path.is_dir() and not is_hf_folder(path) and not is_quantized_checkpoint(path):
            raise ModelLoadError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
        return path
    if name in catalog.CATALOG:
        return catalog.pull(name, cache_dir, show_progress)
    if path.suffix == ".gguf" or "/" in name:
        raise ModelLoadError(f"model path {name!r} does not exist")
    catalog.get_entry(name)  # raises with the list of catalog names
    raise AssertionError("unreachable")


def load_tokenizer(name: str, cache_dir: str | None = None) -> Tokenizer:
    """Only the tokenizer of a catalog name, GGUF file or HF folder (no weights are read)."""
    path = resolve_model_path(name, cache_dir, show_progress=False)
    if is_quantized_checkpoint(path):
        return load_tokenizer(read_config(path)["base_model"], cache_dir)
    return open_source(path, cache_dir).tokenizer()


@dataclass
class Source:
    """A checkpoint opened but not yet read: its config, a weight iterator and a tokenizer loader."""

    config: ArchConfig
    iter_weights: Callable
    tokenizer: Callable[[], Tokenizer]
    gguf: object | None = None


def open_source(path: Path, cache_dir: str | None) -> Source:
    if path.is_dir():
        from effinfer.loader import safetensors as st
        from effinfer.loader.tokenizer import load_hf_tokenizer

        cfg = st.read_arch_config(path)
        tokenizer = load_hf_tokenizer(path)
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids))
        return Source(cfg, lambda show, keep_blocks=False: st.iter_weights(path, show), lambda: tokenizer)
    from effinfer.loader.gguf import GGUFFile
    from effinfer.loader.tokenizer import load_gguf_tokenizer

    gguf_file = GGUFFile(path)
    cfg = gguf_file.arch_config()
    tokenizer_cache = catalog.cache_dir(cache_dir) / "tokenizers"
    return Source(cfg, lambda show, keep_blocks=False: gguf_file.iter_weights(show, keep_int4_blocks=keep_blocks),
                   lambda: load_gguf_tokenizer(path, cfg.eos_token_ids, tokenizer_cache), gguf_file)


def open_weights(path: Path | str, cache_dir: str | None = None, show_progress: bool = True):
    """The Hugging Face-named float tensors of a GGUF file or HF folder, without building a model."""
    return open_source(Path(path), cache_dir).iter_weights(show_progress)
