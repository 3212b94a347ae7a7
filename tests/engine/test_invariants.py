"""Exact engine invariants on the real default model in fp32 with greedy decoding."""

from __future__ import annotations

import pytest

from effinfer import SamplingParams
from helpers import make_engine, run_to_completion

PROMPTS = [
    "The capital of France is",
    "Write a Python function that reverses a string.",
    "List three colors:",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Question: what is 12 times 12? Answer:",
    "Once upon a time",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def generate(engine, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    finals = run_to_completion(engine)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [finals[str(i)].token_ids for i in range(len(prompts))]


@pytest.fixture(scope="module")
def singles(smollm2_fp32):
    return [generate(make_engine(smollm2_fp32, enable_prefix_caching=False), [p])[0] for p in PROMPTS]


def test_batch_equals_singles(smollm2_fp32, singles):
    assert generate(make_engine(smollm2_fp32, enable_prefix_caching=False)) == singles


def test_chunked_prefill_equals_unchunked(smollm2_fp32, singles):
    engine = make_engine(smollm2_fp32, max_num_batched_tokens=5, enable_prefix_caching=False)
    assert generate(engine) == singles


def test_prefix_cache_on_equals_off(smollm2_fp32, singles):
    engine = make_engine(smollm2_fp32, block_size=4)
    shared = "You are a careful assistant. Answer briefly and precisely. "
    prompts = [shared + p for p in PROMPTS]
    off = generate(make_engine(smollm2_fp32, block_size=4, enable_prefix_caching=False), prompts)
    first = generate(engine, prompts)          # hits between requests of the same batch
    again = generate(engine, prompts)          # hits on blocks freed by the first batch
    assert first == off and again == off
    assert engine.block_manager.num_hit_tokens > 0


def test_preempted_request_resumes_with_identical_output(smollm2_fp32, singles):
    engine = make_engine(smollm2_fp32, block_size=4, num_blocks=24)   # 96 slots for ~6 x 35 tokens
    assert generate(engine) == singles
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_same_in_any_batch(smollm2_fp32):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = generate(make_engine(smollm2_fp32), [PROMPTS[0]], params)[0]
    engine = make_engine(smollm2_fp32)
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=5, temperature=1.0), request_id="other")
    mixed = generate(engine, [PROMPTS[0]], params)[0]
    assert alone == mixed
    different = generate(make_engine(smollm2_fp32), [PROMPTS[0]], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert different[0] != alone


def test_abort_returns_every_block(smollm2_fp32):
    engine = make_engine(smollm2_fp32)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, request_id=str(i))
    engine.step()
    engine.step()
    for i in range(0, len(PROMPTS), 2):
        engine.abort(str(i))
    run_to_completion(engine)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_stop_string_is_cut_across_tokens(smollm2_fp32):
    engine = make_engine(smollm2_fp32)
    full = generate(engine, [PROMPTS[3]])[0]
    text = engine.tokenizer.decode(full)
    stop = text[5:12]          # a stop string that most likely straddles token boundaries
    engine.add_request(PROMPTS[3], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]), request_id="s")
    out = run_to_completion(engine)["s"]
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_streamed_deltas_add_up_to_the_text(smollm2_fp32):
    engine = make_engine(smollm2_fp32)
    engine.add_request("Write some emoji and accented words: ", SamplingParams(max_tokens=40, temperature=0.8, seed=3,
                                                                             stop=["zzz"]), request_id="x")
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert "".join(pieces) == final.text == engine.tokenizer.decode(final.token_ids)
    assert "\ufffd" not in "".join(pieces)


def test_prompt_too_long_is_a_clear_error(smollm2_fp32):
    engine = make_engine(smollm2_fp32, max_model_len=64)
    with pytest.raises(ValueError, match="shorten the prompt"):
        engine.add_request(list(range(1, 100)), GREEDY)
    assert not engine.has_unfinished()


def test_prompt_logprobs_match_a_full_forward_and_survive_chunking(smollm2_fp32):
    import torch

    from effinfer.engine.model_runner import ScheduledSeq

    prompt = PROMPTS[3]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    whole = make_engine(smollm2_fp32)
    ids = whole.tokenizer.encode(prompt)
    logits = whole.runner.execute([ScheduledSeq(ids, 0, list(range(4)), all_logits=True)])
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    for engine in (make_engine(smollm2_fp32), make_engine(smollm2_fp32, max_num_batched_tokens=4)):
        engine.add_request(prompt, params, request_id="p")
        out = run_to_completion(engine)["p"]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert all(len(lp.top) == 2 for lp in out.prompt_logprobs[1:])


def test_n_samples_share_the_prompt_blocks(smollm2_fp32):
    from effinfer.llm import LLM

    llm = LLM.from_engine(make_engine(smollm2_fp32, block_size=4))
    prompt = "You are a careful assistant. Answer briefly and precisely. " + PROMPTS[1]
    result = llm.generate(prompt, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=5), use_tqdm=False)[0]
    assert len(result.outputs) == 4 and len({tuple(o.token_ids) for o in result.outputs}) > 1
    num_prompt_blocks = (len(result.prompt_token_ids) - 1) // 4
    assert llm.engine.block_manager.num_hit_tokens == 3 * num_prompt_blocks * 4   # samples 2..4 reuse sample 1's blocks


def test_bfloat16_agrees_with_float32(smollm2_path, smollm2_fp32):
    import torch

    from effinfer.models import load_model

    bf16 = load_model(str(smollm2_path), torch.bfloat16, show_progress=False)
    rows = []
    for loaded in (smollm2_fp32, bf16):
        engine = make_engine(loaded, dtype="bfloat16" if loaded is bf16 else "float32")
        rows.append(torch.stack([engine.runner.execute([_prompt_seq(engine, p)])[0] for p in PROMPTS]))
    fp32, low = rows
    # bf16 may swap a near-tie (AMX and AVX-512 round differently): what it picks is at most a rounding below the best
    shortfall = fp32.max(-1).values - fp32.gather(-1, low.argmax(-1, keepdim=True)).squeeze(-1)
    assert float(shortfall.max()) < 0.5, shortfall
    kl = torch.nn.functional.kl_div(low.log_softmax(-1), fp32.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl < 0.02


def _prompt_seq(engine, prompt):
    from effinfer.engine.model_runner import ScheduledSeq

    ids = engine.tokenizer.encode(prompt)
    return ScheduledSeq(ids, 0, list(range(-(-len(ids) // engine.config.cache.block_size))))


def test_generate_rejects_a_batch_with_one_bad_prompt_before_queueing(smollm2_fp32):
    from effinfer.llm import LLM

    llm = LLM.from_engine(make_engine(smollm2_fp32, max_model_len=64))
    with pytest.raises(ValueError, match="shorten the prompt"):
        llm.generate(["fine", list(range(1, 100))], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()
