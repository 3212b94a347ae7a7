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


def assert_header_matches_gguf_reader(path, nested: tuple[str, ...] = ()):
    """Every metadata value and tensor record as `gguf.GGUFReader` reads them (but the `nested` arrays of
    arrays, which the reader flattens)."""
    from gguf import GGUFReader

    header, reader = GGUFFile(path).header, GGUFReader(path)
    assert list(header.fields) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key not in nested:
            assert header.field(key) == field.contents(), key
    assert len(header.tensors) == len(reader.tensors)
    for ours, theirs in zip(header.tensors, reader.tensors):
        assert (ours.name, ours.tensor_type, ours.n_elements, ours.n_bytes, ours.data_offset) == \
            (theirs.name, theirs.tensor_type, theirs.n_elements, theirs.n_bytes, theirs.data_offset)
        assert ours.shape.tolist() == theirs.shape.tolist()
        assert ours.data.dtype == theirs.data.dtype and np.array_equal(ours.data, theirs.data), ours.name


def test_header_reads_every_value_type_as_gguf_reader_does(tmp_path):
    from gguf import GGUFValueType

    path = tmp_path / "types.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 0.5)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁wörld")
    writer.add_array("t.strings", ["a", "", "ü▁", "<|im_end|>"] * 50)
    writer.add_array("t.floats", [0.25, -1.5, 3.0])
    writer.add_key_value("t.nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    writer.add_array("t.empty", [])
    writer.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b.weight", np.arange(6, dtype=np.float16).reshape(2, 3))
    writer.add_tensor("c.weight", quantize(np.ones((2, 64), np.float32), GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_header_matches_gguf_reader(path, nested=("t.nested",))
    f = GGUFFile(path)
    assert f.field("t.strings")[:4] == ["a", "", "ü▁", "<|im_end|>"] and f.field("t.nested") == [[1, 2], [3]]


def test_header_of_a_real_model_matches_gguf_reader(smollm2_path):
    assert_header_matches_gguf_reader(smollm2_path)


@pytest.mark.parametrize("cut", [3, 20, 100, 2000])
def test_a_header_cut_short_is_not_readable(tmp_path, cut):
    path = write_gguf(tmp_path / "t.gguf", tiny_hf_model("llama"), "llama")
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ModelLoadError, match="not a readable GGUF|is truncated"):
        GGUFFile(path)


def test_an_impossible_array_length_is_not_readable(tmp_path):
    path = tmp_path / "huge.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_array("t.strings", ["x"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    count_at = data.index(b"t.strings") + len("t.strings") + 4 + 4   # key, value type, item type
    data[count_at:count_at + 8] = (2**60).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not fit in the file"):
        GGUFFile(path)
