"""Bad input on the command line: one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "effinfer.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'.*smollm2-135m-instruct"),
    (["generate", "hi", "--model", "/nope/model.gguf"], "does not exist"),
    (["generate", "hi", "--temperature", "-1"], "temperature=-1.0 is invalid"),
    (["generate", "hi", "--top-p", "0"], "top_p=0.0 is invalid"),
    (["generate", "hi", "--block-size", "3"], "block_size=3 must be a power of two"),
    (["generate", "hi", "--dtype", "int3"], "dtype='int3' is not supported"),
    (["generate", "hi", "--early-exit-heads", "/nope/heads.safetensors"], "early_exit_heads='/nope/heads.safetensors': no such file"),
    (["exit-heads", "--text", "/nope/corpus.txt", "--out", "/tmp/h.safetensors"], "No such file or directory: /nope/corpus.txt"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    import re
    assert re.search(message, result.stderr), result.stderr


def test_corrupt_gguf_is_reported(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    result = run_cli("generate", "hi", "--model", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "broken.gguf" in result.stderr


def test_prompt_past_the_context(smollm2_path):
    result = run_cli("generate", "word " * 200, "--model", str(smollm2_path), "--max-model-len", "64")
    assert result.returncode == 2 and "shorten the prompt" in result.stderr


def test_generate_streams_and_reports_speed(smollm2_path):
    result = run_cli("generate", "The capital of France is", "--model", str(smollm2_path), "--max-tokens", "8",
                     "--no-show-progress")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "output tokens: 8" in result.stderr and "tokens/s" in result.stderr


def test_models_lists_the_catalog():
    result = run_cli("models")
    assert result.returncode == 0
    for name in ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
        assert name in result.stdout


def test_chat_keeps_history_and_quits_on_empty_line(smollm2_path):
    result = subprocess.run([sys.executable, "-m", "effinfer.cli", "chat", "--model", str(smollm2_path), "--max-tokens",
                             "8", "--temperature", "0", "--no-show-progress"], input="Hi!\nAnd again?\n\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 3          # two turns answered, then the empty line quits


def test_every_command_prints_its_help():
    """`--help` of every command and subcommand renders (argparse formats help text with %: a literal "80%"
    in a config field's docstring once made `effinfer serve --help` a traceback)."""
    import argparse

    from effinfer.cli import build_parser

    def parsers(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, path + [name])

    found = dict((" ".join(path), parser.format_help()) for path, parser in parsers(build_parser(), []))
    assert {"serve", "generate", "bench compare", "bench latency"} <= set(found)
    assert all("--" in text for text in found.values())
