"""The peers behind the benchmarks' `System` interface, on the same GGUF file as effinfer."""

from __future__ import annotations

import pytest

from effinfer.bench import quality
from effinfer.bench.offline import run_latency, run_throughput
from effinfer.bench.systems import make_system
from effinfer.bench.workloads import random_requests

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity.")


def _check_system(system, reference_ppl: float) -> None:
    wins = quality.windows(system.tokenizer.encode(TEXT), window=64, stride=64)
    assert quality.perplexity(system, wins)["perplexity"] == pytest.approx(reference_ppl, rel=0.05)
    times = system.decode_times(system.tokenizer.encode("Once upon a time"), 6)
    assert len(times) == 6 and times == sorted(times)
    latency = run_latency(system, prompt_len=16, gen_len=4, repetitions=1, measure_machine=False)
    assert latency["pp16_tok_s"] > 0 and latency["tg4_tok_s"] > 0 and latency["decode_bytes_per_token"] > 1e6
    requests = random_requests(system.tokenizer, 3, 12, 5, as_text=False)
    assert run_throughput(system, requests)["total_output_tokens"] == 15


@pytest.fixture(scope="module")
def engine_ppl(smollm2_path):
    system = make_system({}, {"model": str(smollm2_path), "dtype": "float32", "show_progress": False,
                              "kv_cache_memory_gb": 0.1})
    return quality.perplexity(system, quality.windows(system.tokenizer.encode(TEXT), 64, 64))["perplexity"]


def test_transformers_peer(smollm2_path, engine_ppl):
    system = make_system({"system": "transformers"}, {"model": str(smollm2_path), "dtype": "float32"})
    assert system.describe()["system"] == "transformers"
    _check_system(system, engine_ppl)


@pytest.mark.slow     # `make test-slow` installs the binding (it compiles llama.cpp); the native tools run in `make test`
def test_llamacpp_peer(smollm2_path, engine_ppl):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra (make test-slow installs it)")
    system = make_system({"system": "llamacpp"}, {"model": str(smollm2_path)})
    _check_system(system, engine_ppl)    # same Q4_1 weights, llama.cpp's own kernels


def test_unknown_system_and_options_are_named(smollm2_path):
    with pytest.raises(ValueError, match="unknown system 'vllm'"):
        make_system({"system": "vllm"}, {"model": str(smollm2_path)})
    with pytest.raises(ValueError, match="max_num_seqs do not apply to the transformers peer"):
        make_system({"system": "transformers", "max_num_seqs": 4}, {"model": str(smollm2_path)})
