"""The systems that the in-process benchmarks drive: effinfer's engine and its peers, one interface.

`bench latency | throughput | quality | compare` measure a `System`: prefill a prompt, time the tokens
of one decode, run a request set to completion, and score token sequences (log-probabilities for
perplexity, KL divergence and multiple-choice accuracy). The peers run the same GGUF file or HF folder
with the same prompts (token ids from effinfer's tokenizer) and the same thread count:

- `transformers`: Hugging Face `generate()` / forward, request sets as static left-padded batches;
- `llamacpp-native`: llama.cpp's own tools (llama-bench, llama-batched-bench; `make peers` builds them),
  what a llama.cpp user measures with: latency, request sets and the sweep, not quality;
- `llamacpp`: llama.cpp through `llama-cpp-python` (optional extra), one sequence at a time (its
  Python API has no batched decode), for quality (scoring) beside the others.
  `quant=Q4_0` (or Q8_0, Q4_K_M, ...) requantizes the file with llama.cpp's own quantizer into the cache first.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from effinfer.sampling_params import SamplingParams

PEER_SYSTEMS = ("transformers", "llamacpp", "llamacpp-native")


class System(ABC):
    name: str
    tokenizer: object
    own_tools: bool = False
    """Timed by its own instruments (`own_measurement`), not through the methods below."""

    @abstractmethod
    def prefill(self, prompt: list[int]) -> None:
        """Compute the prompt and its first output token."""

    @abstractmethod
    def decode_times(self, prompt: list[int], gen_len: int) -> list[float]:
        """perf_counter() at each of `gen_len` greedy tokens (EOS ignored)."""

    @abstractmethod
    def run_batch(self, prompts: list[list[int]], output_lens: list[int], stop_at_eos: bool = False) -> int:
        """Greedy-generate every request to its length (EOS ignored unless `stop_at_eos`: then a request may
        end early, where the model would stop); returns the output tokens made."""

    @abstractmethod
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """[len, vocab] fp32 log-probabilities of the token after each position."""

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of weights that one decode step reads."""

    def describe(self) -> dict:
        return {"system": self.name}

    def input_files(self) -> dict:
        """{role: path} of the files this system read (records keep their sha256)."""
        return {}

    def own_measurement(self, workload: str, **shape) -> dict:
        """A workload's metrics, timed by the system's own instruments (where `own_tools`)."""
        raise NotImplementedError(f"{self.name} is timed through its methods, not by tools of its own")

    def spec_stats(self) -> dict:
        """Speculative decoding counters (draft_tokens, accepted_tokens, verify_steps), if any."""
        return {}

    def forget_cache(self) -> None:
        """Drop anything kept from earlier requests (a prefix cache), so each measurement computes its
        whole prompt, as the peers do; repeated rounds of a comparison reuse the same prompts."""

    def sequence_logprobs(self, sequences: list[list[int]], starts: list[int]) -> list[float]:
        """Sum of log p(token_j | tokens_<j) for j >= start, per sequence (multiple-choice scoring)."""
        out = []
        for ids, start in zip(sequences, starts):
            rows = self.score(ids)[start - 1:len(ids) - 1]
            out.append(float(rows.gather(1, torch.tensor(ids[start:])[:, None]).sum()))
        return out


class EngineSystem(System):
    """effinfer itself, through the public `LLM` API."""

    def __init__(self, llm, name: str = "effinfer"):
        self.llm, self.name, self.tokenizer = llm, name, llm.tokenizer

    def forget_cache(self):
        self.llm.engine.block_manager.reset_prefix_cache()

    def prefill(self, prompt):
        self.llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)

    def decode_times(self, prompt, gen_len):
        params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
        times = []
        for out in self.llm.stream(prompt, params):
            times.extend([time.perf_counter()] * len(out.new_token_ids))
        return times

    def run_batch(self, prompts, output_lens, stop_at_eos=False):
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=not stop_at_eos) for n in output_lens]
        results = self.llm.generate(prompts, params, use_tqdm=True)
        return sum(len(o.token_ids) for r in results for o in r.outputs)

    def score(self, token_ids):
        return self.llm.score(token_ids)

    def sequence_logprobs(self, sequences, starts):
        # one continuous batch: the engine packs every sequence and reports each prompt token's logprob
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        results = self.llm.generate(sequences, params, use_tqdm=False)
        return [sum(lp.logprob for lp in r.outputs[0].prompt_logprobs[start:]) for r, start in zip(results, starts)]

    def spec_stats(self) -> dict:
        stats = dict(self.llm.engine.spec_stats)
        if self.llm.engine.early_exit is not None:
            exits = self.llm.engine.early_exit.stats
            stats.update(exit_candidates=exits["candidates"], exited_tokens=exits["exited"])
        return stats

    def weight_bytes(self):
        model = self.llm.engine.model
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def input_files(self):
        config = self.llm.engine.config
        return {"model": self.llm.engine.loaded.path, "draft_model": config.spec.speculative_model,
                "speculative_corpus": config.spec.speculative_corpus, "early_exit_heads": config.exit.early_exit_heads,
                "prune_calibration_text": config.prune.prune_calibration_text}

    def describe(self):
        from effinfer.layers.linear import kernel_report

        engine = self.llm.engine
        return {"system": "effinfer", "engine": self.llm.config.to_dict(), "summary": engine.summary,
                "kernels": {"linear": kernel_report(engine.model), "decode_attention": _decode_attention(engine.model)}}


