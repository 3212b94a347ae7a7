"""Speculative decoding: the n-gram proposer, lossless verification (exact greedy tokens, the target's
distribution when sampling), and the engine path: batched, every draft length, stops and back-off."""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.decoding.spec import PROPOSERS, get_proposer
from effinfer.decoding.spec.verify import verify
from tiny_models import save_tiny_folder


def test_ngram_proposes_what_followed_the_latest_match():
    proposer = get_proposer("ngram", min_n=1, max_n=3)
    ids = [1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3, 4]
    assert proposer.propose(ids, 3) == [7, 8, 2]          # latest earlier "2 3 4" is followed by 7 8 2
    assert proposer.propose([1, 2, 3], 4) == []            # nothing repeats
    assert proposer.propose([5, 6, 5], 2) == [6, 5]        # falls back to a shorter n-gram
    # substitution match: the source says 10 11 12 13 14, the copy wrote 10 11 99 (99 replaced 12): go on at 13
    assert proposer.propose([10, 11, 12, 13, 14, 0, 10, 11, 99], 2) == [13, 14]
    assert get_proposer("ngram", min_n=2, max_n=3).propose([10, 11, 12, 13, 0, 11, 99], 2) == []  # needs 2 to match
    with pytest.raises(ValueError, match="unknown speculative method"):
        get_proposer("medusa")


def test_greedy_verification_is_prefix_matching():
    probs = torch.nn.functional.one_hot(torch.tensor([4, 7, 1, 3]), 10).float()
    gen = torch.Generator().manual_seed(0)
    assert verify(probs, [4, 7, 1], gen) == [4, 7, 1, 3]   # all accepted, then the bonus token
    assert verify(probs, [4, 2, 1], gen) == [4, 7]          # first mismatch replaced by the target's token


@pytest.mark.parametrize("proposal", ["one_hot", "distribution"])
def test_speculative_sampling_keeps_the_target_distribution(proposal):
    """Chi-square test: the first emitted token follows p whatever the drafts are."""
    torch.manual_seed(0)
    vocab, trials = 6, 20000
    p = torch.softmax(torch.randn(3, vocab) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(2, vocab), dim=-1)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    for _ in range(trials):
        if proposal == "one_hot":
            drafts, draft_probs = [2, 4], None           # a deterministic proposer (n-gram)
        else:
            drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)]
            draft_probs = q
        counts[verify(p, drafts, gen, draft_probs)[0]] += 1
    expected = p[0] * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5      # 5 degrees of freedom: p < 0.001 that a correct sampler exceeds this


PROMPTS = [
    "Copy this list exactly: apples, pears, plums, cherries, apples, pears, plums, cherries.",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="module")
def plain_outputs(smollm2_path):
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tokens_equal_plain_decoding_batched(smollm2_path, plain_outputs, k):
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1,
              speculative_method="ngram", num_speculative_tokens=k, block_size=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = [r.token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert outs == plain_outputs
    stats = llm.engine.spec_stats
    assert stats["draft_tokens"] > 0 and 0 < stats["accepted_tokens"] <= stats["draft_tokens"]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks   # nothing leaked


def test_stops_and_lengths_hold_with_drafts(smollm2_path):
    common = dict(dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1)
    plain = LLM(str(smollm2_path), **common)
    spec = LLM(str(smollm2_path), speculative_method="ngram", num_speculative_tokens=5, **common)
    for params in (SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=60, temperature=0.0, stop=["cherries"]),
                   SamplingParams(max_tokens=30, temperature=0.0, logprobs=2)):
        a, b = plain.generate(PROMPTS[:1], params, use_tqdm=False)[0], spec.generate(PROMPTS[:1], params, use_tqdm=False)[0]
        assert (a.text, a.token_ids, a.outputs[0].finish_reason) == (b.text, b.token_ids, b.outputs[0].finish_reason)
        if params.logprobs:
            la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
            assert len(la) == len(lb) == len(a.token_ids)
            assert [x.logprob for x in la] == pytest.approx([x.logprob for x in lb], abs=1e-3)


