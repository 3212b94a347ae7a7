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


CALIBRATION_BINS = 10


def perplexity(system, wins: list[Window]) -> dict:
    """Perplexity with a 95% interval (windows as the units: the scored tokens of one window are not independent
    of each other), and the model's own uncertainty: the mean entropy of its next-token distributions and its
    expected calibration error (how far the top token's probability is from how often the top token is right)."""
    nll, counts, entropy = [], [], 0.0
    confidence, correct = [], []
    for w in wins:
        logprobs = system.score(w.token_ids)           # row j predicts token j + 1
        targets = torch.tensor(w.token_ids[w.first_scored:])
        rows = logprobs[w.first_scored - 1:len(w.token_ids) - 1]
        nll.append(-float(rows.gather(1, targets[:, None]).sum()))
        counts.append(len(targets))
        entropy -= float((rows.exp() * rows.nan_to_num(neginf=0.0)).sum())
        top_logprob, top = rows.max(-1)
        confidence.append(top_logprob.exp())
        correct.append((top == targets).float())
    count = sum(counts)
    mean_nll = sum(nll) / count
    low, high = _ratio_mean_interval(nll, counts)
    confidence, correct = torch.cat(confidence), torch.cat(correct)
    return {"perplexity": math.exp(mean_nll), "perplexity_ci95": [math.exp(low), math.exp(high)],
            "nll_per_token": mean_nll, "scored_tokens": count, "scored_windows": len(wins),
            "mean_entropy_nats": entropy / count, "top1_accuracy": float(correct.mean()),
            "expected_calibration_error": calibration_error(confidence, correct)}


def _ratio_mean_interval(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """95% interval of sum(sums) / sum(counts) over units of unequal size (the ratio estimator's standard error,
    Student's t for the few windows a short text gives); one unit gives a zero-width interval."""
    from effinfer.bench.stats import t_quantile

    n, mean = len(sums), sum(sums) / sum(counts)
    if n < 2:
        return mean, mean
    residual = sum((s - mean * c) ** 2 for s, c in zip(sums, counts))
    half = t_quantile(n - 1) * math.sqrt(residual / (n * (n - 1))) / (sum(counts) / n)
    return mean - half, mean + half


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: positions binned by top-token probability (equal widths); the bins' gaps
    between mean confidence and accuracy, weighted by their share of positions."""
    index = (confidence * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += float(members.sum()) * abs(float(confidence[members].mean() - correct[members].mean()))
    return total / max(1, confidence.numel())


def divergence(reference, candidate, wins: list[Window]) -> dict:
    """Mean KL(reference || candidate) per position with its standard error over the windows, and the share of
    positions where both pick the same top token."""
    kl_sums, counts, agree = [], [], 0
    for w in wins:
        ref = reference.score(w.token_ids)[w.first_scored - 1:len(w.token_ids) - 1]
        cand = candidate.score(w.token_ids)[w.first_scored - 1:len(w.token_ids) - 1]
        kl_sums.append(float((ref.exp() * (ref - cand)).sum()))
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        counts.append(ref.shape[0])
    count = sum(counts)
    low, high = _ratio_mean_interval(kl_sums, counts)
    return {"kl_divergence": sum(kl_sums) / count, "kl_divergence_ci95": [low, high],
            "greedy_agreement": agree / count, "compared_positions": count}


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
