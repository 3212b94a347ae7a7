"""`--compile`: decode steps through torch.compile give the eager engine's greedy tokens (fp32), batched and
alone, over block boundaries, with sliding windows and int8 pages; every batch size is compiled at start-up
(no recompile while serving); a failed compile is one clear error."""

from __future__ import annotations

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.engine import compiled_decode
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


def _count_calls(runner) -> dict:
    calls, forward = {"n": 0}, runner.compiled_forward

    def counted(*args):
        calls["n"] += 1
        return forward(*args)

    runner.compiled_forward = counted
    return calls