def test_speculation_backs_off_for_large_batches(smollm2_path):
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1,
              speculative_method="ngram", speculative_max_batch=2)
    llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert llm.engine.spec_stats["draft_tokens"] == 0        # four decode at once: no drafts
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert llm.engine.spec_stats["draft_tokens"] > 0


def test_sampled_requests_run_with_drafts(smollm2_path):
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1,
              speculative_method="ngram")
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    a = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    b = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]          # seeded: reproducible
    assert all(len(r.token_ids) == 30 for r in a)


def test_retrieval_drafts_from_the_corpus():
    from effinfer.decoding.spec.retrieval import RetrievalProposer

    corpus = [9, 1, 2, 3, 4, 5, 6, 1, 2, 3, 7, 8]
    proposer = RetrievalProposer(corpus, min_n=2, max_n=3)
    assert proposer.propose([50, 1, 2, 3], 2) == [7, 8]          # latest "1 2 3" in the corpus
    assert proposer.propose([50, 5, 6], 3) == [1, 2, 3]
    assert proposer.propose([50, 51, 52], 3) == []


def test_retrieval_engine_is_lossless(smollm2_path, plain_outputs, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("apples, pears, plums, cherries. def add(a, b):\n    return a + b\n"
                      "The quick brown fox jumps over the lazy dog. " * 3)
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1,
              speculative_method="retrieval", speculative_corpus=str(corpus))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)] == plain_outputs
    assert llm.engine.spec_stats["accepted_tokens"] > 0


# ---- model drafters: a draft model with its own KV cache, and self-speculation -----------------------

@pytest.mark.parametrize("method", ["draft_model", "self", "lookahead"])
def test_model_drafts_are_lossless_batched(smollm2_path, plain_outputs, method):
    extra = {"speculative_model": str(smollm2_path)} if method == "draft_model" else {}
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1, block_size=4,
              speculative_method=method, num_speculative_tokens=3, **extra)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    assert [r.token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)] == plain_outputs
    stats = llm.engine.spec_stats
    assert stats["draft_tokens"] > 0
    if method == "draft_model":       # the draft is the target itself: (near) every draft is accepted
        assert stats["accepted_tokens"] >= 0.95 * stats["draft_tokens"]
    if method == "lookahead":
        assert not llm.engine.speculator.proposer.states                                                    # released
    else:
        side = llm.engine.speculator.proposer.side
        assert not side.seqs and side.block_manager.num_free_blocks == side.block_manager.num_blocks   # released
    sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True)
    assert len(llm.generate(PROMPTS[:2], sampled, use_tqdm=False)[1].token_ids) == 12


def test_draft_model_needs_the_same_tokenizer(smollm2_path, tmp_path):
    from tests.tiny_models import save_tiny_folder

    save_tiny_folder("llama", tmp_path)
    with pytest.raises(ValueError, match="different tokenizer"):
        LLM(str(smollm2_path), quantization="none", show_progress=False, kv_cache_memory_gb=0.1,
            speculative_method="draft_model", speculative_model=str(tmp_path))


def test_self_draft_layers_are_parsed_and_checked():
    from effinfer.decoding.spec.draft_model import default_draft_layers, parse_layers

    assert parse_layers("0-3, 7", 8) == [0, 1, 2, 3, 7]
    assert parse_layers(None, 8) == []
    for bad in ("0-8", "x", "0-7"):              # past the end, not a number, every layer
        with pytest.raises(ValueError):
            parse_layers(bad, 8)
    keep = default_draft_layers(30)
    assert keep[:7] == list(range(7)) and keep[-7:] == list(range(23, 30)) and len(keep) == 22


