"""The engine core: requests in, one `step()` = schedule -> execute -> update, outputs out."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from effinfer.config import EngineConfig
from effinfer.decoding.sampler import Sampler, SamplingRow, final_probs, gather_logprobs
from effinfer.engine.block_manager import BlockManager
from effinfer.engine.kv_cache import allocate_kv_cache, bytes_per_block
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.engine.output_processor import OutputProcessor
from effinfer.engine.request import FinishReason, Request
from effinfer.engine.scheduler import Scheduler, SchedulerOutput
from effinfer.engine.side_model import SideModel
from effinfer.models import LoadedModel, load_model
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import SamplingParams
from effinfer.utils import default_device, parse_dtype

Prompt = str | list[int] | list[dict]


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        torch.manual_seed(config.global_seed)
        mc = config.model
        if mc.num_threads:
            torch.set_num_threads(mc.num_threads)
        self.device = torch.device(default_device() if mc.device == "auto" else mc.device)
        self.dtype = parse_dtype(mc.dtype)
        self.loaded = loaded or load_model(mc.model, self.dtype, str(self.device), mc.cache_dir, config.show_progress,
                                           config.quant.spec())
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.prune_report = self._prune() if config.prune.prune else None
        self.block_manager = BlockManager(self._num_blocks(), config.cache.block_size,
                                          config.cache.enable_prefix_caching)
        allocate_kv_cache(self.model, self.block_manager.num_blocks, config.cache.block_size, self.dtype, self.device,
                          mc.attention_backend, config.cache.kv_cache_dtype)
        self.max_model_len = self._max_model_len()
        sc = config.scheduler
        self.scheduler = Scheduler(self.block_manager, sc.max_num_seqs, sc.max_num_batched_tokens,
                                   self.max_model_len, sc.enable_chunked_prefill)
        self.runner = ModelRunner(self.model, config.cache.block_size, self.device)
        if mc.compile:
            self._compile_decode()
        self.sampler = Sampler()
        self.early_exit = self._make_early_exit()
        self.proposer = self._make_proposer()
        self.spec_stats = {"draft_tokens": 0, "accepted_tokens": 0, "verify_steps": 0}
        """Speculative decoding counters: drafts proposed, drafts accepted, request-steps that verified."""
        self.outputs = OutputProcessor(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    def _compile_decode(self) -> None:
        from effinfer.engine.compiled_decode import compile_decode, warm_up

        self.runner.compiled_forward = compile_decode(self.model)
        warm_up(self.runner.compiled_forward, self.config.cache.block_size, self.config.scheduler.max_num_seqs,
                self.device, self.config.show_progress)

    def _make_proposer(self):
        sc = self.config.spec
        if sc.speculative_method is None:
            return None
        from effinfer.decoding.spec import proposer_from_config

        return proposer_from_config(sc, self)

    def _make_early_exit(self):
        if not self.config.exit.early_exit_heads:
            return None
        from effinfer.decoding.early_exit import EarlyExit, ExitHeads

        self.runner.early_exit = EarlyExit(self.model, ExitHeads.load(self.config.exit.early_exit_heads, self.model))
        return self.runner.early_exit

    def load_side_model(self, name: str, quantization: str | None = None) -> LoadedModel:
        """A second model (a draft) on this engine's device and dtype, optionally quantized."""
        from effinfer.config import QuantConfig

        quant = QuantConfig(quantization=quantization).spec() if quantization else None
        return load_model(name, self.dtype, str(self.device), self.config.model.cache_dir, self.config.show_progress,
                          quant)

    def side_model(self, model, memory_gb: float, max_len: int | None = None) -> SideModel:
        """`model` with its own KV pool of `memory_gb` (not taken from this engine's), keyed by request id."""
        cc = self.config.cache
        num_blocks = max(1, int(memory_gb * 2**30) // bytes_per_block(model, cc.block_size, self.dtype))
        return SideModel(model, num_blocks, cc.block_size, self.dtype, self.device,
                         self.config.model.attention_backend, min(max_len or self.max_model_len, self.max_model_len))

    def _prune(self) -> dict:
        """Prune the loaded model in place, calibrating through a throwaway engine with a small cache
        (pruning can remove layers, so this engine's cache is sized afterwards)."""
        from pathlib import Path

        from effinfer.compression.prune import prune_model
        from effinfer.llm import LLM

        pc = self.config.prune
        scratch = EngineConfig(model=self.config.model, show_progress=False)
        scratch.cache.kv_cache_memory_gb = 0.1
        text = Path(pc.prune_calibration_text).read_text(encoding="utf-8") if pc.prune_calibration_text else None
        return prune_model(LLM.from_engine(LLMEngine(scratch, self.loaded)), pc.prune, pc.sparsity, text,
                           pc.prune_calibration_tokens, self.config.show_progress)

    def _num_blocks(self) -> int:
        cc = self.config.cache
        if cc.num_blocks:
            return cc.num_blocks
        per_block = bytes_per_block(self.model, cc.block_size, self.dtype, cc.kv_cache_dtype)
        return max(1, int(cc.kv_cache_memory_gb * 2**30) // per_block)

    def _max_model_len(self) -> int:
        capacity = self.block_manager.num_blocks * self.config.cache.block_size
        limit = self.config.scheduler.max_model_len or min(self.loaded.config.max_position_embeddings, capacity)
        if limit > self.loaded.config.max_position_embeddings:
            raise ValueError(f"max_model_len={limit} exceeds the model's context length "
                             f"{self.loaded.config.max_position_embeddings}")
        if limit > capacity:
            raise ValueError(f"max_model_len={limit} tokens do not fit in the KV cache ({capacity} tokens); "
                             "raise kv_cache_memory_gb or num_blocks, or lower max_model_len")
        return limit

    # ---- requests in ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.loaded.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.loaded.config.vocab_size})")
            return list(prompt)
        raise TypeError("a prompt is a non-empty string, list of token ids, or list of chat messages")

    def check_prompt_length(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty (it encodes to no tokens)")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but the context holds {self.max_model_len} "
                             "including at least one generated token; shorten the prompt")

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0) -> Request:
        params = params or SamplingParams()
        prompt_ids = self.encode_prompt(prompt)
        self.check_prompt_length(prompt_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt_ids, params, self.loaded.config.eos_token_ids, priority)
        request.generator = _generator(params.seed, self.device)
        self._set_exit_threshold(request)
        self.requests[request_id] = request
        self.outputs.add(request)
        self.scheduler.add(request)
        return request

    def _set_exit_threshold(self, request: Request) -> None:
        threshold = request.params.early_exit_threshold
        if threshold is not None and self.early_exit is None:
            raise ValueError("early_exit_threshold needs an engine with exit heads (start it with --early-exit-heads)")
        threshold = self.config.exit.early_exit_threshold if threshold is None else threshold
        if self.early_exit is not None and threshold < 1.0:
            request.exit_threshold = threshold
            request.cacheable_len = len(request.prompt_ids)

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request, FinishReason.ABORT)
            self.outputs.abort(request_id)
            if self.proposer is not None:
                self.proposer.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _check_offline_prompt(self, caller: str, prompt_ids: list[int]) -> None:
        if self.has_unfinished():
            raise RuntimeError(f"{caller} runs on an idle engine; finish or abort the requests first")
        if not 0 < len(prompt_ids) <= self.max_model_len:
            raise ValueError(f"a prompt must have 1 to {self.max_model_len} tokens, got {len(prompt_ids)}")

    @torch.inference_mode()
    def score(self, prompt_ids: list[int]) -> torch.Tensor:
        """Log-probabilities of the next token after every position of `prompt_ids`: [len, vocab] fp32.

        For offline evaluation (perplexity, KL divergence): the engine must be idle. The prompt runs in
        chunks of the step's token budget over blocks taken from the pool and returned at the end. With
        early exit on (a default threshold below 1) it runs one token per step, each free to exit as a
        generated token would: the distributions are the ones early-exit decoding uses given this text."""
        self._check_offline_prompt("score()", prompt_ids)
        request = Request("score", list(prompt_ids), SamplingParams(max_tokens=1))
        threshold = self.config.exit.early_exit_threshold if self.early_exit is not None else 1.0
        exit_threshold = threshold if threshold < 1.0 else None
        step, rows = 1 if exit_threshold is not None else self.config.scheduler.max_num_batched_tokens, []
        try:
            for start in range(0, len(prompt_ids), step):
                chunk = prompt_ids[start:start + step]
                if self.block_manager.allocate(request, len(chunk)) is None:
                    raise ValueError(f"the KV cache cannot hold {len(prompt_ids)} tokens; raise kv_cache_memory_gb")
                logits = self.runner.execute([ScheduledSeq(chunk, start, request.block_ids, True, exit_threshold is None,
                                                           exit_threshold=exit_threshold)])
                request.num_computed_tokens += len(chunk)
                rows.append(torch.log_softmax(logits, dim=-1))
        finally:
            self.block_manager.free(request)
        return torch.cat(rows)

    @contextmanager
    def prepared_prompt(self, prompt_ids: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, object]]:
        """The model inputs (token ids, positions, attention metadata) of one whole prompt on blocks taken
        from the pool, returned when the block ends: for code that runs the model's layers itself
        (layer-by-layer calibration). Same rules as `score`: an idle engine, a prompt that fits."""
        self._check_offline_prompt("prepared_prompt()", prompt_ids)
        request = Request("prepared", list(prompt_ids), SamplingParams(max_tokens=1))
        if self.block_manager.allocate(request, len(prompt_ids)) is None:
            raise ValueError(f"the KV cache cannot hold {len(prompt_ids)} tokens; raise kv_cache_memory_gb")
        try:
            input_ids, positions, meta, _ = self.runner.prepare([ScheduledSeq(list(prompt_ids), 0, request.block_ids,
                                                                              False)])
            yield input_ids, positions, meta
        finally:
            self.block_manager.free(request)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self._propose()
        scheduled = self.scheduler.schedule()
        sampled, logprobs = self.execute(scheduled) if not scheduled.is_empty else ({}, {})
        updated = self.scheduler.update(scheduled, sampled)
        return self._make_outputs(updated, scheduled.finished, logprobs)

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> tuple[dict[str, int], dict]:
        """Run the model on the step's packed tokens and sample for requests that reach their end."""
        seqs = [self._scheduled_seq(r, scheduled.num_new_tokens[r.request_id]) for r in scheduled.requests]
        if self.early_exit is not None and len(seqs) <= self.config.exit.early_exit_max_batch:
            for request, seq in zip(scheduled.requests, seqs):
                if seq.is_one_token_decode:
                    seq.exit_threshold = request.exit_threshold
        logits = self.runner.execute(seqs)
        sample_rows, sampling, verifying, row = [], [], [], 0
        for request, seq in zip(scheduled.requests, seqs):
            num_rows = self.runner.num_logit_rows(seq)
            if seq.all_logits:
                self.outputs.add_prompt_logprobs(request, seq.num_computed, logits[row:row + num_rows])
            if seq.num_spec:
                verifying.append((request, logits[row:row + num_rows]))
            elif seq.needs_logits:
                sample_rows.append(row + num_rows - 1)
                sampling.append(request)
            row += num_rows
        sampled, logprobs = {}, {}
        if sampling:
            rows = [SamplingRow(r.params, r.generator, r.prompt_ids, r.output_ids) for r in sampling]
            out = self.sampler(logits[sample_rows], rows)
            for request, token, lp in zip(sampling, out.token_ids, out.logprobs):
                sampled[request.request_id], logprobs[request.request_id] = [token], [lp]
        for request, rows_logits in verifying:
            sampled[request.request_id], logprobs[request.request_id] = self._verify(request, rows_logits)
        return sampled, logprobs

    def _propose(self) -> None:
        """Drafts for the running requests that decode, unless the batch is large enough that verifying
        drafts would cost more than it saves."""
        sc = self.config.spec
        decoding = [r for r in self.scheduler.running
                    if r.num_tokens - r.num_computed_tokens == 1 and r.params.prompt_logprobs is None]
        if len(decoding) > sc.speculative_max_batch:
            return
        from effinfer.decoding.spec import DraftRequest

        batch = []
        for request in decoding:
            k = request.num_spec_tokens or sc.num_speculative_tokens
            room = min(request.params.max_tokens - len(request.output_ids), self.max_model_len - request.num_tokens) - 1
            batch.append(DraftRequest(request.request_id, request.all_ids, max(0, min(k, room))))
        for request, drafts in zip(decoding, self.proposer.propose_batch(batch)):
            request.spec_ids = drafts

    def _verify(self, request: Request, rows_logits: torch.Tensor) -> tuple[list[int], list]:
        """Accept a prefix of the request's drafts against the target's distributions (see verify.py)
        and adapt its next draft length: one more after a full accept, else what was accepted + 1."""
        from effinfer.decoding.spec.verify import verify

        drafts = request.spec_ids
        contexts = [SamplingRow(request.params, request.generator, request.prompt_ids, request.output_ids + drafts[:j])
                    for j in range(len(drafts) + 1)]
        tokens = verify(final_probs(rows_logits, contexts), drafts, request.generator)
        self.proposer.observe(request.request_id, request.num_tokens, drafts, rows_logits)
        accepted = len(tokens) - 1
        self.spec_stats["draft_tokens"] += len(drafts)
        self.spec_stats["accepted_tokens"] += accepted
        self.spec_stats["verify_steps"] += 1
        k_max = self.config.spec.num_speculative_tokens
        request.num_spec_tokens = min(k_max, len(drafts) + 1) if accepted == len(drafts) else max(1, accepted + 1)
        raw = torch.log_softmax(rows_logits, dim=-1) if request.params.logprobs is not None else None
        rows = contexts[:len(tokens)]
        return tokens, gather_logprobs(raw[:len(tokens)] if raw is not None else None, torch.tensor(tokens), rows)

    @staticmethod
    def _scheduled_seq(request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        num_spec = len(request.spec_ids)
        completes = start + num_new - num_spec == request.num_tokens
        in_prompt = request.params.prompt_logprobs is not None and start < len(request.prompt_ids)
        tokens = request.token_slice(start, start + num_new - num_spec) + request.spec_ids
        return ScheduledSeq(tokens, start, request.block_ids, completes, in_prompt, num_spec)

    def _make_outputs(self, updated: list[Request], ended: list[Request], logprobs: dict) -> list[RequestOutput]:
        """`updated` got a token this step (detokenize it, check stop strings); `ended` were finished
        by the scheduler without one."""
        for request in updated:
            stop = self.outputs.process(request, logprobs.get(request.request_id))
            if stop is not None:
                self.scheduler.finish(request, FinishReason.STOP, stop_reason=stop)
        outputs = [self.outputs.make_output(r) for r in updated + ended]
        for request in updated + ended:
            if request.is_finished:
                self.requests.pop(request.request_id, None)
                if self.proposer is not None:
                    self.proposer.release(request.request_id)
        return outputs


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    return generator
