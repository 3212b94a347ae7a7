"""Tiny random-weight models of every family: logits allclose to transformers in fp32, through the
packed paged path, whole-prompt and chunked, loaded from a real HF folder (config.json + safetensors)."""

from __future__ import annotations

import pytest
import torch

from effinfer.engine.kv_cache import allocate_kv_cache
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.models import load_model
from tiny_models import VOCAB, save_tiny_folder

FAMILIES = ["llama", "qwen2", "gemma3"]
BLOCK = 4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_folder(request.param, folder)
    ours = load_model(str(folder), torch.float32, show_progress=False)
    allocate_kv_cache(ours.model, 32, BLOCK, torch.float32, "cpu")
    return hf, ours


def reference_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_whole_prompt_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = ModelRunner(ours.model, BLOCK, "cpu")
    input_ids, positions, meta, _ = runner.prepare([ScheduledSeq(ids, 0, [9, 2, 7, 4, 0, 5])])
    with torch.no_grad():
        logits = ours.model.compute_logits(ours.model(input_ids, positions, meta))
    torch.testing.assert_close(logits, reference_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_chunked_and_decode_logits_match(pair):
    """Prefill in uneven chunks over scattered blocks, then token-by-token decode (sliding window crossed)."""
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    reference = reference_logits(hf, ids)
    runner, table = ModelRunner(ours.model, BLOCK, "cpu"), [3, 11, 1, 8, 6]
    cuts = [0, 7, 10, 13, 14, 15, 16, 17, 18, 19, 20]
    for start, end in zip(cuts, cuts[1:]):
        logits = runner.execute([ScheduledSeq(ids[start:end], start, table)])
        torch.testing.assert_close(logits[0], reference[end - 1], atol=1e-4, rtol=1e-4)


def test_batched_sequences_match_singles(pair):
    """Three sequences packed in one step (ragged, no padding) give each one's own logits."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 12, 9)]
    tables = [[0, 1], [2, 3, 4], [5, 6, 7]]
    logits = ModelRunner(ours.model, BLOCK, "cpu").execute(
        [ScheduledSeq(p, 0, t) for p, t in zip(prompts, tables)])
    for row, prompt in zip(logits, prompts):
        torch.testing.assert_close(row, reference_logits(hf, prompt)[-1], atol=1e-4, rtol=1e-4)


def test_config_from_folder(pair):
    hf, ours = pair
    cfg = ours.config
    assert cfg.num_layers == hf.config.num_hidden_layers
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    assert cfg.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