def test_side_model_rolls_back_to_the_common_prefix_and_evicts(tmp_path):
    from effinfer.engine.side_model import SideModel
    from effinfer.models import load_model
    from tests.tiny_models import save_tiny_folder

    save_tiny_folder("llama", tmp_path)
    model = load_model(str(tmp_path), torch.float32, show_progress=False).model

    def side(num_blocks):
        return SideModel(model, num_blocks, 4, torch.float32, torch.device("cpu"))

    rolling = side(8)
    rolling.extend([("r", list(range(1, 11)))])
    diverged = list(range(1, 7)) + [50, 51, 52]                 # drafts 7..10 rejected, others follow
    got = rolling.extend([("r", diverged)])[0]
    assert rolling.seqs["r"].ids == diverged
    torch.testing.assert_close(got, side(8).extend([("x", diverged)])[0])
    small = side(3)                                            # 12 slots
    assert small.extend([("a", list(range(8)))])[0] is not None
    assert small.extend([("b", list(range(8)))])[0] is not None and "a" not in small.seqs   # LRU evicted
    assert small.extend([("c", list(range(20)))]) == [None]     # longer than the pool: no drafts
    small.release("b")
    assert small.block_manager.num_free_blocks == 3


def test_lookahead_iterates_guesses_and_pools_diagonal_ngrams():
    from effinfer.decoding.spec import DraftRequest
    from effinfer.decoding.spec.lookahead import LookaheadProposer

    proposer = LookaheadProposer(n=3)
    assert proposer.propose_batch([DraftRequest("r", [1, 2, 1, 5, 6, 1], 2)]) == [[5, 6]]   # seed: after the last 1
    rows = torch.nn.functional.one_hot(torch.tensor([7, 5, 6, 4]), 16).float()   # the target's argmax per row
    proposer.observe("r", 3, [7, 8, 9], rows)          # drafts at positions 3, 4, 5: 7 accepted, 8 rejected
    state = proposer.states["r"]
    assert state.guess == [6, 4]                       # the next Jacobi iterate past the emitted 7, 5
    assert {k: list(v) for k, v in state.pool.items()} == {7: [(7, 5)], 8: [(8, 6)], 9: [(9, 4)]}
    assert proposer.propose_batch([DraftRequest("r", [1, 2, 3, 7, 5], 3)]) == [[6, 4]]
    proposer.observe("r", 5, [6, 4], torch.nn.functional.one_hot(torch.tensor([6, 2, 3]), 16).float())
    # diagonal through both iterates: 8 at 4 (first) -> 6 predicted at 5, fed in the second -> 2 predicted at 6
    assert list(state.pool[8]) == [(8, 6, 2), (8, 6)] and state.guess == [3]
    assert proposer.propose_batch([DraftRequest("r", [1, 9], 2)]) == [[4, 3]]    # the freshest n-gram after 9
    proposer.release("r")
    assert not proposer.states


@pytest.mark.parametrize("name", sorted(PROPOSERS))
def test_every_registered_proposer_is_lossless_on_a_tiny_model(name, tmp_path):
    """Any proposer in the table: greedy tokens with its drafts equal plain decoding, and it drafted. Methods
    that need a file get one here; any other new method runs with its defaults."""
    save_tiny_folder("llama", tmp_path, num_layers=4)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i * 37 % 256}" for i in range(2048)))   # every token of the vocabulary
    needs = {"retrieval": {"speculative_corpus": str(corpus)}, "draft_model": {"speculative_model": str(tmp_path)}}
    common = {"dtype": "float32", "show_progress": False, "kv_cache_memory_gb": 0.01}
    prompts = [" ".join(f"w{i % 9}" for i in range(start, start + 40)) for start in range(3)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = [r.token_ids for r in LLM(str(tmp_path), **common).generate(prompts, params, use_tqdm=False)]
    spec = LLM(str(tmp_path), speculative_method=name, **needs.get(name, {}), **common)
    assert [r.token_ids for r in spec.generate(prompts, params, use_tqdm=False)] == plain
    assert spec.engine.spec_stats["draft_tokens"] > 0
