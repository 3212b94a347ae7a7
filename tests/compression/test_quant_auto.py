"""`quantization=auto` (the default): a GGUF file of quantized blocks keeps them where the CPU has the vector
units for the kernels; float files, folders, other devices and CPUs without AVX2 run the model dtype."""

from __future__ import annotations

import pytest
import torch

from effinfer.compression.quant import choose_automatically

Q4_1, Q6_K, F16, F32 = 3, 14, 1, 0
QUANTIZED = {"model.layers.0.self_attn.q_proj.weight": Q4_1, "model.layers.0.mlp.down_proj.weight": Q6_K,
             "model.layers.0.input_layernorm.weight": F32, "model.embed_tokens.weight": Q6_K}


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_quantized_gguf_keeps_its_blocks_on_a_vector_cpu(monkeypatch, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    chosen, why = choose_automatically(QUANTIZED, "cpu")
    assert chosen == "gguf" and "--quantization none" in why


@pytest.mark.parametrize("types, device, capability, reason", [
    (None, "cpu", "AVX512", "float checkpoint"),
    ({**QUANTIZED, "model.layers.0.self_attn.k_proj.weight": F16}, "cpu", "AVX512", "not all quantized"),
    (QUANTIZED, "cuda:0", "AVX512", "cuda:0"),
    (QUANTIZED, "cpu", "DEFAULT", "lacks AVX2"),
])
def test_everything_else_runs_the_model_dtype(monkeypatch, types, device, capability, reason):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    chosen, why = choose_automatically(types, device)
    assert chosen is None and reason in why


def test_the_default_engine_says_what_it_chose(smollm2_path):
    from effinfer.llm import LLM

    llm = LLM(str(smollm2_path), show_progress=False, kv_cache_memory_gb=0.02)
    expected = "gguf" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None
    assert llm.engine.config.quant.quantization == expected
    assert f"quantization=auto chose {expected or 'none'}" in llm.engine.summary
    plain = LLM(str(smollm2_path), show_progress=False, kv_cache_memory_gb=0.02, quantization="none")
    assert plain.engine.config.quant.quantization is None and plain.engine.summary.startswith("weights bfloat16")
