"""Small helpers shared by every layer of the package: errors users see, progress bars, devices.

Imports no torch: the server's API process (configs, tokenizer, HTTP) runs without it."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Iterable, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


class ModelLoadError(ValueError):
    """A model could not be found, fetched or read; the message says what and how to fix it."""


def progress(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None,
             unit: str = "it") -> Iterable[T]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False)


# dtype names users may write -> the torch dtype's name
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def log_to_stderr(level: int = logging.INFO) -> None:
    """effinfer's log records on stderr, uvicorn-style (`INFO:     ...`), once per process (a server and its
    engine core process each call it)."""
    logger = logging.getLogger("effinfer")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
