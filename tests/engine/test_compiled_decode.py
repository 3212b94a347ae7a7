"""`--compile`: decode steps through torch.compile give the eager engine's greedy tokens (fp32), batched and
alone, over block boundaries, with sliding windows and int8 pages; every batch size is compiled at start-up
(no recompile while serving); a failed compile is one clear error. A server's engine (compile auto) serves
eagerly at once and switches to the graphs built in the background between two steps of running streams;
a failed background compile leaves it eager."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.config import EngineConfig
from effinfer.engine import compiled_decode
from effinfer.llm import build_engine
from tests.tiny_models import save_tiny_folder

COMMON = dict(dtype="float32", show_progress=False, kv_cache_memory_gb=0.05, max_num_seqs=4)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13] * 2, [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]   # 16-token blocks


@pytest.mark.parametrize("family, options", [("qwen2", {"kv_cache_dtype": "int8"}), ("gemma3", {})])
def test_compiled_decode_gives_the_eager_tokens(tmp_path, family, options):
    save_tiny_folder(family, tmp_path)      # qwen2: q/k/v biases, int8 pages with key scales; gemma3: windows of 8
    eager = LLM(str(tmp_path), **COMMON, **options)
    expected = [r.token_ids for r in eager.generate(PROMPTS, GREEDY, use_tqdm=False)]
    expected_alone = eager.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].token_ids

    llm = LLM(str(tmp_path), compile=True, **COMMON, **options)
    calls = _count_calls(llm.engine.runner)
    with torch.compiler.set_stance("fail_on_recompile"):      # warm-up compiled every batch size already
        got = [r.token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        got_alone = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].token_ids
    assert got == expected and got_alone == expected_alone
    assert calls["n"] >= 2 * (GREEDY.max_tokens - 1)          # the decode steps did run compiled


def test_two_compiled_engines_keep_their_own_graphs(tmp_path):
    """Same model class, same shapes, other weights (int8): graphs are cached per code object and the
    model's own guards are dropped, so each engine must compile its own copy of the forward."""
    save_tiny_folder("llama", tmp_path)
    expected = {q: LLM(str(tmp_path), quantization=q, **COMMON).generate(PROMPTS[1:2], GREEDY, use_tqdm=False)[0].token_ids
                for q in (None, "int8")}
    engines = {q: LLM(str(tmp_path), quantization=q, compile=True, **COMMON) for q in (None, "int8")}
    assert expected[None] != expected["int8"]       # else the test could not tell the graphs apart
    for q, llm in engines.items():
        assert llm.generate(PROMPTS[1:2], GREEDY, use_tqdm=False)[0].token_ids == expected[q]


def test_compiled_batches_stay_on_one_side_of_the_kernel_switch():
    from effinfer.compression.quant.weight_only import KERNEL_MAX_ROWS

    assert compiled_decode.MAX_BATCH <= KERNEL_MAX_ROWS      # else batches above the switch need a third graph


def test_failed_compile_is_one_clear_error(monkeypatch, tmp_path):
    def no_compiler(model):
        def forward(*args):
            raise OSError("C++ compiler not found\n<compiler trace>")
        return forward

    monkeypatch.setattr(compiled_decode, "compile_decode", no_compiler)
    save_tiny_folder("llama", tmp_path)
    with pytest.raises(RuntimeError, match=r"^compiling the decode step failed \(OSError: C\+\+ compiler not found\); "
                                           r"run without --compile$"):
        LLM(str(tmp_path), compile=True, **COMMON)


def serving_engine(folder):
    """The engine a server builds with no compile flag."""
    return build_engine(EngineConfig.from_kwargs(model=str(folder), **COMMON), serving=True)


def run_to_end(engine, prompts, params, steps: int | None = None) -> dict[str, list[int]]:
    """Add `prompts` (ids r0, r1, ...) unless running, then step (`steps` times, or to the end); -> tokens so far."""
    if not engine.has_unfinished():
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, params, f"r{i}")
    tokens = {}
    while engine.has_unfinished() and (steps is None or steps > 0):
        for out in engine.step():
            tokens[out.request_id] = out.token_ids
        steps = None if steps is None else steps - 1
    return tokens


