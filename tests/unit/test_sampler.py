"""Sampler, parameter by parameter, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from effinfer.decoding.sampler import Sampler, SamplingRow, apply_penalties, apply_top_k_top_p_min_p
from effinfer.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def row(seed=0, prompt=(), output=(), **kw):
    return SamplingRow(SamplingParams(seed=seed, **kw), torch.Generator().manual_seed(seed), list(prompt), list(output))


def draw(logits, r, n=2000):
    counts = torch.zeros(logits.shape[-1])
    sampler = Sampler()
    for _ in range(n):
        counts[sampler(logits, [r]).token_ids[0]] += 1
    return counts / n


def test_greedy_is_argmax():
    assert Sampler()(LOGITS.repeat(2, 1), [row(temperature=0.0), row(temperature=0.0)]).token_ids == [0, 0]


def test_temperature_one_matches_distribution():
    freq = draw(LOGITS, row(temperature=1.0))
    assert torch.allclose(freq, LOGITS.softmax(-1)[0], atol=0.04)


def test_low_temperature_sharpens():
    assert draw(LOGITS, row(temperature=0.1), 300)[0] > 0.95


def test_top_k():
    masked = apply_top_k_top_p_min_p(LOGITS, [row(top_k=2)])
    assert torch.isinf(masked[0, 2:]).all() and torch.isfinite(masked[0, :2]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    masked = apply_top_k_top_p_min_p(LOGITS, [row(top_p=0.7)])   # 0.5 + 0.25 >= 0.7
    assert torch.isfinite(masked[0, :2]).all() and torch.isinf(masked[0, 2:]).all()
    masked = apply_top_k_top_p_min_p(LOGITS, [row(top_p=0.5)])   # 0.5 alone reaches 0.5
    assert torch.isfinite(masked[0, 0]) and torch.isinf(masked[0, 1:]).all()


def test_min_p():
    masked = apply_top_k_top_p_min_p(LOGITS, [row(min_p=0.4)])   # threshold 0.2
    assert torch.isfinite(masked[0, :2]).all() and torch.isinf(masked[0, 2:]).all()


def test_per_row_parameters_in_one_batch():
    masked = apply_top_k_top_p_min_p(LOGITS.repeat(2, 1), [row(top_k=1), row()])
    assert torch.isinf(masked[0, 1:]).all() and torch.isfinite(masked[1]).all()


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_penalties(logits.clone(), [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.zeros(1, 3)
    out = apply_penalties(logits, [row(prompt=[2], output=[0, 0, 1], presence_penalty=0.5, frequency_penalty=0.25)])
    assert out.tolist() == [[-1.0, -0.75, 0.0]]    # token 2 only in the prompt: untouched


def test_seed_reproducible_whatever_the_batch():
    alone = Sampler()(LOGITS, [row(seed=7)]).token_ids[0]
    batch = Sampler()(LOGITS.repeat(3, 1), [row(seed=1), row(seed=7), row(seed=2)]).token_ids[1]
    assert alone == batch
    r3, r4 = row(seed=3), row(seed=3)
    assert [Sampler()(LOGITS, [r3]).token_ids[0] for _ in range(20)] == \
           [Sampler()(LOGITS.repeat(2, 1), [row(seed=9), r4]).token_ids[1] for _ in range(20)]


def test_logprobs_are_raw_model_logprobs_with_top_n():
    out = Sampler()(LOGITS, [row(temperature=0.0, logprobs=2)])
    lp = out.logprobs[0]
    assert math.isclose(lp.logprob, math.log(0.5), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == [0, 1]
    assert math.isclose(lp.top[1][1], math.log(0.25), rel_tol=1e-5)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2),
                                 dict(max_tokens=0), dict(n=0), dict(logprobs=99), dict(stop=[""])])
def test_invalid_values_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_logit_bias_moves_greedy_and_bans():
    sampler = Sampler()
    assert sampler(LOGITS, [row(temperature=0.0, logit_bias={3: 5.0})]).token_ids == [3]
    assert sampler(LOGITS, [row(temperature=0.0, logit_bias={0: -100.0})]).token_ids == [1]
    assert draw(LOGITS, row(temperature=1.0, logit_bias={0: -100.0, 1: -100.0}), 300)[:2].sum() == 0


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    sampler = Sampler()

    def greedy(output, eos=(0,), **kw):
        r = row(temperature=0.0, output=output, max_tokens=8, **kw)
        r.eos_token_ids = list(eos)
        return sampler(LOGITS, [r]).token_ids[0]

    assert greedy([], min_tokens=2) == 1            # EOS (0) masked
    assert greedy([5], min_tokens=2, stop_token_ids=[1]) == 2   # EOS and the stop id masked
    assert greedy([5, 6], min_tokens=2) == 0        # reached: EOS allowed again
    assert greedy([], min_tokens=0) == 0


def test_bad_words_ban_the_last_token_after_their_prefix():
    from effinfer.decoding.sampler import banned_tokens

    r = row(temperature=0.0, output=[7, 2], bad_words=["x"])
    r.bad_words_ids = [[0], [2, 1], [9, 3]]
    assert banned_tokens(r) == [0, 1]                # one-token word always; [2, 1] after a 2; not [9, 3]
    assert Sampler()(LOGITS, [r]).token_ids == [2]   # 0 and 1 banned: the next best


def test_bad_words_ids_with_and_without_a_leading_space():
    from effinfer.prompts import bad_words_ids

    class Words:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    assert bad_words_ids(Words(), ["ab", " ab"]) == [[97, 98], [32, 97, 98]]


@pytest.mark.parametrize("bad", [{"min_tokens": 9}, {"min_tokens": -1}, {"logit_bias": {1: 101.0}},
                                 {"logit_bias": {-1: 1.0}}, {"bad_words": [""]}])
def test_new_parameters_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(max_tokens=8, **bad)
