"""Offline use of an idle engine, beside serving: scoring a text (perplexity, KL divergence, calibration) and
the prepared inputs of one prompt for code that runs the model's layers itself (layer-by-layer calibration).
Both take blocks from the engine's pool and return them at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from effinfer.engine.model_runner import ScheduledSeq
from effinfer.engine.request import Request
from effinfer.sampling_params import SamplingParams


def check_offline_prompt(engine, caller: str, prompt_ids: list[int]) -> None:
    if engine.has_unfinished():
        raise RuntimeError(f"{caller} runs on an idle engine; finish or abort the requests first")
    if not 0 < len(prompt_ids) <= engine.max_model_len:
        raise ValueError(f"a prompt must have 1 to {engine.max_model_len} tokens, got {len(prompt_ids)}")


@torch.inference_mode()
def score(engine, prompt_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token after every position of `prompt_ids`: [len, vocab] fp32.

    For offline evaluation (perplexity, KL divergence): the engine must be idle. The prompt runs in
    chunks of the step's token budget over blocks taken from the pool and returned at the end. With
    early exit on (a default threshold below 1) it runs one token per step, each free to exit as a
    generated token would: the distributions are the ones early-exit decoding uses given this text."""
    check_offline_prompt(engine, "score()", prompt_ids)
    request = Request("score", list(prompt_ids), SamplingParams(max_tokens=1))
    threshold = engine.config.exit.early_exit_threshold if engine.early_exit is not None else 1.0
    exit_threshold = threshold if threshold < 1.0 else None
    step, rows = 1 if exit_threshold is not None else engine.config.scheduler.max_num_batched_tokens, []
    try:
        for start in range(0, len(prompt_ids), step):
            chunk = prompt_ids[start:start + step]
            if engine.block_manager.allocate(request, len(chunk)) is None:
                raise ValueError(f"the KV cache cannot hold {len(prompt_ids)} tokens; raise kv_cache_memory_gb")
            logits = engine.runner.execute([ScheduledSeq(chunk, start, request.block_ids, True, exit_threshold is None,
                                                         exit_threshold=exit_threshold)])
            request.num_computed_tokens += len(chunk)
            rows.append(torch.log_softmax(logits, dim=-1))
    finally:
        engine.block_manager.free(request)
    return torch.cat(rows)


@contextmanager
def prepared_prompt(engine, prompt_ids: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, object]]:
    """The model inputs (token ids, positions, attention metadata) of one whole prompt on blocks taken
    from the pool, returned when the block ends. Same rules as `score`: an idle engine, a prompt that fits."""
    check_offline_prompt(engine, "prepared_prompt()", prompt_ids)
    request = Request("prepared", list(prompt_ids), SamplingParams(max_tokens=1))
    if engine.block_manager.allocate(request, len(prompt_ids)) is None:
        raise ValueError(f"the KV cache cannot hold {len(prompt_ids)} tokens; raise kv_cache_memory_gb")
    try:
        input_ids, positions, meta, _ = engine.runner.prepare([ScheduledSeq(list(prompt_ids), 0, request.block_ids,
                                                                            False)])
        yield input_ids, positions, meta
    finally:
        engine.block_manager.free(request)
