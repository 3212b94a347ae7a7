"""Tensor parallelism: how a model is split (heads, GQA replication, MLP columns on block boundaries, the vocabulary),
greedy outputs of 2 ranks identical to 1 in fp32 (tiny Llama, Qwen2 and Gemma 3, and SmolLM2, whose 9 heads over
3 KV heads split unevenly), quantized slices, and a worker that dies: a clear error, in process and in the engine
core process, never a hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.distributed.sharding import Shard, check_splittable
from effinfer.distributed.workers import WorkerFailed
from effinfer.loader.arch_config import ArchConfig
from tests.helpers import worker_pids
from tests.tiny_models import save_tiny_folder

COMMON = dict(dtype="float32", show_progress=False, num_blocks=64, max_num_seqs=8, max_model_len=256)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13] * 3, [20, 21, 22], list(range(30, 90))]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def arch(num_heads=9, num_kv_heads=3, intermediate=1536, vocab=49152, head_dim=64) -> ArchConfig:
    return ArchConfig("LlamaForCausalLM", vocab, num_heads * head_dim, intermediate, 2, num_heads, num_kv_heads,
                      head_dim, 1e-5, 10000.0, 2048)


# ---- the plan -----------------------------------------------------------------------------------------------
def test_heads_split_by_whole_gqa_groups_even_when_uneven():
    shards = [Shard.plan(arch(), rank, 2) for rank in range(2)]        # SmolLM2: 9 heads in 3 groups of 3
    assert [(s.q_heads, s.kv_heads) for s in shards] == [(range(0, 3), range(0, 1)), (range(3, 9), range(1, 3))]
    assert [s.local_config(arch()).num_heads for s in shards] == [3, 6]     # rank 0, which also samples, the less


def test_ranks_past_the_kv_heads_share_a_replicated_kv_head():
    shards = [Shard.plan(arch(14, 2, head_dim=64), rank, 4) for rank in range(4)]     # Qwen2.5-0.5B at TP=4
    assert [s.kv_heads for s in shards] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [s.q_heads for s in shards] == [range(0, 3), range(3, 7), range(7, 10), range(10, 14)]


def test_every_head_column_and_word_is_held_once():
    for size in (2, 3, 4):
        cfg = arch(12, 4, intermediate=96 * 7, vocab=1001)
        shards = [Shard.plan(cfg, rank, size) for rank in range(size)]
        assert sorted(h for s in shards for h in s.q_heads) == list(range(12))
        assert sorted(c for s in shards for c in s.mlp_columns) == list(range(96 * 7))
        assert sorted(v for s in shards for v in s.vocab_rows) == list(range(1001))
        assert all(s.mlp_columns.start % 32 == 0 for s in shards)      # no 4-bit block is cut
        assert {s.vocab_per_rank for s in shards} == {-(-1001 // size)}


@pytest.mark.parametrize("size, message", [(10, "exceeds the model's 9 attention heads"),
                                           (4, "not a multiple of them")])
def test_impossible_splits_are_refused_before_loading(size, message):
    with pytest.raises(ValueError, match=message):
        check_splittable(arch(9, 3), size)
    check_splittable(arch(9, 3), 9)                 # every rank one query head, three to a replicated KV head


def test_four_bit_blocks_split_between_groups_exactly():
    from effinfer.compression.quant.weight_only import Int4Blocks

    torch.manual_seed(0)
    blocks = Int4Blocks(torch.randint(0, 16, (8, 128), dtype=torch.uint8), torch.rand(8, 4), torch.randn(8, 4), 32)
    shard = Shard.plan(arch(2, 2, intermediate=128, head_dim=32), 1, 2)
    part = shard.slice_tensor("model.layers.0.mlp.down_proj.weight", blocks)
    assert isinstance(part, Int4Blocks) and part.shape == (8, 64)
    assert torch.equal(part.dequantize(), blocks.dequantize()[:, 64:])
    rows = shard.slice_tensor("model.layers.0.mlp.up_proj.weight", blocks.map_rows(lambda t: t.repeat(16, 1)))
    assert rows.shape == (64, 128)


def test_the_vocabulary_is_padded_to_equal_slices():
    shard = Shard.plan(arch(vocab=5), 1, 2)
    embedding = torch.arange(5.0)[:, None].repeat(1, 4)
    part = shard.slice_tensor("model.embed_tokens.weight", embedding)
    assert part.shape == (3, 4) and part[:, 0].tolist() == [3.0, 4.0, 0.0]


# ---- identity with one rank ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    save_tiny_folder(request.param, path)
    return path


def greedy(model: str, tensor_parallel_size: int, prompts=PROMPTS, params=GREEDY, **options) -> list[list[int]]:
    llm = LLM(model, tensor_parallel_size=tensor_parallel_size, **options)
    try:
        return [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.close()


def test_two_ranks_give_one_rank_greedy_outputs_in_fp32(tiny_folder):
    assert greedy(str(tiny_folder), 2, **COMMON) == greedy(str(tiny_folder), 1, **COMMON)


def test_three_ranks_pad_the_vocabulary_and_share_one_kv_head(tmp_path):
    """Gemma 3 tiny at 3 ranks: 256 words in 3 slices of 86 (the last padded), one KV head replicated on all three,
    its 4 query heads split 1 + 1 + 2."""
    save_tiny_folder("gemma3", tmp_path)
    assert greedy(str(tmp_path), 3, **COMMON) == greedy(str(tmp_path), 1, **COMMON)


def test_smollm2_split_unevenly_gives_the_same_greedy_text(smollm2_path):
    options = dict(dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.05, max_num_seqs=4)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert greedy(str(smollm2_path), 2, prompts, params, **options) == greedy(str(smollm2_path), 1, prompts, params, **options)


def scores(model: str, tensor_parallel_size: int, token_ids: list[int], **options) -> torch.Tensor:
    llm = LLM(model, tensor_parallel_size=tensor_parallel_size, **options)
    try:
        return llm.score(token_ids)
    finally:
        llm.close()


@pytest.mark.parametrize("quantization, bound", [("int4", 0.1), ("int8", 1.5)])
def test_quantized_layers_split_along_the_same_lines(llama_folder, quantization, bound):
    """Each rank quantizes its slice as it streams in. int4 groups (32 along the input) are cut whole: the same
    values, so the split model's log-probabilities stay within a tenth of what quantizing moved them. int8 scales
    each rank's part of an o_proj/down_proj row by that part's own maximum: another int8 rounding of the same model,
    about as far from one rank's as that is from fp32."""
    token_ids = list(range(5, 120))
    exact = scores(str(llama_folder), 1, token_ids, **COMMON)
    one = scores(str(llama_folder), 1, token_ids, **COMMON, quantization=quantization)
    two = scores(str(llama_folder), 2, token_ids, **COMMON, quantization=quantization)
    split_error, quant_error = (two - one).abs().mean(), (one - exact).abs().mean()
    assert split_error < bound * quant_error, (float(split_error), float(quant_error))
    assert (two.argmax(-1) == one.argmax(-1)).float().mean() >= 0.95


