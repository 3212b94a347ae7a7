"""Small helpers shared by every layer of the package: errors users see, progress bars, devices.

Imports no torch: the server's API process (configs, tokenizer, HTTP) runs without it."""

from __future__ import annotations

import logging
import os
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


def available_memory() -> int:
    """Bytes of RAM the system can hand out now without swapping (Linux MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system after a one-off burst of allocations (loading a model,
    compiling its step): glibc keeps them otherwise (~30-50 MB after loading SmolLM2)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        pass


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
