"""GGUF loading on files written here with the `gguf` package: name mapping, llama.cpp's Q/K permutation
and Gemma norm offset undone (logits equal transformers'), quantized blocks, and clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from effinfer.engine.kv_cache import allocate_kv_cache
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.loader.gguf import GGUFFile
from effinfer.models import _build
from effinfer.utils import ModelLoadError
from tiny_models import tiny_hf_model

HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama Q/K rows (convert_hf_to_gguf.py `permute`)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, arch: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    norms = {"post_attention_layernorm": "post_attention_norm" if arch == "gemma3" else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm"}
    return f"blk.{layer}.{norms.get(module) or HF_TO_GGUF[module]}.{kind}"


def write_gguf(path, hf, arch: str, qtype=GGMLQuantizationType.F32, arch_name: str | None = None):
    cfg = hf.config
    writer = GGUFWriter(str(path), arch_name or arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else cfg.rope_parameters["full_attention"]["rope_theta"])
    if arch == "gemma3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = llama_cpp_permute(w, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        if arch == "gemma3" and "norm.weight" in name:
            w = w + 1.0
        if w.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name, arch), quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name, arch), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits_of(model, ids):
    allocate_kv_cache(model, 16, 4, torch.float32, "cpu")
    return ModelRunner(model, 4, "cpu").execute([ScheduledSeq(ids, 0, list(range(8)))])[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_f32_gguf_gives_transformers_logits(tmp_path, arch):
    # GGUF has no per-layer pattern key: Gemma 3 files imply one global layer in six, so use six layers
    hf = tiny_hf_model(arch, num_layers=6 if arch == "gemma3" else None)
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", hf, arch))
    model = _build(f.arch_config(), f.iter_weights(show_progress=False), torch.float32, "cpu")
    ids = list(range(3, 3 + 13))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits_of(model, ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0])
def test_quantized_blocks_dequantize_and_stay_reachable(tmp_path, qtype):
    hf = tiny_hf_model("llama")
    f = GGUFFile(write_gguf(tmp_path / "q.gguf", hf, "llama", qtype))
    raw = f.raw_tensor("blk.0.ffn_down.weight")
    assert raw.tensor_type == qtype and raw.data.dtype == np.uint8    # the blocks as stored
    weights = dict(f.iter_weights(show_progress=False))
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down, torch.from_numpy(dequantize(raw.data, qtype)))
    exact = hf.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert (down - exact).abs().max() < (0.02 if qtype == GGMLQuantizationType.Q8_0 else 0.2) * exact.abs().max()


def test_truncated_file_is_named(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", tiny_hf_model("llama"), "llama")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match="truncated|not a readable GGUF"):
        GGUFFile(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        GGUFFile(path)


def test_unsupported_architecture_lists_supported(tmp_path):
    f = GGUFFile(write_gguf(tmp_path / "a.gguf", tiny_hf_model("llama"), "llama", arch_name="falcon"))
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'falcon'; supported: llama"):
        f.arch_config()


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 18 * 8), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="IQ4_NL.*supported: F32"):
        GGUFFile(path)
