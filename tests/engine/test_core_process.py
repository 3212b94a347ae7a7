"""`LLM(model, engine_process=True)`: the offline facade over an engine core process of its own (the one
`effinfer serve` runs) gives the in-process engine's outputs (greedy, seeded samples, n > 1, streams, stop
strings), refuses what it cannot do there with a clear error, reports a core that died, and stops its core."""

from __future__ import annotations

import os
import signal

import pytest

from effinfer import LLM, SamplingParams
from tests.tiny_models import save_tiny_folder

COMMON = dict(dtype="float32", show_progress=False, num_blocks=64, max_num_seqs=8, max_model_len=256)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13] * 2, [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]
PARAMS = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=12, temperature=0.8, seed=7, n=2, ignore_eos=True, logprobs=2),
          SamplingParams(max_tokens=16, temperature=0.0, stop=["w3"], ignore_eos=True)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_folder("llama", path)
    return path


@pytest.fixture(scope="module")
def in_core(folder):
    llm = LLM(str(folder), engine_process=True, **COMMON)
    yield llm
    llm.close()


def outputs(results):
    return [[(o.token_ids, o.text, o.finish_reason, [(lp.logprob, [tuple(t) for t in lp.top]) for lp in o.logprobs or []])
             for o in r.outputs] for r in results]


def test_the_core_process_gives_the_in_process_outputs(folder, in_core):
    expected = LLM(str(folder), **COMMON).generate(PROMPTS, PARAMS, use_tqdm=False)
    assert outputs(in_core.generate(PROMPTS, PARAMS, use_tqdm=False)) == outputs(expected)
    assert in_core.engine.info.settings["compile"] == "off"     # offline: no background compile in the core


def test_streams_and_early_stops(in_core):
    whole = in_core.generate(PROMPTS[1], PARAMS[0], use_tqdm=False)[0].token_ids
    streamed = list(in_core.stream(PROMPTS[1], PARAMS[0]))
    assert streamed[-1].finished and streamed[-1].token_ids == whole
    assert sum(len(o.new_token_ids) for o in streamed) == len(whole)
    for out in in_core.stream(PROMPTS[1], PARAMS[0]):     # leaving early aborts the request in the core
        break
    assert not in_core.engine.has_unfinished()
    assert in_core.generate(PROMPTS[1], PARAMS[0], use_tqdm=False)[0].token_ids == whole


def test_what_needs_the_engine_here_says_so(in_core):
    with pytest.raises(ValueError, match="the context holds 256"):
        in_core.generate([[5] * 300], PARAMS[0], use_tqdm=False)
    with pytest.raises(RuntimeError, match=r"^score\(\) needs the engine in this process"):
        in_core.score([5, 6, 7])


def test_a_dead_core_is_an_error_not_a_hang(folder):
    llm = LLM(str(folder), engine_process=True, **COMMON)
    try:
        llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), "r")
        llm.engine.step()
        os.kill(llm.engine.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"the engine process died \(exit code -9\)"):
            while llm.engine.has_unfinished():
                llm.engine.step()
        with pytest.raises(RuntimeError, match=r"the engine process has died \(exit code -9\)"):
            llm.generate(PROMPTS, PARAMS[0], use_tqdm=False)      # not a send that waits for it forever
    finally:
        llm.close()
    assert not llm.engine.has_unfinished()


def test_close_stops_the_core(folder):
    llm = LLM(str(folder), engine_process=True, **COMMON)
    pid = llm.engine.pid
    llm.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_script_without_a_main_guard_is_told_why(folder, tmp_path):
    """The core is spawned: it re-imports the script, which must not start a second core on import."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text("from effinfer import LLM\n"
                      f"LLM({str(folder)!r}, engine_process=True, dtype='float32', num_blocks=16, show_progress=False)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert run.returncode != 0 and "needs an `if __name__ == '__main__':` guard" in run.stderr


def test_a_stop_string_leaves_nothing_for_the_next_call(folder, in_core):
    """A stop string ends a request here while the core may already have stepped it again; those late outputs
    must not reach the next call's requests, and prompt logprobs cross the boundary with the first output."""
    stopped = SamplingParams(max_tokens=200, temperature=0.0, stop=["w3"], ignore_eos=True, prompt_logprobs=2)
    expected = outputs(LLM(str(folder), **COMMON).generate(PROMPTS[0], stopped, use_tqdm=False))
    assert expected[0][0][2] == "stop"          # else the test could not tell
    local = LLM(str(folder), **COMMON).generate(PROMPTS[0], stopped, use_tqdm=False)[0].outputs[0].prompt_logprobs
    for _ in range(3):
        result = in_core.generate(PROMPTS[0], stopped, use_tqdm=False)
        assert outputs(result) == expected
        assert [(lp.logprob, lp.top) if lp else None for lp in result[0].outputs[0].prompt_logprobs] == \
               [(lp.logprob, [tuple(t) for t in lp.top]) if lp else None for lp in local]


def test_the_core_step_alone_keeps_no_text_state(folder):
    """What the core process runs: token ids only, every request gone once finished, no detokenizer state."""
    engine = LLM(str(folder), **COMMON).engine
    expected = [o.token_ids for r in LLM.from_engine(engine).generate(PROMPTS, PARAMS[0], use_tqdm=False) for o in r.outputs]
    engine.text_elsewhere()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, PARAMS[0], f"r{i}")
    tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for out in engine.core_step():
            tokens[out.request_id] += out.new_token_ids
    assert list(tokens.values()) == expected and not engine.requests and engine.outputs is None
