"""GGUF checkpoints through the `gguf` package: metadata -> ArchConfig, tensors -> HF-named torch tensors.

The file is memory-mapped (`gguf_header.GGUFHeader`); `GGUFFile.raw_tensor()` hands out the quantized blocks as
they are on disk for compression work, and `iter_weights()` dequantizes one tensor at a time.

llama.cpp's converter changes two things that we undo so the HF-layout model classes apply:
Llama Q/K rows are permuted for its interleaved rope, and Gemma norm weights are stored as `1 + w`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from effinfer.loader.arch_config import FULL_ATTENTION, SLIDING_ATTENTION, ArchConfig
from effinfer.utils import ModelLoadError, progress

if TYPE_CHECKING:   # tensors are made only when weights are read; the header and config need no torch
    import torch

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF `general.architecture` -> HF architecture name (the model registry's key)
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Gemma 3 has four norms per block: its `ffn_norm` is the norm before the MLP
_GEMMA3_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors that carry no weights of their own (folded into the config or rope).
_SKIPPED = {"rope_freqs.weight"}


class GGUFFile:
    def __init__(self, path: str | os.PathLike):
        from effinfer.loader.gguf_header import GGUFFormatError, GGUFHeader  # imports `gguf`: only when needed

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file not found: {self.path}")
        try:
            self.header = GGUFHeader(self.path)
        except GGUFFormatError as exc:
            raise ModelLoadError(f"{self.path} is not a readable GGUF file ({exc}); "
                                 "it may be truncated or corrupt, pull or copy it again") from exc
        self._check_complete()
        self.architecture = self.field("general.architecture")
        self.tensors = {t.name: t for t in self.header.tensors}

    def field(self, key: str, default=None):
        return self.header.field(key, default)

    def _check_complete(self) -> None:
        size = self.path.stat().st_size
        for t in self.header.tensors:
            end = t.data_offset + t.n_bytes
            if end > size:
                raise ModelLoadError(f"{self.path} is truncated: tensor {t.name!r} ends at byte {end:,} "
                                     f"but the file has {size:,} bytes; pull or copy it again")
            type_name = t.tensor_type.name
            if type_name not in SUPPORTED_TYPES:
                raise ModelLoadError(f"tensor {t.name!r} has type {type_name}, which effinfer cannot read; "
                                     f"supported: {', '.join(SUPPORTED_TYPES)}")

    def raw_tensor(self, name: str):
        """The tensor as stored: `.tensor_type`, `.shape` (GGUF order) and `.data` (memory-mapped blocks)."""
        return self.tensors[name]

    def arch_config(self) -> ArchConfig:
        arch = self.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
        return ArchConfig(**_common_fields(self, arch), **_family_fields(self, arch))

    def hf_tensor_types(self) -> dict[str, int]:
        """HF name -> GGML quantization type of every weight."""
        layer_names = _GEMMA3_LAYER_NAMES if self.architecture == "gemma3" else _LAYER_NAMES
        return {_hf_name(t.name, layer_names): t.tensor_type for t in self.header.tensors if t.name not in _SKIPPED}

    def iter_weights(self, show_progress: bool = True, keep_int4_blocks: bool = False) -> Iterator[tuple[str, object]]:
        """(HF name, fp32 tensor) for every weight, dequantized one at a time; with `keep_int4_blocks`,
        the decoder's Q4_0/Q4_1/Q4_K matrices come as `Int4Blocks` (their exact 4-bit values) instead."""
        import torch
        from gguf.quants import dequantize

        cfg_heads = (self.field(f"{self.architecture}.attention.head_count"),
                     self.field(f"{self.architecture}.attention.head_count_kv"))
        layer_names = _GEMMA3_LAYER_NAMES if self.architecture == "gemma3" else _LAYER_NAMES
        for t in progress(self.header.tensors, "dequantize", show_progress):
            if t.name in _SKIPPED:
                continue
            if keep_int4_blocks and t.name.startswith("blk.") and len(t.shape) == 2:
                from effinfer.compression.quant.gguf_blocks import INT4_EXACT, to_int4_blocks

                if t.tensor_type in INT4_EXACT:
                    cols, rows = (int(d) for d in t.shape)
                    blocks = to_int4_blocks(t.data, t.tensor_type, rows, cols)
                    yield _hf_name(t.name, layer_names), self._undo_conversion(t.name, blocks, cfg_heads)
                    continue
            array = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            array = np.ascontiguousarray(array, dtype=np.float32)
            if not array.flags.writeable:  # F32 tensors come back as views of the read-only memmap
                array = array.copy()
            tensor = torch.from_numpy(array)
            yield _hf_name(t.name, layer_names), self._undo_conversion(t.name, tensor, cfg_heads)

    def _undo_conversion(self, name: str, tensor, heads: tuple):
        if self.architecture in ("llama", "mistral") and re.search(r"\.attn_[qk]\.", name):
            num_heads = heads[0] if ".attn_q." in name else heads[1] or heads[0]
            if hasattr(tensor, "map_rows"):   # 4-bit blocks: permute the rows of values, scales and offsets alike
                return tensor.map_rows(lambda rows: _unpermute_rope_rows(rows, num_heads))
            return _unpermute_rope_rows(tensor, num_heads)
        if self.architecture == "gemma3" and "norm.weight" in name:
            return tensor - 1.0
        return tensor