class LlamaCppNativeSystem(System):
    """llama.cpp timed by its own tools on the same file (`llamacpp_tools`): latency by llama-bench, request sets
    and the sweep by llama-batched-bench, on random tokens as those tools make them. Scoring (quality) needs the
    Python binding, `system=llamacpp`."""

    name = "llamacpp-native"
    own_tools = True

    def __init__(self, path: Path, tokenizer, num_threads: int, quant: str | None = None, cache_dir: Path | None = None):
        from effinfer.bench import llamacpp_tools

        self.tools, self.tokenizer, self.threads, self.quant, self.source = llamacpp_tools, tokenizer, num_threads, quant, path
        llamacpp_tools.tool("llama-bench")       # named now if missing, before any measuring starts
        self.path = llamacpp_tools.requantize(path, quant, cache_dir or path.parent, num_threads) if quant else path

    def own_measurement(self, workload, **shape):
        if workload == "latency":
            return self.tools.llama_bench(self.path, shape["prompt_len"], shape["gen_len"], shape["repetitions"],
                                          self.threads)
        if workload == "sweep":
            return self.tools.batched_bench(self.path, shape["batch_sizes"], shape["input_len"], shape["output_len"],
                                            self.threads)
        raise ValueError(f"llamacpp-native has no {workload} measurement")

    def _in_process_only(self, *args, **kwargs):
        raise ValueError("llamacpp-native runs llama.cpp's own tools, which do not score text or stream tokens here; "
                         "use system=llamacpp (llama-cpp-python) for quality")

    prefill = decode_times = run_batch = score = _in_process_only

    def weight_bytes(self):
        return self.path.stat().st_size

    def input_files(self):
        return {"model": self.source, "requantized_model": self.path if self.quant else None}

    def describe(self):
        return {"system": "llamacpp-native", "llamacpp_build": self.tools.build(), "gguf": str(self.path),
                "quant": self.quant, "n_threads": self.threads}


def _decode_attention(model) -> str:
    caches = [m.kv_cache for m in model.modules() if getattr(m, "kv_cache", None) is not None]
    if not caches:
        return "none"
    return "effinfer paged_decode_attention (pages read in place)" if caches[0].decode_kernel else "pages gathered + matmul"


