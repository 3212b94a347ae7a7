"""GGUF quantized blocks used as they are: the file's 4-bit blocks become int4 groups of 32 exactly.

Q4_0 (w = d * (q - 8)), Q4_1 (w = d * q + m) and Q4_K (per 32-value sub-block: w = d*sc * q - dmin*m)
are all "4-bit value times a scale plus an offset" per group of 32, which is the int4 kernel's own
format, so they are repacked with no rounding beyond storing d and m in the activation dtype. Wider
blocks (Q5_*, Q6_K, Q8_0) go to int8 per output channel. A fused layer (q/k/v, gate/up) is int4 only
when every one of its shards is a 4-bit block; otherwise the whole layer is int8. Each tensor is read
from the memory-mapped file and converted on its own, so no full-precision copy of the model exists.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from effinfer.compression.quant.weight_only import Int4Blocks, Int4WeightOnly, Int8WeightOnly
from effinfer.layers.linear import QuantMethod

INT4_EXACT = {T.Q4_0, T.Q4_1, T.Q4_K}
GROUP = 32


class GGUFBlocks(QuantMethod):
    """`quantization=gguf`: each layer in the format of its blocks in the file (`plan_layers`, asked by the
    loader); a layer the plan does not cover (none in practice) falls back to int4 in groups of 32."""

    name = "gguf"

    @classmethod
    def from_options(cls, group_size: int = 32, symmetric: bool = False) -> QuantMethod:
        return Int4WeightOnly(GROUP)

    @staticmethod
    def plan_layers(tensor_types: dict[str, int], fused_target) -> dict[str, QuantMethod]:
        return plan_layers(tensor_types, fused_target)


def plan_layers(tensor_types: dict[str, int], fused_target) -> dict[str, QuantMethod]:
    """Module name -> method for every decoder linear, from the GGUF types of its HF-named shards."""
    shard_types: dict[str, set] = {}
    for hf_name, qtype in tensor_types.items():
        if ".layers." not in hf_name or not hf_name.endswith(".weight"):
            continue
        target, _ = fused_target(hf_name)
        shard_types.setdefault(target.rpartition(".")[0], set()).add(qtype)
    int4, int8 = Int4WeightOnly(GROUP), Int8WeightOnly()
    return {module: int4 if types <= INT4_EXACT else int8 for module, types in shard_types.items()}


def to_int4_blocks(data: np.ndarray, qtype: int, rows: int, cols: int) -> Int4Blocks:
    """The 4-bit values and per-32 scale/offset of a Q4_0, Q4_1 or Q4_K tensor ([rows, cols] in HF order)."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows * cols // (256 if qtype == T.Q4_K else GROUP), -1)
    if qtype == T.Q4_K:
        q, scale, minimum = _q4_k(blocks)
    else:
        has_min = qtype == T.Q4_1
        d = blocks[:, :2].view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].view(np.float16).astype(np.float32) if has_min else -8 * d
        qs = blocks[:, 4 if has_min else 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)     # low nibbles: values 0-15, high: 16-31
        scale, minimum = d, m
    as_tensor = lambda a, shape: torch.from_numpy(np.ascontiguousarray(a)).reshape(shape)  # noqa: E731
    return Int4Blocks(as_tensor(q, (rows, cols)), as_tensor(scale, (rows, cols // GROUP)),
                      as_tensor(minimum, (rows, cols // GROUP)), GROUP)


def _q4_k(blocks: np.ndarray):
    from gguf.quants import Q4_K

    n = blocks.shape[0]
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 256)
    return q, d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
