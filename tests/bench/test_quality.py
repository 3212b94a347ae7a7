"""Perplexity, KL divergence and agreement against direct computations with transformers."""

from __future__ import annotations

import math

import pytest
import torch

from effinfer.bench import quality
from effinfer.llm import LLM
from helpers import make_engine, one_gguf_parse

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
        "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
        "world, a title it held for 41 years until the Chrysler Building in New York City was finished in 1930.")


def test_windows_score_every_token_once():
    wins = quality.windows(list(range(100)), window=40, stride=25)
    scored = [w.token_ids[i] for w in wins for i in range(w.first_scored, len(w.token_ids))]
    assert scored == list(range(1, 100))
    assert all(len(w.token_ids) <= 40 for w in wins)
    with pytest.raises(ValueError):
        quality.windows(list(range(10)), window=4, stride=5)


def test_perplexity_matches_transformers(smollm2_path, smollm2_fp32):
    import transformers

    llm = LLM.from_engine(make_engine(smollm2_fp32, max_num_batched_tokens=16))    # scoring spans chunks
    ids = llm.tokenizer.encode(TEXT)
    ours = quality.perplexity(llm, quality.windows(ids, window=len(ids), stride=len(ids)))
    with one_gguf_parse():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert ours["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert ours["scored_tokens"] == len(ids) - 1


def test_divergence_zero_against_itself_and_small_for_bf16(smollm2_path, smollm2_fp32):
    from effinfer.models import load_model

    fp32 = LLM.from_engine(make_engine(smollm2_fp32))
    wins = quality.windows(fp32.tokenizer.encode(TEXT), window=48, stride=24)
    same = quality.divergence(fp32, fp32, wins)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-6) and same["greedy_agreement"] == 1.0
    bf16 = LLM.from_engine(make_engine(load_model(str(smollm2_path), torch.bfloat16, show_progress=False),
                                       dtype="bfloat16"))
    diff = quality.divergence(fp32, bf16, wins)
    assert 0.0 < diff["kl_divergence"] < 0.05 and diff["greedy_agreement"] > 0.85
