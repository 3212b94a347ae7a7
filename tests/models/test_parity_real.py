"""Every catalog model against transformers loading the same GGUF file (fp32): logits on a fixed prompt
set, greedy tokens through the engine, tokenizer ids on varied text, rendered chat templates."""

from __future__ import annotations

import pytest
import torch
import transformers

from effinfer import SamplingParams
from effinfer.loader import catalog
from effinfer.models import load_model
from helpers import make_engine, one_gguf_parse, run_to_completion

MODELS = [
    "smollm2-135m-instruct",
    "gemma3-270m",
    "qwen2.5-coder-0.5b-instruct",
    pytest.param("qwen2.5-coder-1.5b-instruct", marks=pytest.mark.slow),
]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
]
TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\n\nnewlines   ",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "Emoji 🤖🚀 and ZWJ 👩‍👩‍👧 and flags 🇫🇷",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product",
    "    def f(x):\n        return {'k': [1, 2, 3]}\n",
    "Numbers 1234567890 3.14159 -42 1e-9",
    "",
]
# Logits of our fp32 model vs transformers' fp32 model on the same dequantized weights differ only by
# the order of floating-point sums: measured max |diff| is ~4e-5 on logits of magnitude ~25.
LOGIT_ATOL = 2e-3
GREEDY_TOKENS = 16
"""Per prompt, through the engine's decode path (paged KV writes and reads, one token per step); in fp32 a
step of the 0.5B model costs ~0.2 s on each side here."""


@pytest.fixture(scope="module", params=MODELS)
def models(request):
    path = catalog.pull(request.param, show_progress=False)
    transformers.logging.set_verbosity_error()
    with one_gguf_parse():
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        ours = load_model(str(path), torch.float32, show_progress=False)
    return hf, hf_tok, ours


def test_logits_match_transformers(models):
    hf, hf_tok, ours = models
    engine = make_engine(ours)
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.no_grad():
            reference = hf(torch.tensor([ids])).logits[0, -1]
        logits = engine.runner.execute([_whole_prompt(engine, ids)])[0]
        torch.testing.assert_close(logits, reference, atol=LOGIT_ATOL, rtol=0)


def test_greedy_tokens_match_transformers(models):
    hf, hf_tok, ours = models
    engine = make_engine(ours)
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, params, request_id=str(i))
    finals = run_to_completion(engine)
    for i, prompt in enumerate(PROMPTS):
        ids = ours.tokenizer.encode(prompt)
        assert finals[str(i)].token_ids == _hf_greedy(hf, ids, GREEDY_TOKENS), prompt


def test_tokenizer_ids_match_transformers(models):
    _, hf_tok, ours = models
    for text in TEXTS:
        assert ours.tokenizer.encode(text) == hf_tok(text).input_ids, text
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert ours.tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text


def test_chat_template_matches_transformers(models):
    _, hf_tok, ours = models
    if not hf_tok.chat_template:
        with pytest.raises(ValueError, match="no chat template"):
            ours.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        return
    conversations = [
        [{"role": "user", "content": "Hi 👋, write a haiku about Straße."}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3?\n"}],
    ]
    for messages in conversations:
        for add_prompt in (True, False):
            expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_prompt)
            assert ours.tokenizer.apply_chat_template(messages, add_prompt) == expected


@torch.no_grad()
def _hf_greedy(hf, ids: list[int], num_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' own KV cache, EOS not special (like ignore_eos)."""
    out = hf(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(num_tokens - 1):
        out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _whole_prompt(engine, ids):
    from effinfer.engine.model_runner import ScheduledSeq

    num_blocks = -(-len(ids) // engine.config.cache.block_size)
    return ScheduledSeq(ids, 0, list(range(num_blocks)))
