"""Structured output in the engine (llguidance): every constrained output parses and matches its constraint, for
JSON schemas, JSON objects, regexes, choices and grammars, sampled and greedy, batched with unconstrained
requests, and with speculative drafts (cut to what the grammar allows, then verified under its masks: the same
tokens as without drafts)."""

from __future__ import annotations

import json
import re

import pytest

from effinfer import LLM, SamplingParams
from effinfer.sampling_params import StructuredOutputParams

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age and a city."}]
COMMON = dict(dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), **COMMON)


def check_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"name", "age", "city"} and isinstance(person["name"], str)
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120 and person["city"] in PERSON["properties"][
        "city"]["enum"]


def test_json_schema_outputs_validate_sampled_and_greedy(llm):
    structured = StructuredOutputParams(json=json.dumps(PERSON))
    params = [SamplingParams(max_tokens=80, temperature=t, seed=s, structured=structured)
              for t, s in [(0.0, 0), (1.0, 1), (1.0, 2), (1.3, 3)]]
    unconstrained = SamplingParams(max_tokens=20, temperature=0.0)
    results = llm.generate([ASK] * 5, params + [unconstrained], use_tqdm=False)
    for result in results[:4]:
        assert result.outputs[0].finish_reason == "stop"
        check_person(result.text)
    assert not results[4].text.startswith("{")        # the unconstrained row of the batch stays free


@pytest.mark.parametrize("structured, check", [
    (StructuredOutputParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    (StructuredOutputParams(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
    (StructuredOutputParams(choice=["yes", "no", "maybe \"so\""]), lambda t: t in ("yes", "no", "maybe \"so\"")),
    (StructuredOutputParams(grammar='root ::= "The answer is " [0-9]+ "."'),
     lambda t: re.fullmatch(r"The answer is \d+\.", t)),
    (StructuredOutputParams(grammar='start: "x=" DIGITS ";"\nDIGITS: /[0-9]{1,3}/'),        # Lark
     lambda t: re.fullmatch(r"x=\d{1,3};", t)),
])
def test_each_kind_of_constraint_holds(llm, structured, check):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=7, structured=structured)
    for result in llm.generate([ASK] * 3, params, use_tqdm=False):
        assert check(result.text), result.text
        assert result.outputs[0].finish_reason == "stop"


def test_logprobs_under_a_constraint_are_those_of_the_raw_distribution(llm):
    """The mask decides what is sampled, not what is reported: every logprob is finite, and the top ones are the
    unconstrained model's (the constraint's tokens need not be among them)."""
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5,
                            structured=StructuredOutputParams(regex=r"[0-9]{8}"))
    constrained = llm.generate([ASK], params, use_tqdm=False)[0].outputs[0]
    free = llm.generate([ASK], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)[0].outputs[0]
    assert all(lp.logprob > float("-inf") and all(v > float("-inf") for _, v in lp.top) for lp in constrained.logprobs)
    assert constrained.logprobs[0].top == free.logprobs[0].top
    assert constrained.logprobs[0].logprob < constrained.logprobs[0].top[0][1]    # a digit, not the model's first


def test_bans_that_empty_the_grammar_leave_its_choice(llm):
    assert all(len(llm.tokenizer.encode(w, add_special_tokens=False)) == 1 for w in ("yes", "no"))  # one-token words
    for words, expected in ((["yes"], {"no"}), (["yes", "no"], {"yes", "no"})):
        params = SamplingParams(max_tokens=8, temperature=0.0, bad_words=words,
                                structured=StructuredOutputParams(choice=["yes", "no"]))
        result = llm.generate([ASK], params, use_tqdm=False)[0]
        assert result.text in expected and result.outputs[0].finish_reason == "stop"


def test_ignore_eos_still_stops_at_the_end_of_the_grammar(llm):
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True,
                            structured=StructuredOutputParams(choice=["alpha", "beta"]))
    result = llm.generate([ASK], params, use_tqdm=False)[0]
    assert result.text in ("alpha", "beta") and result.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("structured, words", [
    (StructuredOutputParams(json=json.dumps({"type": "strin"})), "strin"),
    (StructuredOutputParams(regex="a(b"), "unclosed group"),
    (StructuredOutputParams(grammar="root ::= (("), "grammar"),
])
def test_a_constraint_that_cannot_compile_is_a_clear_error(llm, structured, words):
    with pytest.raises(ValueError, match=words):
        llm.generate([ASK], SamplingParams(max_tokens=4, structured=structured), use_tqdm=False)
    assert not llm.engine.requests and llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams(regex="a", json_object=True)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputParams()


def test_speculative_drafts_are_checked_against_the_grammar(smollm2_path, llm):
    """n-gram drafts copy the prompt's JSON; drafts the grammar forbids (a city outside the enum) are cut, the
    rest verified under the grammar's masks (the token after a cut comes from a masked row): greedy tokens
    equal those without drafts."""
    prompt = [{"role": "user", "content": 'Repeat exactly: {"name": "Ada", "age": 36, "city": "Berlin"} and '
                                          '{"name": "Bob", "age": 41, "city": "Berlin"}'}]
    params = SamplingParams(max_tokens=60, temperature=0.0, structured=StructuredOutputParams(json=json.dumps(PERSON)))
    expected = llm.generate([prompt] * 2, params, use_tqdm=False)
    spec = LLM(str(smollm2_path), speculative_method="ngram", num_speculative_tokens=4, **COMMON)
    got = spec.generate([prompt] * 2, params, use_tqdm=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    check_person(got[0].text)
    assert spec.engine.spec_stats["accepted_tokens"] > 0
