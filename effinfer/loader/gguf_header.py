"""A GGUF file's header read in one pass: metadata values and tensor descriptions, with the tensor data
left memory-mapped.

`gguf.GGUFReader` turns every element of every metadata array into its own numpy view: for a vocabulary
of 49k tokens and 49k merges that is ~245k objects, 2.2 s and 160 MB kept as long as the reader lives
(Gemma 3's 262k-token vocabulary: ~9 s). Loading needs the hyperparameters and the tensor table, not the
vocabulary (the tokenizer is converted once by transformers and cached), so here arrays are only
stepped over and decoded when asked for. The types, block sizes and tensor records are the `gguf`
package's own.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, ReaderTensor
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC
from gguf.quants import quant_shape_to_byte_shape

SUPPORTED_VERSIONS = (2, 3)
_SCALARS = {   # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}
# tensor types stored as plain arrays; every other type is blocks of bytes
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (bad magic, version, type or length)."""


class _Array:
    """A metadata array not yet decoded: where its elements start, their type and count."""

    def __init__(self, buffer: memoryview, offset: int, item_type: GGUFValueType, count: int):
        self.buffer, self.offset, self.item_type, self.count = buffer, offset, item_type, count

    def decode(self) -> list:
        if self.item_type in _SCALARS:
            dtype = _SCALARS[self.item_type][1]
            return np.frombuffer(self.buffer, dtype, self.count, self.offset).tolist()
        values, offset = [], self.offset
        for _ in range(self.count):
            value, offset = _value(self.buffer, offset, self.item_type)
            values.append(value.decode() if isinstance(value, _Array) else value)
        return values


class GGUFHeader:
    """`fields`: metadata key -> value (arrays decoded on `field()`); `tensors`: the file's tensor table,
    each with its data as a view of the memory-mapped file."""

    def __init__(self, path: Path):
        try:
            self.data = np.memmap(path, mode="r")
            self.buffer = memoryview(self.data)
            self._read()
        except (struct.error, IndexError, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise GGUFFormatError(str(exc) or type(exc).__name__) from exc

    def field(self, key: str, default=None) -> Any:
        value = self.fields.get(key, default)
        return value.decode() if isinstance(value, _Array) else value

    def _read(self) -> None:
        magic, version = struct.unpack_from("<II", self.buffer, 0)
        if magic != GGUF_MAGIC:
            raise GGUFFormatError("GGUF magic invalid")
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack_from(">I", self.buffer, 4)[0]
            raise GGUFFormatError("big-endian GGUF files are not supported" if swapped in SUPPORTED_VERSIONS
                                  else f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = struct.unpack_from("<QQ", self.buffer, 8)
        offset, self.fields = 24, {}
        for _ in range(kv_count):
            key, offset = _string(self.buffer, offset)
            value_type = GGUFValueType(struct.unpack_from("<I", self.buffer, offset)[0])
            self.fields[key], offset = _value(self.buffer, offset + 4, value_type)
        infos = []
        for _ in range(tensor_count):
            name, offset = _string(self.buffer, offset)
            n_dims = struct.unpack_from("<I", self.buffer, offset)[0]
            dims = np.frombuffer(self.buffer, np.uint64, n_dims, offset + 4).copy()
            offset += 4 + 8 * n_dims
            tensor_type, data_offset = struct.unpack_from("<IQ", self.buffer, offset)
            infos.append((name, dims, GGMLQuantizationType(tensor_type), data_offset))
            offset += 12
        alignment = self.field("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"alignment {alignment} is not a power of two")
        self.data_start = -(-offset // alignment) * alignment
        self.tensors = [self._tensor(*info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise GGUFFormatError("a tensor name appears twice")

    def _tensor(self, name: str, dims: np.ndarray, tensor_type: GGMLQuantizationType, data_offset: int) -> ReaderTensor:
        n_elements = int(np.prod(dims))
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        n_bytes = n_elements * type_size // block_size
        start, shape = self.data_start + data_offset, tuple(int(d) for d in reversed(dims.tolist()))
        if tensor_type in _PLAIN:
            dtype, count = _PLAIN[tensor_type], n_elements
        else:
            dtype, count, shape = np.uint8, n_bytes, quant_shape_to_byte_shape(shape, tensor_type)
        # a tensor past the end of the file gets an empty view here; GGUFFile names it as truncated
        data = self.data[start:start + count * np.dtype(dtype).itemsize]
        if len(data) == count * np.dtype(dtype).itemsize:
            data = data.view(dtype).reshape(shape)
        return ReaderTensor(name, tensor_type, dims, n_elements, n_bytes, start, data, None)


def _value(buffer: memoryview, offset: int, value_type: GGUFValueType) -> tuple[Any, int]:
    """The value at `offset` and the offset after it; an array is stepped over, not decoded."""
    if value_type == GGUFValueType.STRING:
        return _string(buffer, offset)
    if value_type in _SCALARS:
        fmt = _SCALARS[value_type][0]
        return struct.unpack_from(fmt, buffer, offset)[0], offset + struct.calcsize(fmt)
    if value_type != GGUFValueType.ARRAY:
        raise GGUFFormatError(f"unknown metadata value type {value_type}")
    item_type = GGUFValueType(struct.unpack_from("<I", buffer, offset)[0])
    count = struct.unpack_from("<Q", buffer, offset + 4)[0]
    array, offset = _Array(buffer, offset + 12, item_type, count), offset + 12
    if count > len(buffer) - offset:
        raise GGUFFormatError(f"an array of {count:,} elements does not fit in the file")
    if item_type in _SCALARS:
        return array, offset + count * struct.calcsize(_SCALARS[item_type][0])
    for _ in range(count):
        _, offset = _value(buffer, offset, item_type)
    return array, offset


def _string(buffer: memoryview, offset: int) -> tuple[str, int]:
    length = struct.unpack_from("<Q", buffer, offset)[0]
    end = offset + 8 + length
    if end > len(buffer):
        raise GGUFFormatError(f"a string of {length:,} bytes runs past the end of the file")
    return bytes(buffer[offset + 8:end]).decode("utf-8"), end
