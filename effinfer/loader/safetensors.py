"""Hugging Face folders: config.json plus *.safetensors (one file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from effinfer.loader.arch_config import ArchConfig
from effinfer.utils import ModelLoadError, progress

if TYPE_CHECKING:   # the tensors come from safetensors; opening a folder for its config needs no torch
    import torch


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_arch_config(folder: Path) -> ArchConfig:
    try:
        cfg = json.loads((folder / "config.json").read_text())
        return ArchConfig.from_hf_config(cfg)
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is not a usable model config: {exc!r}") from exc


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise ModelLoadError(f"{folder} has no complete set of .safetensors weights (missing: {missing or 'all'})")
    return files


def iter_weights(folder: Path, show_progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, memory-mapped shard by shard; multimodal prefixes are stripped."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    for file in progress(weight_files(folder), "load shards", show_progress):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if _is_text_weight(name):
                        yield _strip_prefix(name), f.get_tensor(name)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({exc})") from exc


def _is_text_weight(name: str) -> bool:
    return not any(part in name for part in ("vision_tower", "multi_modal_projector", "rotary_emb.inv_freq"))


def _strip_prefix(name: str) -> str:
    return name.replace("model.language_model.", "model.").replace("language_model.", "")
