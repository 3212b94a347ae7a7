"""The engine core: requests in, one `step()` = schedule -> execute -> update, outputs out."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools

import torch

from effinfer.config import EngineConfig
from effinfer.decoding.sampler import Sampler, SamplingRow
from effinfer.engine.block_manager import BlockManager
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.engine.request import FinishReason, Request
from effinfer.engine.scheduler import Scheduler, SchedulerOutput
from effinfer.models import LoadedModel
from effinfer.output_processor import OutputProcessor
from effinfer.outputs import CoreOutput, EngineStats, RequestOutput
from effinfer.prompts import Prompt, bad_words_ids, check_prompt_length, check_token_params, encode_prompt
from effinfer.sampling_params import SamplingParams, TokenLogprobs
from effinfer.utils import parse_dtype

class LLMEngine:
    """Runs what it is given: a loaded model, its KV block pool, its model runner (which holds the compiled
    step and early exit, if any) and optionally a speculator (`decoding.spec.speculator.Speculator`: two hooks,
    `propose` before scheduling and `verify` after the forward). `effinfer.llm.build_engine` makes them."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, block_manager: BlockManager, runner: ModelRunner,
                 max_model_len: int, speculator=None, summary: str = ""):
        self.config, self.loaded = config, loaded
        self.summary = summary
        """One line: what runs (weights, kernels, compiled or not, KV pool) and why."""
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device, self.dtype = runner.device, parse_dtype(config.model.dtype)
        self.block_manager, self.runner, self.max_model_len = block_manager, runner, max_model_len
        sc = config.scheduler
        self.scheduler = Scheduler(block_manager, sc.max_num_seqs, sc.max_num_batched_tokens, max_model_len,
                                   sc.enable_chunked_prefill)
        self.sampler = Sampler()
        self.early_exit = runner.early_exit
        self.speculator = speculator
        self.outputs: OutputProcessor | None = OutputProcessor(self.tokenizer)
        """Text for `step()`, the in-process path. A core in its own process sets it None (`text_elsewhere`): it
        runs `core_step()` and its client makes the text."""
        self.requests: dict[str, Request] = {}
        self.seeds = torch.Generator().manual_seed(config.global_seed)
        """Where requests without a seed draw theirs: the engine's own, because torch.compile saves and restores
        the global random state around a compile (a background one would hand out the same seeds again)."""
        self.structured = None
        """`decoding.structured.StructuredOutputs`, made when the first constrained request arrives."""
        self.background_compile = None
        """The `BackgroundCompile` building this engine's compiled decode step while it serves, if any."""
        self._ids = itertools.count()

    @property
    def spec_stats(self) -> dict[str, int]:
        """Speculative decoding counters: drafts proposed, drafts accepted, request-steps that verified."""
        return self.speculator.stats if self.speculator else {"draft_tokens": 0, "accepted_tokens": 0, "verify_steps": 0}

    def stats(self) -> EngineStats:
        blocks, exits = self.block_manager, self.early_exit.stats if self.early_exit is not None else None
        return EngineStats(
            len(self.scheduler.running), len(self.scheduler.waiting), blocks.usage, blocks.num_free_blocks,
            blocks.num_blocks, blocks.num_hit_tokens, blocks.num_queried_tokens, self.scheduler.num_preemptions,
            dict(self.spec_stats), exits["candidates"] if exits else 0, dict(exits["by_layer"]) if exits else {},
            self.runner.decode_steps)

    # ---- requests in ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, self.loaded.config.vocab_size, prompt)

    def check_prompt_length(self, prompt_ids: list[int]) -> None:
        check_prompt_length(prompt_ids, self.max_model_len)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0) -> Request:
        params = params or SamplingParams()
        prompt_ids = self.encode_prompt(prompt)
        self.check_prompt_length(prompt_ids)
        check_token_params(params, self.loaded.config.vocab_size)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt_ids, params, self.loaded.config.eos_token_ids, priority)
        request.generator = _generator(params.seed, self.device, self.seeds)
        request.bad_words_ids = bad_words_ids(self.tokenizer, params.bad_words)
        if params.structured is not None:
            self._structured_outputs().start(request)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self._set_exit_threshold(request)
        self.requests[request_id] = request
        if self.outputs is not None:
            self.outputs.add(request_id, prompt_ids, params)
        self.scheduler.add(request)
        return request

    def _structured_outputs(self):
        if self.structured is None:
            from effinfer.decoding.structured import StructuredOutputs

            self.structured = StructuredOutputs(self.tokenizer, self.loaded.config.vocab_size)
        return self.structured

    def _set_exit_threshold(self, request: Request) -> None:
        threshold = request.params.early_exit_threshold
        if threshold is not None and self.early_exit is None:
            raise ValueError("early_exit_threshold needs an engine with exit heads (start it with --early-exit-heads)")
        threshold = self.config.exit.early_exit_threshold if threshold is None else threshold
        if self.early_exit is not None and threshold < 1.0:
            request.exit_threshold = threshold
            request.cacheable_len = len(request.prompt_ids)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request, reason)
            if self.outputs is not None:
                self.outputs.abort(request_id)
            if self.speculator is not None:
                self.speculator.release(request_id)

    def close(self) -> None:
        """Stop what the engine runs outside this process (tensor-parallel workers); the engine is unusable after."""
        self.runner.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def text_elsewhere(self) -> None:
        """This engine only runs `core_step()`: its client makes the text, so it keeps no per-request text state."""
        self.outputs = None

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One core step with its text made here (in-process); a stop string ends its request at once."""
        outputs, stopped = self.outputs.process(self.core_step())
        for request_id in stopped:
            self.abort(request_id, FinishReason.STOP)
        return outputs

    def core_step(self) -> list[CoreOutput]:
        """One step in token ids: what a core in its own process runs."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.max_model_len)
            if self.structured is not None:
                for request in self.scheduler.running:
                    request.spec_ids = self.structured.allowed_drafts(request, request.spec_ids)
        scheduled = self.scheduler.schedule()
        sampled, logprobs = self.execute(scheduled) if not scheduled.is_empty else ({}, {})
        updated = self.scheduler.update(scheduled, sampled)
        embedded = [r for r in scheduled.requests if r.embedding is not None and not r.is_finished]
        for request in embedded:   # an embedding request ends when its prompt has run
            self.scheduler.finish(request, FinishReason.STOP)
        return self._core_outputs(updated, scheduled.finished + embedded, logprobs)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> tuple[dict[str, int], dict]:
        """Run the model on the step's packed tokens and sample for requests that reach their end."""
        seqs = [self._scheduled_seq(r, scheduled.num_new_tokens[r.request_id]) for r in scheduled.requests]
        pooling = any(seq.pooling for seq in seqs)
        if self.early_exit is not None and len(seqs) <= self.config.exit.early_exit_max_batch and not pooling:
            for request, seq in zip(scheduled.requests, seqs):
                if seq.is_one_token_decode:
                    seq.exit_threshold = request.exit_threshold
        sampling = [r for r, seq in zip(scheduled.requests, seqs) if seq.needs_logits and not seq.num_spec]
        masks = self.structured.masks_async(sampling) if self.structured is not None else None
        pooled: dict[int, torch.Tensor] = {}
        try:
            logits = self.runner.execute(seqs, pooled if pooling else None)
        except Exception:
            if self.runner.failure:     # no step can run again: end every request now, its blocks returned
                for request_id in list(self.requests):
                    self.abort(request_id)
            raise
        finally:   # the worker must be done with the matchers before anything else touches them
            if masks is not None:
                concurrent.futures.wait([masks])
        for i, vector in pooled.items():
            _pool_into(scheduled.requests[i], seqs[i], vector)
        sample_rows, verifying, row = [], [], 0
        for request, seq in zip(scheduled.requests, seqs):
            num_rows = self.runner.num_logit_rows(seq)
            if seq.all_logits:
                _record_prompt_logprobs(request, seq.num_computed, logits[row:row + num_rows])
            if seq.num_spec:
                verifying.append((request, logits[row:row + num_rows]))
            elif seq.needs_logits:
                sample_rows.append(row + num_rows - 1)
            row += num_rows
        sampled, logprobs = {}, {}
        if sampling:
            constrain = functools.partial(self.structured.apply, masks=masks.result()) if masks is not None else None
            out = self.sampler(logits[sample_rows], [SamplingRow.of(r) for r in sampling], constrain)
            for request, token, lp in zip(sampling, out.token_ids, out.logprobs):
                sampled[request.request_id], logprobs[request.request_id] = [token], [lp]
        for request, rows_logits in verifying:
            constrain = None
            if request.matcher is not None:
                masks_at = self.structured.draft_masks(request, request.spec_ids)
                constrain = functools.partial(self.structured.apply, masks=masks_at)
            sampled[request.request_id], logprobs[request.request_id] = self.speculator.verify(request, rows_logits,
                                                                                               constrain)
        for request in scheduled.requests:
            if request.matcher is not None and request.request_id in sampled:
                self.structured.accept(request, sampled[request.request_id])
        return sampled, logprobs

    @staticmethod
    def _scheduled_seq(request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        num_spec = len(request.spec_ids)
        completes = start + num_new - num_spec == request.num_tokens
        in_prompt = request.params.prompt_logprobs is not None and start < len(request.prompt_ids)
        tokens = request.token_slice(start, start + num_new - num_spec) + request.spec_ids
        pooling = request.params.pooling
        return ScheduledSeq(tokens, start, request.block_ids, completes and pooling is None, in_prompt, num_spec,
                            pooling=pooling)

    def _core_outputs(self, updated: list[Request], ended: list[Request], logprobs: dict) -> list[CoreOutput]:
        """`updated` got tokens this step; `ended` were finished by the scheduler without one."""
        outputs = []
        for request in updated + ended:
            new_ids = request.output_ids[request.num_reported_tokens:]
            new_logprobs = logprobs.get(request.request_id)
            finished = request.is_finished
            first = request.num_reported_tokens == 0 and (new_ids or finished)
            prompt_logprobs = request.prompt_logprobs if first else None
            request.num_reported_tokens = len(request.output_ids)
            outputs.append(CoreOutput(
                request.request_id, new_ids, new_logprobs[:len(new_ids)] if new_logprobs else None, finished,
                request.finish_reason.value if finished else None, request.stop_reason if finished else None,
                max(request.num_cached_tokens, 0), request.first_scheduled_time, request.num_preemptions,
                prompt_logprobs, request.embedding if finished else None))
            if finished:
                self.requests.pop(request.request_id, None)
                if self.speculator is not None:
                    self.speculator.release(request.request_id)
        return outputs


def _pool_into(request: Request, seq: ScheduledSeq, vector: torch.Tensor) -> None:
    """Add a prompt chunk's pooled hidden state; after the last chunk, the request's embedding. A chunk from
    position 0 starts over (a preempted request recomputes its prompt)."""
    if seq.num_computed == 0 or request.pooled is None or request.params.pooling == "last":
        request.pooled = vector
    else:
        request.pooled = request.pooled + vector
    if seq.num_computed + len(seq.token_ids) == len(request.prompt_ids):
        total = request.pooled / len(request.prompt_ids) if request.params.pooling == "mean" else request.pooled
        request.embedding = torch.nn.functional.normalize(total, dim=0).tolist()


def _record_prompt_logprobs(request: Request, start: int, logits: torch.Tensor) -> None:
    """Row j of `logits` (position start + j) scores prompt token start + j + 1. Positions already recorded
    (a preempted request recomputes its prompt) are skipped."""
    logprobs, num_top, recorded = logits.log_softmax(dim=-1), request.params.prompt_logprobs, request.prompt_logprobs
    for j in range(logprobs.shape[0]):
        target = start + j + 1
        if target >= len(request.prompt_ids) or target < len(recorded):
            continue
        values, ids = logprobs[j].topk(num_top) if num_top else (logprobs[j][:0], logprobs[j][:0].long())
        token = request.prompt_ids[target]
        recorded.append(TokenLogprobs(float(logprobs[j, token]), list(zip(ids.tolist(), values.tolist()))))


def _generator(seed: int | None, device: torch.device, seeds: torch.Generator) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (), generator=seeds).item()))
    return generator
