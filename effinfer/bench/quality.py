"""`effinfer bench quality`: how much a configuration changes the model, measured on text.

Perplexity over fixed windows with a stride (each token scored once, with at least
`window - stride` tokens of context after the first window, as in HF's perplexity guide and
llama.cpp's `perplexity`). Against a reference configuration on the same windows: the mean KL
divergence KL(reference || candidate) of the next-token distributions and the share of positions
whose greedy (argmax) token agrees. This is how every lossy technique is judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Window:
    token_ids: list[int]
    first_scored: int
    """Index in `token_ids` of the first token whose log-probability counts."""


def windows(token_ids: list[int], window: int, stride: int, max_tokens: int | None = None) -> list[Window]:
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    out, begin = [], 0
    while True:
        end = min(begin + window, len(ids))
        first = 1 if begin == 0 else max(1, window - stride)   # a window's first token has no context in it
        if end - begin > first:
            out.append(Window(ids[begin:end], first))
        if end == len(ids):
            return out
        begin += stride


def perplexity(system, wins: list[Window]) -> dict:
    nll, count = 0.0, 0
    for w in wins:
        logprobs = system.score(w.token_ids)           # row j predicts token j + 1
        targets = torch.tensor(w.token_ids[w.first_scored:])
        rows = logprobs[w.first_scored - 1:len(w.token_ids) - 1]
        nll -= float(rows.gather(1, targets[:, None]).sum())
        count += len(targets)
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "scored_tokens": count}


def divergence(reference, candidate, wins: list[Window]) -> dict:
    kl_sum, agree, count = 0.0, 0, 0
    for w in wins:
        ref = reference.score(w.token_ids)[w.first_scored - 1:len(w.token_ids) - 1]
        cand = candidate.score(w.token_ids)[w.first_scored - 1:len(w.token_ids) - 1]
        kl_sum += float((ref.exp() * (ref - cand)).sum())
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += ref.shape[0]
    return {"kl_divergence": kl_sum / count, "greedy_agreement": agree / count, "compared_positions": count}


def text_windows(tokenizer, path: str, window: int, stride: int, max_tokens: int | None) -> list[Window]:
    from pathlib import Path

    return windows(tokenizer.encode(Path(path).read_text(encoding="utf-8")), window, stride, max_tokens)


def task_accuracy(system, tasks: list[str], limit: int | None) -> dict:
    """Multiple-choice accuracy per task (`acc`, `acc_per_char`) and their means over the tasks."""
    from effinfer.bench.tasks import accuracy, load_task
    from effinfer.utils import progress

    results = {task: accuracy(system, load_task(task, limit)) for task in progress(tasks, "tasks", bool(tasks))}
    if not results:
        return {}
    mean = {f"mean_{k}": sum(r[k] for r in results.values()) / len(results) for k in ("acc", "acc_per_char")}
    return {"tasks": results, **mean}