def test_what_a_split_model_cannot_run_yet_is_refused(tiny_folder):
    with pytest.raises(ValueError, match="does not combine with speculative_method=self"):
        LLM(str(tiny_folder), tensor_parallel_size=2, speculative_method="self", **COMMON)
    with pytest.raises(ValueError, match="drop --compile"):
        LLM(str(tiny_folder), tensor_parallel_size=2, compile=True, **COMMON)


# ---- a worker that dies ---------------------------------------------------------------------------------------
def test_a_dead_worker_fails_the_step_with_its_rank_and_exit_code(llama_folder):
    llm = LLM(str(llama_folder), tensor_parallel_size=2, **COMMON)
    try:
        llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), "r")
        llm.engine.step()
        [worker] = worker_pids(os.getpid())
        os.kill(worker, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerFailed, match=r"worker rank 1 exited with code -9"):
            while llm.engine.has_unfinished():
                llm.engine.step()
        assert time.monotonic() - started < 30
        with pytest.raises(WorkerFailed, match="rank 1 exited"):       # dead from then on, at once
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished()                         # generate aborted what it added
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks   # nothing held
    finally:
        llm.close()


def test_the_core_process_fails_its_requests_and_exits_when_a_worker_dies(llama_folder):
    llm = LLM(str(llama_folder), engine_process=True, tensor_parallel_size=2, **COMMON)
    try:
        assert greedy_in(llm) == greedy(str(llama_folder), 1, **COMMON)
        llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), "r")
        llm.engine.step()
        [worker] = worker_pids(llm.engine.pid)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="worker rank 1 exited with code -9"):
            deadline = time.monotonic() + 60
            while llm.engine.has_unfinished() and time.monotonic() < deadline:
                for output in llm.engine.step():
                    assert not output.finished or output.outputs[0].finish_reason != "length"
        core = llm.engine._core.process
        core.join(timeout=30)
        assert core.exitcode == 1
    finally:
        llm.close()


def test_a_worker_that_dies_while_idle_takes_the_core_down_at_once(llama_folder):
    """Not at the next request: an idle core notices within a heartbeat, so /health turns 503 and the server restarts it."""
    llm = LLM(str(llama_folder), engine_process=True, tensor_parallel_size=2, **COMMON)
    try:
        [worker] = worker_pids(llm.engine.pid)
        os.kill(worker, signal.SIGKILL)
        core = llm.engine._core.process
        core.join(timeout=15)
        assert core.exitcode == 1
    finally:
        llm.close()


def greedy_in(llm) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_closing_stops_the_workers(llama_folder):
    from effinfer.distributed import sharding, shm

    llm = LLM(str(llama_folder), tensor_parallel_size=2, **COMMON)
    assert (sharding._shared_memory is not None) == shm.available()    # ranks on one x86 host skip gloo's TCP
    [worker] = worker_pids(os.getpid())
    llm.close()
    assert sharding._shared_memory is None
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}") or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
