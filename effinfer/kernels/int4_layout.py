"""The weight layout of effinfer's int4 CPU kernel (int4_gemv.cpp explains why it is laid out this way).

A row of K 4-bit values becomes K / 2 bytes: chunks of 128 columns in 64 bytes (and a last chunk of 64 columns
in 32 bytes when K is 64 past a multiple of 128). In a 128-column chunk, byte p's low nibble holds column
`order[p]` and its high nibble column `order[64 + p]`. Scales and minimums are kept per block of `sub` columns
(64, or 32 for groups of 32; a group of 128 or 256 repeats its scale per block) in fp16, one record per
row: the row's block scales, then its block minimums, in the order the kernel's lanes read them.
"""

from __future__ import annotations

import torch

CHUNK = 128


def block_columns(group_size: int) -> int:
    """The kernel's block (`sub`) for a quantization group size."""
    return 32 if group_size == 32 else 64


def _chunk_order() -> torch.Tensor:
    """order[64 * nibble + p] = the column (0-127) that byte p's nibble holds in a 128-column chunk: 32-bit
    lanes (4 bytes) alternate between columns 0-63 (even lanes) and 64-127 (odd), low nibbles first."""
    p = torch.arange(64)
    lane, within = p // 4, p % 4
    parity, i = lane % 2, 4 * (lane // 2) + within
    return torch.cat([32 * (2 * parity + nibble) + i for nibble in (0, 1)])


def column_order(k: int) -> torch.Tensor:
    """Kernel position -> column, for a row of k columns (per chunk: low nibbles' columns, then high's)."""
    chunks, tail = divmod(k, CHUNK)
    order = [c * CHUNK + _chunk_order() for c in range(chunks)]
    if tail:
        order.append(chunks * CHUNK + torch.arange(tail))   # the 64-column chunk keeps columns in order
    return torch.cat(order)


def _record_order(k: int, sub: int) -> torch.Tensor:
    """Record position -> block, for one kind (scales or minimums) of a row's records. With blocks of 32,
    a 128-column chunk lists the low-nibble blocks (0, 2), then the high-nibble ones (1, 3)."""
    per_chunk = CHUNK // sub
    within = torch.tensor([0, 2, 1, 3]) if sub == 32 else torch.arange(per_chunk)
    chunks, tail = divmod(k, CHUNK)
    order = [c * per_chunk + within for c in range(chunks)]
    if tail:
        order.append(chunks * per_chunk + torch.arange(tail // sub))
    return torch.cat(order)


def pack(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """q [n, k] (0..15), weight = q * scale + minimum per group -> (packed [n, k / 2] uint8, records [n, 2k / sub]
    fp16, sub)."""
    n, k = q.shape
    if k % 64:
        raise ValueError(f"the int4 kernel needs a multiple of 64 columns, not {k}")
    sub = block_columns(group_size)
    ordered = q[:, column_order(k)].to(torch.uint8)
    packed = []
    for start, size in _chunk_spans(k):
        half = size // 2
        packed.append(ordered[:, start:start + half] | (ordered[:, start + half:start + size] << 4))
    order, repeat = _record_order(k, sub), group_size // sub
    records = [t.float().repeat_interleave(repeat, dim=1)[:, order] for t in (scale, minimum)]
    return torch.cat(packed, dim=1).contiguous(), torch.cat(records, dim=1).half().contiguous(), sub


def _chunk_spans(k: int) -> list[tuple[int, int]]:
    chunks, tail = divmod(k, CHUNK)
    return [(c * CHUNK, CHUNK) for c in range(chunks)] + ([(chunks * CHUNK, tail)] if tail else [])


def dequantize(packed: torch.Tensor, records: torch.Tensor, sub: int) -> torch.Tensor:
    """The fp32 [n, k] weight the kernel computes with."""
    n, k = packed.shape[0], packed.shape[1] * 2
    ordered = torch.empty(n, k, dtype=torch.uint8)
    for start, size in _chunk_spans(k):
        half = size // 2
        b = packed[:, start // 2:start // 2 + half]
        ordered[:, start:start + half], ordered[:, start + half:start + size] = b & 0xF, b >> 4
    q = torch.empty_like(ordered)
    q[:, column_order(k)] = ordered
    blocks = k // sub
    scale, minimum = torch.empty(n, blocks), torch.empty(n, blocks)
    order = _record_order(k, sub)
    scale[:, order], minimum[:, order] = records[:, :blocks].float(), records[:, blocks:].float()
    w = q.float().view(n, -1, sub) * scale[..., None] + minimum[..., None]
    return w.view(n, k)