class TransformersSystem(System):
    """Hugging Face transformers on the same GGUF file (dequantized by transformers) or HF folder."""

    name = "transformers"

    def __init__(self, path: Path, tokenizer, dtype: str = "bfloat16", batch_size: int = 64):
        import transformers

        kwargs = {"gguf_file": path.name} if path.is_file() else {}
        folder = path.parent if path.is_file() else path
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), **kwargs).eval()
        self.tokenizer, self.dtype, self.batch_size, self.path = tokenizer, dtype, batch_size, path
        self.pad_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
        self.version = transformers.__version__

    @torch.inference_mode()
    def prefill(self, prompt):
        self.model(torch.tensor([prompt]))

    @torch.inference_mode()
    def decode_times(self, prompt, gen_len):
        times = []
        streamer = _TimeStreamer(times)
        self._generate(torch.tensor([prompt]), None, gen_len, streamer)
        return times[1:]  # the streamer sees the prompt first

    @torch.inference_mode()
    def run_batch(self, prompts, output_lens, stop_at_eos=False):
        _no_stop_at_eos(self, stop_at_eos)
        made = 0
        for i in range(0, len(prompts), self.batch_size):  # static batches, left-padded to the longest
            chunk, lens = prompts[i:i + self.batch_size], output_lens[i:i + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            self._generate(ids, mask, max(lens), None)
            made += sum(lens)   # a static batch runs every row to the longest length; count what was asked
        return made

    @torch.inference_mode()
    def score(self, token_ids):
        logits = self.model(torch.tensor([token_ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def weight_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def input_files(self):
        return {"model": self.path}

    def describe(self):
        return {"system": "transformers", "transformers": self.version, "dtype": self.dtype,
                "batch_size": self.batch_size}

    def _generate(self, ids, mask, max_new_tokens, streamer):
        self.model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=self.pad_id, streamer=streamer)


class _TimeStreamer:
    """transformers streamer protocol (`put`/`end`) that records when each token arrives."""

    def __init__(self, times: list[float]):
        self.times = times

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class LlamaCppSystem(System):
    """llama.cpp through llama-cpp-python on a GGUF file, as llama-bench would run it."""

    name = "llamacpp"

    def __init__(self, path: Path, tokenizer, num_threads: int, n_ctx: int = 4096, quant: str | None = None,
                 cache_dir: Path | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise ValueError("the llamacpp peer needs llama-cpp-python: pip install -e '.[llamacpp]'") from None
        if path.is_dir():
            raise ValueError("the llamacpp peer runs GGUF files; got a folder")
        self.path = requantize(path, quant, cache_dir or path.parent) if quant else path
        self.kwargs = dict(model_path=str(self.path), n_threads=num_threads, n_threads_batch=num_threads,
                           n_ctx=n_ctx, n_batch=512, verbose=False)
        self.llm = llama_cpp.Llama(**self.kwargs)
        self._scorer = None     # a second context with logits for every position, made on first use
        self.tokenizer, self.quant, self.version = tokenizer, quant, llama_cpp.__version__

    def prefill(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)

    def decode_times(self, prompt, gen_len):
        times = []
        for _ in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == gen_len:
                break
        return times

    def run_batch(self, prompts, output_lens, stop_at_eos=False):
        _no_stop_at_eos(self, stop_at_eos)
        for prompt, n in zip(prompts, output_lens):
            self.decode_times(prompt, n)
        return sum(output_lens)

    def score(self, token_ids):
        import llama_cpp

        if self._scorer is None:
            self._scorer = llama_cpp.Llama(**self.kwargs, logits_all=True)
        self._scorer.reset()
        self._scorer.eval(token_ids)
        logits = torch.from_numpy(self._scorer.scores[:len(token_ids)].copy())
        return torch.log_softmax(logits.float(), dim=-1)

    def weight_bytes(self):
        return self.path.stat().st_size

    def input_files(self):
        return {"model": self.path}

    def describe(self):
        return {"system": "llamacpp", "llama_cpp_python": self.version, "gguf": str(self.path),
                "quant": self.quant, "n_threads": self.kwargs["n_threads"]}


def requantize(path: Path, quant: str, out_dir: Path) -> Path:
    """The GGUF file re-quantized to `quant` by llama.cpp's own quantizer (made once, then reused)."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ValueError(f"unknown llama.cpp quantization {quant!r}; e.g. Q8_0, Q4_0, Q4_K_M, BF16")
    out = Path(out_dir) / f"{path.stem}.requant-{quant.upper()}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = ftype, True
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(), params) != 0:
            raise ValueError(f"llama.cpp could not quantize {path} to {quant}")
        tmp.rename(out)
    return out


def _no_stop_at_eos(system: System, stop_at_eos: bool) -> None:
    if stop_at_eos:
        raise ValueError(f"--stop-at-eos is for effinfer configurations; {system.name} runs every request to its length")


def make_system(options: dict, base_kwargs: dict) -> System:
    """A system from one `--config` entry: `system=transformers|llamacpp` picks a peer, else the engine."""
    from effinfer.llm import LLM

    options = dict(options)
    kind = options.pop("system", "effinfer")
    if kind == "effinfer":
        return EngineSystem(LLM(**{**base_kwargs, **options}))
    if kind not in PEER_SYSTEMS:
        raise ValueError(f"unknown system {kind!r}; choose effinfer, {', '.join(PEER_SYSTEMS)}")
    from effinfer.loader.source import load_tokenizer, resolve_model_path

    model = options.pop("model", base_kwargs.get("model"))
    from effinfer.loader import catalog

    cache_dir = base_kwargs.get("cache_dir")
    path, tokenizer = resolve_model_path(model, cache_dir), load_tokenizer(model, cache_dir)
    threads = base_kwargs.get("num_threads") or torch.get_num_threads()
    if kind == "transformers":
        return TransformersSystem(path, tokenizer, options.pop("dtype", base_kwargs.get("dtype", "bfloat16")),
                                  **_leftover(options, kind))
    if kind == "llamacpp-native":
        return LlamaCppNativeSystem(path, tokenizer, threads, quant=options.pop("quant", None),
                                    cache_dir=catalog.cache_dir(cache_dir) / "llamacpp", **_leftover(options, kind))
    return LlamaCppSystem(path, tokenizer, threads, quant=options.pop("quant", None),
                          cache_dir=catalog.cache_dir(cache_dir) / "llamacpp", **_leftover(options, kind))


def _leftover(options: dict, kind: str) -> dict:
    allowed = {"transformers": {"batch_size"}, "llamacpp": {"n_ctx"}, "llamacpp-native": set()}[kind]
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"option(s) {', '.join(sorted(unknown))} do not apply to the {kind} peer "
                         f"(it takes model, dtype/quant, {', '.join(sorted(allowed))})")
    return options
