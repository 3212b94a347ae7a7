"""Pipeline parallelism: how a model is cut into stages (contiguous layers, Gemma 3's layer types kept, checkpoint
names renamed), how a step is cut into micro-batches, greedy outputs of 2 stages identical to 1 in fp32 (tiny Llama,
Qwen2 and Gemma 3, and SmolLM2; one micro-batch and several; embeddings too), in process and in the engine core
process, and a stage worker that dies: a clear error naming its rank, its requests ended, no hang."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.config import EngineConfig
from effinfer.distributed.pipeline import split_microbatches
from effinfer.distributed.stages import Stage
from effinfer.distributed.workers import WorkerFailed
from effinfer.engine.model_runner import ScheduledSeq
from effinfer.loader.arch_config import ArchConfig
from tests.helpers import worker_pids
from tests.tiny_models import save_tiny_folder

COMMON = dict(dtype="float32", show_progress=False, num_blocks=64, max_num_seqs=8, max_model_len=256)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13] * 3, [20, 21, 22], list(range(30, 90)), [7, 7, 7, 7, 7]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def arch(num_layers: int, layer_types: list[str] | None = None) -> ArchConfig:
    return ArchConfig("Gemma3ForCausalLM", 256, 64, 96, num_layers, 4, 1, 32, 1e-6, 10000.0, 512,
                      layer_types=layer_types or [], sliding_window=8 if layer_types else None)


# ---- the plan -----------------------------------------------------------------------------------------------
def test_stages_are_contiguous_near_even_layer_ranges_with_rank_0_the_shorter():
    assert [Stage.plan(arch(5), rank, 2).layers for rank in range(2)] == [range(0, 2), range(2, 5)]
    assert [Stage.plan(arch(7), rank, 3).layers for rank in range(3)] == [range(0, 2), range(2, 4), range(4, 7)]
    assert [Stage.plan(arch(4), rank, 4).layers for rank in range(4)] == [range(i, i + 1) for i in range(4)]


def test_a_stage_keeps_each_layers_type_and_takes_only_its_layers_tensors_renamed():
    types = ["sliding_attention"] * 5 + ["full_attention"]
    stage = Stage.plan(arch(6, types), 1, 2)
    local = stage.local_config(arch(6, types))
    assert (local.num_layers, local.layer_types) == (3, ["sliding_attention", "sliding_attention", "full_attention"])
    stream = [("model.embed_tokens.weight", 0), ("model.layers.2.mlp.up_proj.weight", 1),
              ("model.layers.3.self_attn.q_proj.weight", 2), ("model.layers.5.post_attention_layernorm.weight", 3),
              ("model.norm.weight", 4)]
    assert list(stage.weights(stream)) == [
        ("model.embed_tokens.weight", 0), ("model.layers.0.self_attn.q_proj.weight", 2),
        ("model.layers.2.post_attention_layernorm.weight", 3), ("model.norm.weight", 4)]
    assert stage.local_name("model.layers.13.mlp.gate_up_proj") is None     # a GGUF layer plan is renamed alike


def test_more_stages_than_layers_are_refused_before_any_worker_starts(tmp_path):
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 exceeds the model's 3 decoder layers"):
        Stage.plan(arch(3), 0, 4)
    save_tiny_folder("gemma3", tmp_path)
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 exceeds the model's 3 decoder layers"):
        LLM(str(tmp_path), pipeline_parallel_size=4, **COMMON)
    assert worker_pids(os.getpid()) == []


def seqs_of(*num_tokens: int) -> list[ScheduledSeq]:
    return [ScheduledSeq(list(range(n)), 0, [0]) for n in num_tokens]


def test_micro_batches_are_contiguous_runs_of_near_equal_tokens():
    assert split_microbatches(seqs_of(*[1] * 8), 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert split_microbatches(seqs_of(500, 1, 1, 1), 2) == [range(0, 1), range(1, 4)]     # a long prefill alone
    assert split_microbatches(seqs_of(1, 1), 4) == [range(0, 1), range(1, 2)]             # never an empty one
    assert split_microbatches(seqs_of(3, 9), 1) == [range(0, 2)]


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel_size=2), "do not combine yet; choose one"),
    (dict(compile=True), "pipeline_parallel_size=2 runs decode steps eagerly; drop --compile"),
    (dict(speculative_method="self"), "does not combine with speculative_method=self"),
    (dict(prune="magnitude"), "does not combine with prune"),
    (dict(pipeline_microbatches=0), "pipeline_microbatches=0 must be at least 1")])
def test_what_a_pipeline_cannot_run_yet_is_refused_before_loading(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs(pipeline_parallel_size=2, **options)


# ---- identity with one process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny_folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-pp-{request.param}")
    save_tiny_folder(request.param, path)
    return path


def greedy_in(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]


def greedy(model: str, prompts=PROMPTS, params=GREEDY, **options) -> list[list[int]]:
    llm = LLM(model, **options)
    try:
        return greedy_in(llm, prompts, params)
    finally:
        llm.close()


def test_two_stages_give_one_process_greedy_outputs_in_fp32(tiny_folder):
    """Several prompts of different lengths prefill in one step, cut into 2 micro-batches (the default: one per
    stage), then decode together; Gemma 3's 3 layers split 1 + 2, a sliding layer then a global one on rank 1."""
    assert greedy(str(tiny_folder), pipeline_parallel_size=2, **COMMON) == greedy(str(tiny_folder), **COMMON)


