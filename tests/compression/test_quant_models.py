"""Quantized real models: quality within bounds, memory really down, the config and CLI wired."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effinfer import LLM, SamplingParams
from effinfer.bench import quality
from effinfer.bench.systems import EngineSystem
from effinfer.layers.linear import QuantLinear

TEXT_TOKENS = 1024
SUBJECTS = ["The river", "A young farmer", "The old library", "Our small company", "The city council", "A travelling musician"]
VERBS = ["crossed the valley before", "bought three horses after", "opened its doors during", "lost most of its money in",
         "voted against the new road in", "played for the king before"]
TIMES = ["the long winter of 1845", "a storm that lasted nine days", "the harvest festival", "the great fire",
         "the election", "the war ended"]
FALLBACK_TEXT = " ".join(f"{SUBJECTS[i % 6]} {VERBS[(i * 5) % 6]} {TIMES[(i * 7) % 6]}, and {i % 13 + 2} people "
                         f"remembered it {['fondly', 'with anger', 'for years', 'only vaguely'][i % 4]}."
                         for i in range(160))


@pytest.fixture(scope="module")
def text_windows(smollm2_path):
    from pathlib import Path

    llm_tokenizer = LLM(str(smollm2_path), show_progress=False, kv_cache_memory_gb=0.05).tokenizer
    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-valid.tokens.txt"
    text = path.read_text()[:20000] if path.is_file() else FALLBACK_TEXT    # CI has no ../shared
    return quality.windows(llm_tokenizer.encode(text), 512, 256, TEXT_TOKENS)


def _system(path, **kwargs):
    return EngineSystem(LLM(str(path), show_progress=False, kv_cache_memory_gb=0.1, **kwargs))


@pytest.fixture(scope="module")
def bf16(smollm2_path, text_windows):
    system = _system(smollm2_path, quantization="none")
    return system, quality.perplexity(system, text_windows)["perplexity"]


@pytest.mark.parametrize("options, max_ppl_ratio, max_weight_ratio", [
    ({"quantization": "int8"}, 1.01, 0.55),
    ({"quantization": "int4"}, 1.05, 0.40),
    ({"quantization": "gguf"}, 1.05, 0.40),
])
def test_quantized_quality_and_memory(smollm2_path, text_windows, bf16, options, max_ppl_ratio, max_weight_ratio):
    base, base_ppl = bf16
    system = _system(smollm2_path, **options)
    ppl = quality.perplexity(system, text_windows)["perplexity"]
    assert base_ppl * 0.99 < ppl < base_ppl * max_ppl_ratio
    assert system.weight_bytes() < base.weight_bytes() * max_weight_ratio
    model = system.llm.engine.model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())      # no full-precision matrix kept
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 4 + 1
    div = quality.divergence(base, system, text_windows[:1])
    assert div["greedy_agreement"] > 0.85


def test_gguf_blocks_equal_rtn_int4_of_the_same_values(smollm2_path):
    """SmolLM2 ships Q4_1: exact repacking and RTN int4 g32 of the dequantized values score alike."""
    gguf, rtn = _system(smollm2_path, quantization="gguf"), _system(smollm2_path, quantization="int4")
    ids = gguf.tokenizer.encode("The history of the Roman empire begins with the founding of the city")
    assert torch.allclose(gguf.score(ids), rtn.score(ids), atol=0.15)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    assert gguf.llm.generate(["Paris is"], params, use_tqdm=False)[0].text


def test_bad_quantization_settings_are_named(smollm2_path):
    with pytest.raises(ValueError, match="quantization='int3' is not supported"):
        LLM(str(smollm2_path), quantization="int3")
    with pytest.raises(ValueError, match="group_size=48"):
        LLM(str(smollm2_path), quantization="int4", group_size=48)
    with pytest.raises(ValueError, match="does not divide"):
        LLM(str(smollm2_path), quantization="int4", group_size=128, show_progress=False)
