"""effinfer's own CPU kernels (C++ in this folder), built from source on first use by PyTorch's extension
builder (a C++ compiler and ninja; ~6 s once, then loaded from PyTorch's cache, ~/.cache/torch_extensions).

Where the kernels cannot be built (no compiler, not x86), callers keep PyTorch's own: `int8_gemv()`,
`int4_gemv()` and `paged_decode_attention()` return None and a warning says why, once.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("int8_gemv.cpp", "int4_gemv.cpp", "paged_attention.cpp")]
_built: bool | None = None
"""None until the first request; then whether the build and load succeeded."""


def int8_gemv():
    """The op `int8_gemv(x [M, K], qweight int8 [N, K], scales fp32 [N]) -> x.dtype [M, N]`, or None."""
    return torch.ops.effinfer_kernels.int8_gemv.default if _loaded() else None


def int4_gemv():
    """The op `int4_gemv(x [M, K], packed uint8 [N, K / 2], records fp16 [N, 2K / sub], sub) -> x.dtype [M, N]`
    (layout: effinfer/kernels/int4_layout.py), or None where the kernel is not built or the CPU lacks
    AVX512-VNNI (its only fast path; elsewhere PyTorch's int4 kernel is faster than its scalar one)."""
    if not _loaded() or torch.ops.effinfer_kernels.int4_isa() != "avx512_vnni":
        return None
    return torch.ops.effinfer_kernels.int4_gemv.default


def int4_gemm():
    """The op `int4_gemm(x [M, K], packed, records, sub) -> x.dtype [M, N]`: the same product as `int4_gemv` for
    steps of many rows (needs N % 16 == 0), or None where `int4_gemv` is."""
    return torch.ops.effinfer_kernels.int4_gemm.default if int4_gemv() is not None else None


def int8_gemm():
    """The op `int8_gemm(x [M, K], qweight int8 [N, K], scales fp32 [N]) -> x.dtype [M, N]` for steps of many rows
    (activations rounded to int8 per block of 32 columns; needs K % 64 == 0, N % 16 == 0, AVX512-VNNI), or None."""
    return torch.ops.effinfer_kernels.int8_gemm.default if int4_gemv() is not None else None


def int4_mm():
    """The op `int4_mm(x, packed, records, sub)` the int4 layers call: `int4_gemv` for up to 8 rows, `int4_gemm`
    above where N % 16 == 0 (chosen inside: a compiled step has no branch on its batch size), or None."""
    return torch.ops.effinfer_kernels.int4_mm.default if int4_gemv() is not None else None


def paged_decode_attention():
    """The op `paged_decode_attention(q [seqs, heads, dim], pages [2, kv_heads, blocks, block, dim], block_tables
    [seqs, width], seq_lens [seqs], scale, window (0: none)) -> [seqs, heads, dim]`: decode attention over bf16 or
    fp32 pages read in place, or None where the kernel is not built or the CPU lacks AVX-512."""
    if not _loaded() or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    return torch.ops.effinfer_kernels.paged_decode_attention.default


def kernel_isa() -> str:
    """The instruction set effinfer's quantized kernels run with here ("not built" where they did not build)."""
    return torch.ops.effinfer_kernels.int4_isa() if _loaded() else "not built"


def _loaded() -> bool:
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()

        load(name="effinfer_kernels", sources=[str(s) for s in _SOURCES], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:   # no compiler or ninja, a read-only cache, ...: keep PyTorch's kernels
        first_line = (str(e).strip().splitlines() or [""])[0]
        warnings.warn(f"effinfer's CPU kernels did not build ({type(e).__name__}: {first_line[:200]}); "
                      "int8 and int4 layers and decode attention use PyTorch's kernels (slower decode)", stacklevel=3)
        return False
    torch.library.register_fake("effinfer_kernels::int8_gemv")(_int8_gemv_shape)
    torch.library.register_fake("effinfer_kernels::int4_gemv")(_int4_gemv_shape)
    torch.library.register_fake("effinfer_kernels::int4_dequantize")(_int4_dequantize_shape)
    torch.library.register_fake("effinfer_kernels::int4_gemm")(_int4_gemm_shape)
    torch.library.register_fake("effinfer_kernels::int4_mm")(_int4_gemm_shape)
    torch.library.register_fake("effinfer_kernels::int8_gemm")(_int8_gemv_shape)
    torch.library.register_fake("effinfer_kernels::paged_decode_attention")(_paged_decode_attention_shape)
    return True


def _put_ninja_on_path() -> None:
    """PyTorch's builder runs `ninja` from PATH; the pip-installed one sits in the venv's bin, which is not on
    PATH when the venv is used without activating it (`.venv/bin/effinfer ...`)."""
    try:
        import ninja
    except ImportError:
        return   # a system ninja may still be on PATH
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _int8_gemv_shape(x, qweight, scales, isa="auto"):
    """What `torch.compile` traces with: the output's shape and dtype."""
    return x.new_empty(x.shape[0], qweight.shape[0])


def _int4_gemv_shape(x, packed, records, sub, isa="auto"):
    return x.new_empty(x.shape[0], packed.shape[0])


def _int4_gemm_shape(x, packed, records, sub):
    return x.new_empty(x.shape[0], packed.shape[0])


def _int4_dequantize_shape(packed, records, sub, dtype):
    return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)


def _paged_decode_attention_shape(q, pages, block_tables, seq_lens, scale, window):
    return torch.empty_like(q)
