"""Argument helpers shared by `effinfer` and `effinfer bench`: engine flags derived from the config
dataclasses' field names (`max_num_seqs` -> `--max-num-seqs`), with `choices=` read from the registries,
and sampling flags."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from effinfer.config import SUB_CONFIGS, EngineConfig, all_option_names, field_docs, option_choices
from effinfer.sampling_params import SamplingParams


class LazyChoices(list):
    """argparse `choices` read from a table that imports torch, loaded only when the flag is given or its
    help is shown: building the parser must not import torch (the server's API process runs without it).
    Give the flag a `metavar`: argparse lists the choices in place of a missing one while it builds."""

    def __init__(self, names: typing.Callable[[], typing.Iterable[str]]):
        super().__init__()
        self.names = names

    def _load(self) -> None:
        if not self:
            self.extend(self.names())

    def __contains__(self, item) -> bool:
        self._load()
        return super().__contains__(item)

    def __iter__(self):
        self._load()
        return super().__iter__()


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128, temperature: float = 0.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def sampling_params_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per config field, named after it (`max_num_seqs` -> `--max-num-seqs`); a field chosen from a
    registry (quantization, prune, speculative_method, attention_backend, kv_cache_dtype) offers its names."""
    choices = option_choices()
    for group_name, cls in {**SUB_CONFIGS, "engine": EngineConfig}.items():
        g = p.add_argument_group(f"engine: {group_name}")
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in SUB_CONFIGS and cls is EngineConfig:
                continue
            flag, kind, doc = "--" + f.name.replace("_", "-"), arg_type(hints[f.name]), docs.get(f.name)
            doc = doc and doc.replace("%", "%%")   # argparse formats help with %: a docstring's "80%" is text
            if kind is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
            else:
                g.add_argument(flag, type=kind, default=f.default, dest=f.name, help=doc, choices=choices.get(f.name))


def arg_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                   help="engine options from a JSON file of option names and values, as `effinfer tune` writes; "
                        "a flag given on the command line takes precedence")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine options of parsed flags, over those of a `--config` file: a file's value stands where its flag
    was not given (`args.given_flags`, set by the CLI from the command line) and is at its default."""
    kwargs = {k: v for k, v in vars(args).items() if k in all_option_names()}
    path = getattr(args, "config_file", None)
    if path:
        defaults, given = option_defaults(), getattr(args, "given_flags", set())
        for key, value in read_config_file(path).items():
            if key not in given and kwargs.get(key, defaults.get(key)) == defaults.get(key):
                kwargs[key] = value
    return kwargs


def given_flags(argv: list[str]) -> set[str]:
    """The option names a command line sets (`--max-num-seqs 4`, `--dtype=float32`, `--no-compile`)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") and name[3:] in all_option_names() else name)
    return names


def read_config_file(path: str) -> dict:
    import json
    from pathlib import Path

    try:
        options = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{path} must hold a JSON object of engine options, e.g. {{\"quantization\": \"int8\"}}")
    unknown = sorted(set(options) - all_option_names())
    if unknown:
        raise ValueError(f"{path}: unknown engine option(s) {', '.join(unknown)} (see docs/configuration.md)")
    return options


def option_defaults() -> dict:
    """Each engine option's default, as its flag has it."""
    out = {}
    for cls in (*SUB_CONFIGS.values(), EngineConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING and f.name not in SUB_CONFIGS:
                out[f.name] = f.default_factory()
    return out


def make_llm(args: argparse.Namespace):
    from effinfer.llm import LLM

    EngineConfig.from_kwargs(**engine_kwargs(args))  # validate flags before the model loads
    return LLM(**engine_kwargs(args))


