"""Scheduler on toy shapes: token budgets, chunked prefill, priorities, preemption order."""

from __future__ import annotations

from effinfer.engine.block_manager import BlockManager
from effinfer.engine.request import Request, RequestStatus
from effinfer.engine.scheduler import Scheduler
from effinfer.sampling_params import SamplingParams


def make(num_blocks=16, block_size=4, budget=16, max_seqs=8, chunked=True):
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, budget, 1000, chunked)


def req(rid, n, priority=0, t=0.0, max_tokens=100):
    return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=max_tokens), [0], priority, t)


def step(s, sampled_token=1):
    out = s.schedule()
    done_prompts = {r.request_id: [sampled_token] for r in out.requests
                    if r.num_computed_tokens + out.num_new_tokens[r.request_id] == r.num_tokens}
    s.update(out, done_prompts)
    return out


def test_budget_splits_long_prompt_into_chunks():
    s = make(budget=8)
    s.add(req("a", 20))
    assert step(s).num_new_tokens == {"a": 8}
    assert step(s).num_new_tokens == {"a": 8}
    assert step(s).num_new_tokens == {"a": 4}
    assert s.running[0].output_ids == [1]
    assert step(s).num_new_tokens == {"a": 1}


def test_decodes_first_then_new_prompt_chunks_fill_the_budget():
    s = make(budget=8)
    s.add(req("a", 3, t=0))
    step(s)                                   # a prefilled
    s.add(req("b", 20, t=1))
    assert step(s).num_new_tokens == {"a": 1, "b": 7}


def test_without_chunked_prefill_a_long_prompt_waits():
    s = make(budget=8, chunked=False)
    s.add(req("a", 20))
    assert step(s).is_empty


def test_max_num_seqs():
    s = make(max_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}", 2, t=i))
    assert list(step(s).num_new_tokens) == ["r0", "r1"]


def test_priority_orders_waiting_requests():
    s = make(max_seqs=1)
    s.add(req("late_low", 2, priority=5, t=0))
    s.add(req("high", 2, priority=0, t=1))
    assert list(step(s).num_new_tokens) == ["high"]


def test_preempts_lowest_priority_latest_and_resumes_it():
    # 4 blocks of 2 tokens; three requests of 2 prompt tokens each fill 3 blocks
    s = make(num_blocks=4, block_size=2, budget=16)
    for i, rid in enumerate(["a", "b", "c"]):
        s.add(req(rid, 2, t=i))
    step(s)                                   # prefill all three; each now has 3 tokens
    out = step(s)                             # a, b need a 2nd block; only one free -> c preempted
    assert [r.request_id for r in out.preempted] == ["c"]
    assert out.num_new_tokens == {"a": 1, "b": 1}
    c = s.waiting[0]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.block_ids == []
    assert c.output_ids == [1]                # kept: recomputed from prompt + output on resume
    assert s.block_manager.num_free_blocks == 0


def test_request_that_cannot_fit_the_whole_cache_finishes_with_length():
    s = make(num_blocks=2, block_size=2, budget=16)
    s.add(req("a", 3))
    step(s)                                   # 3 prompt tokens computed, 1 sampled
    step(s)                                   # token 4 computed: the 2 blocks are full, 5 tokens now
    out = step(s)                             # token 5 needs a 3rd block that does not exist
    assert [r.request_id for r in out.finished] == ["a"]
    assert out.finished[0].finish_reason == "length"
    assert s.block_manager.num_free_blocks == 2 and not s.has_unfinished()


def test_max_tokens_finishes_and_frees():
    s = make()
    s.add(req("a", 2, max_tokens=2))
    step(s)
    step(s)
    assert not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 16
