"""The facade: `LLM(model, **config).generate(prompts, sampling_params)` over an engine built in this process
(`effinfer.build.build_engine`, re-exported here) or, with `engine_process=True`, in an engine core
process of its own (`effinfer.core_process.CoreEngine`, what `effinfer serve` runs)."""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import torch

from effinfer.build import build_engine
from effinfer.config import EngineConfig
from effinfer.engine.llm_engine import LLMEngine, Prompt
from effinfer.engine.offline import score
from effinfer.loader.catalog import DEFAULT_MODEL
from effinfer.outputs import GenerationResult, RequestOutput
from effinfer.sampling_params import SamplingParams
from effinfer.utils import progress

__all__ = ["LLM", "build_engine"]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, engine_process: bool = False, **config):
        """`engine_process`: run the engine in a core process of its own, as `effinfer serve` does (this process
        then holds the tokenizer only); by default it runs here."""
        self.config = EngineConfig.from_kwargs(model=model, **config)
        if engine_process:
            from effinfer.core_process import CoreEngine

            self.engine = CoreEngine(self.config)
        else:
            self.engine = build_engine(self.config)
        self._request_ids = itertools.count()
        """Every request this LLM adds gets an id of its own: an id used again could meet outputs of its earlier
        request still on their way from a core process (one a stop string ended here after the core stepped it)."""

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """The offline facade over an engine built elsewhere (e.g. on an already-loaded model)."""
        llm = cls.__new__(cls)
        llm.config, llm.engine, llm._request_ids = engine.config, engine, itertools.count()
        return llm

    def close(self) -> None:
        """Stop the engine core process (with `engine_process=True`; an in-process engine needs nothing)."""
        if hasattr(self.engine, "close"):
            self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def prune_report(self) -> dict | None:
        """What pruning at load removed (None without `prune`)."""
        return self._in_process("prune_report").loaded.prune_report

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[GenerationResult]:
        """Run every prompt to completion in one continuous batch; results come back in prompt order."""
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        for prompt_ids in encoded:  # fail before anything is queued
            self.engine.check_prompt_length(prompt_ids)
        call = next(self._request_ids)
        ids = [[f"gen-{call}-{i}-{k}" for k in range(p.n)] for i, p in enumerate(params)]
        try:
            self._add_all(encoded, params, priority or [0] * len(prompts), ids)
            finals = self._run(sum(p.n for p in params), use_tqdm)
        except BaseException:   # a refused request, a failed step, Ctrl-C: leave nothing of this call running
            for request_id in (rid for group in ids for rid in group):
                self.engine.abort(request_id)
            raise
        return [GenerationResult(prompt_ids, [finals[i] for i in group]) for prompt_ids, group in zip(encoded, ids)]

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling: str = "mean", use_tqdm: bool = False
              ) -> list[list[float]]:
        """One L2-normalised vector per prompt: the final hidden states of its tokens pooled ("mean" or "last"),
        in prompt order. Embedding requests batch with everything else the engine runs."""
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        results = self.generate(prompts, SamplingParams(max_tokens=1, pooling=pooling), use_tqdm=use_tqdm)
        return [r.outputs[0].embedding for r in results]

    def score(self, prompt: Prompt) -> "torch.Tensor":
        """[num_tokens, vocab] log-probabilities of the next token after each prompt position (evaluation)."""
        return score(self._in_process("score()"), self.engine.encode_prompt(prompt))

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's output after every step that adds to it; abort it if the caller stops early."""
        request_id = f"stream-{next(self._request_ids)}"
        self.engine.add_request(prompt, params, request_id)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def _in_process(self, what: str) -> LLMEngine:
        if not isinstance(self.engine, LLMEngine):
            raise RuntimeError(f"{what} needs the engine in this process; create the LLM without engine_process=True")
        return self.engine

    def _add_all(self, encoded: list[list[int]], params: list[SamplingParams], priority: list[int],
                 ids: list[list[str]]) -> None:
        for i, (prompt_ids, p) in enumerate(zip(encoded, params)):
            for k, request_id in enumerate(ids[i]):
                self.engine.add_request(prompt_ids, p.for_sample(k), request_id, priority[i])

    def _run(self, num_requests: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = progress(range(num_requests), "generate", use_tqdm, unit="req")
        bar_iter = iter(bar)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
                    next(bar_iter, None)
        return finals


def _is_single_prompt(prompts) -> bool:
    if isinstance(prompts, str):
        return True
    return bool(prompts) and isinstance(prompts, list) and all(isinstance(x, (int, dict)) for x in prompts)