def test_three_stages_pass_each_micro_batch_through_a_middle_stage(tmp_path):
    """With 3 stages rank 1 receives from rank 0 and sends to rank 2 (with 2, "next" and "back to rank 0" coincide):
    Gemma 3's 3 layers, one a stage, sliding, sliding, global."""
    save_tiny_folder("gemma3", tmp_path)
    options = {**COMMON, "pipeline_microbatches": 3}
    assert greedy(str(tmp_path), pipeline_parallel_size=3, **options) == greedy(str(tmp_path), **COMMON)


@pytest.mark.parametrize("microbatches", [1, 3])
def test_any_number_of_micro_batches_gives_the_same_outputs_scores_and_embeddings(llama_folder, microbatches):
    """Embeddings pool every row of the last stage; scores take logits at every position."""
    token_ids = list(range(5, 120))
    llm = LLM(str(llama_folder), pipeline_parallel_size=2, pipeline_microbatches=microbatches, **COMMON)
    try:
        outputs, vectors, scores = greedy_in(llm), llm.embed(PROMPTS), llm.score(token_ids)
    finally:
        llm.close()
    one = LLM(str(llama_folder), **COMMON)
    assert outputs == greedy_in(one)
    torch.testing.assert_close(torch.tensor(vectors), torch.tensor(one.embed(PROMPTS)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, one.score(token_ids), rtol=1e-5, atol=1e-5)


def test_smollm2_in_two_stages_gives_the_same_greedy_text(smollm2_path):
    options = dict(dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.05, max_num_seqs=4)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert greedy(str(smollm2_path), prompts, params, pipeline_parallel_size=2, **options) == \
        greedy(str(smollm2_path), prompts, params, **options)


def test_the_engine_core_process_runs_the_pipeline_and_exits_when_a_stage_dies(llama_folder):
    llm = LLM(str(llama_folder), engine_process=True, pipeline_parallel_size=2, **COMMON)
    try:
        assert greedy_in(llm) == greedy(str(llama_folder), **COMMON)
        llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), "r")
        llm.engine.step()
        [worker] = worker_pids(llm.engine.pid)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="worker rank 1 exited with code -9"):
            deadline = time.monotonic() + 30
            while llm.engine.has_unfinished() and time.monotonic() < deadline:
                llm.engine.step()
        core = llm.engine._core.process
        core.join(timeout=30)
        assert core.exitcode == 1
    finally:
        llm.close()


# ---- a stage that dies -----------------------------------------------------------------------------------------
def test_a_dead_stage_fails_the_step_with_its_rank_and_frees_every_block(llama_folder):
    llm = LLM(str(llama_folder), pipeline_parallel_size=2, **COMMON)
    try:
        for i, prompt in enumerate(PROMPTS):
            llm.engine.add_request(prompt, SamplingParams(max_tokens=200, ignore_eos=True), f"r{i}")
        llm.engine.step()
        [worker] = worker_pids(os.getpid())
        os.kill(worker, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerFailed, match=r"pipeline-parallel step failed: worker rank 1 exited with code -9"):
            while llm.engine.has_unfinished():
                llm.engine.step()
        assert time.monotonic() - started < 10
        assert not llm.engine.has_unfinished()
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        with pytest.raises(WorkerFailed, match="rank 1 exited"):       # dead from then on, at once
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.close()