def test_background_compile_switches_between_steps_of_running_streams(tmp_path, monkeypatch):
    """The compile (here: the eager forward, counted) runs on its own thread, held after its first warm-up
    step until the test releases it; the streams keep decoding meanwhile, and their steps after the switch
    run the compiled forward. The warm-up steps write only the scratch block (the first request owns block 0),
    so the streams' tokens stay the eager ones."""
    save_tiny_folder("llama", tmp_path)
    expected = [r.token_ids for r in LLM(str(tmp_path), **COMMON).generate(PROMPTS, GREEDY, use_tqdm=False)]
    warmed, release, calls = threading.Event(), threading.Event(), {"n": 0}

    def held_compile(model, freeze=True):
        def forward(*args):
            calls["n"] += 1
            out = model.forward(*args)
            if not release.is_set():    # the first warm-up step has written its K/V: wait here
                warmed.set()
                assert release.wait(60)
            return out
        return forward

    monkeypatch.setattr(compiled_decode, "compile_decode", held_compile)
    engine = serving_engine(tmp_path)
    assert engine.runner.decode_steps == "compiling" and "compiled in the background" in engine.summary
    first = run_to_end(engine, PROMPTS, GREEDY, steps=3)
    assert warmed.wait(60)
    more = run_to_end(engine, PROMPTS, GREEDY, steps=3)     # decoding while the warm-up is held mid-way
    assert engine.runner.compiled_forward is None and all(0 < len(t) < GREEDY.max_tokens for t in more.values())
    assert all(len(more[rid]) > len(first[rid]) for rid in first)
    release.set()
    engine.background_compile.thread.join(60)
    assert engine.runner.decode_steps == "compiled" and engine.stats().decode_steps == "compiled"
    calls["n"] = 0                                      # not the warm-up's steps
    rest = run_to_end(engine, PROMPTS, GREEDY)
    assert [rest[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert calls["n"] >= GREEDY.max_tokens - 8          # the decode steps after the switch ran compiled


def test_unseeded_requests_draw_seeds_from_the_engine_not_the_global_state(tmp_path):
    """torch.compile saves the global random state before a compile and restores it after: a background
    compile would hand the seeds drawn meanwhile out again, if requests drew them from there."""
    save_tiny_folder("llama", tmp_path)
    engine = LLM(str(tmp_path), **COMMON).engine
    seeds = []
    for i in range(3):
        torch.manual_seed(0)      # what a compile on another thread does to the global state
        seeds.append(engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), f"r{i}").generator.initial_seed())
    assert len(set(seeds)) == 3


def test_a_failed_background_compile_leaves_the_engine_eager(tmp_path, monkeypatch, caplog):
    def no_compiler(model, freeze=True):
        raise OSError("C++ compiler not found\n<compiler trace>")

    monkeypatch.setattr(compiled_decode, "compile_decode", no_compiler)
    save_tiny_folder("llama", tmp_path)
    expected = LLM(str(tmp_path), **COMMON).generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].token_ids
    with caplog.at_level(logging.WARNING, logger="effinfer"):
        engine = serving_engine(tmp_path)
        engine.background_compile.thread.join(60)
    assert engine.runner.decode_steps == "eager (compile failed)" and engine.runner.compiled_forward is None
    assert "compiling the decode step failed (OSError: C++ compiler not found); decode steps stay eager" in caplog.text
    assert run_to_end(engine, PROMPTS[:1], GREEDY)["r0"] == expected


def test_background_compile_with_the_compiler(tmp_path):
    """The real thing: torch.compile on a thread while the engine decodes eagerly, then the graphs, with no
    recompile for any batch size and the eager tokens throughout."""
    save_tiny_folder("qwen2", tmp_path)
    expected = [r.token_ids for r in LLM(str(tmp_path), **COMMON).generate(PROMPTS, GREEDY, use_tqdm=False)]
    engine = serving_engine(tmp_path)
    while engine.runner.decode_steps == "compiling":     # decoding eagerly meanwhile (until its timeout)
        tokens = run_to_end(engine, PROMPTS, GREEDY)
        assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected
        engine.background_compile.thread.join(0.5)
    assert engine.runner.decode_steps == "compiled"
    calls = _count_calls(engine.runner)
    with torch.compiler.set_stance("fail_on_recompile"):
        tokens = run_to_end(engine, PROMPTS, GREEDY)
        alone = run_to_end(engine, PROMPTS[:1], GREEDY)
    assert [tokens[f"r{i}"] for i in range(len(PROMPTS))] == expected and alone["r0"] == expected[0]
    assert calls["n"] >= 2 * (GREEDY.max_tokens - 1)


def _count_calls(runner) -> dict:
    calls, forward = {"n": 0}, runner.compiled_forward

    def counted(*args):
        calls["n"] += 1
        return forward(*args)

    runner.compiled_forward = counted
    return calls