def _hf_name(name: str, layer_names: dict) -> str:
    base, _, kind = name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    match = _BLOCK_RE.match(name)
    if match is None or match.group(2) not in layer_names:
        raise ModelLoadError(f"unexpected tensor {name!r} in GGUF file; effinfer does not know where it goes")
    return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}.{match.group(3)}"


def _unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute` (interleaved pairs -> rotate-half halves) on Q/K rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _common_fields(f: GGUFFile, arch: str) -> dict:
    key = lambda name, default=None: f.field(f"{arch}.{name}", default)  # noqa: E731
    hidden, num_heads = key("embedding_length"), key("attention.head_count")
    if hidden is None or num_heads is None or key("block_count") is None:
        raise ModelLoadError(f"{f.path} lacks the {arch}.* hyperparameters (embedding_length, head_count, block_count)")
    vocab = key("vocab_size") or f.tensors["token_embd.weight"].shape[-1]
    eos_ids = [f.field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return dict(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=num_heads,
        num_kv_heads=key("attention.head_count_kv") or num_heads,
        head_dim=key("attention.key_length") or hidden // num_heads,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=key("rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(f, key("rope.scaling.type"), key("rope.scaling.factor")),
        max_position_embeddings=key("context_length", 4096),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        bos_token_id=f.field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=sorted({i for i in eos_ids if i is not None}),
    )


def _family_fields(f: GGUFFile, arch: str) -> dict:
    num_layers = f.field(f"{arch}.block_count")
    window = f.field(f"{arch}.attention.sliding_window")
    if arch == "gemma3":
        # llama.cpp's defaults for Gemma 3: one global layer in six, local rope base 10k, and the
        # 27B (62 layers) scales queries by hidden/heads instead of head_dim
        head_dim = f.field("gemma3.attention.key_length")
        hidden, heads = f.field("gemma3.embedding_length"), f.field("gemma3.attention.head_count")
        return dict(
            hidden_act="gelu_pytorch_tanh",
            sliding_window=window,
            layer_types=[FULL_ATTENTION if (i + 1) % 6 == 0 else SLIDING_ATTENTION for i in range(num_layers)],
            rope_local_theta=10000.0,
            query_pre_attn_scalar=hidden // heads if num_layers == 62 else head_dim,
        )
    if window:
        return dict(sliding_window=window, layer_types=[SLIDING_ATTENTION] * num_layers)
    return {}


def _rope_scaling(f: GGUFFile, kind: str | None, factor: float | None) -> dict | None:
    factors = f.tensors.get("rope_freqs.weight")
    if factors is not None:  # Llama 3.x: the converter stores the per-frequency divisors as a tensor
        return {"rope_type": "freq_factors", "factors": np.array(factors.data, dtype=np.float32).tolist()}
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind != "linear":
        raise ModelLoadError(f"unsupported rope scaling {kind!r} in GGUF file; supported: linear "
                             "(and Llama 3 frequency factors via rope_freqs)")
    return {"rope_type": "linear", "factor": factor}
