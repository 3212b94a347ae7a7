"""Every engine and server option says what it does: its docstring is the flag's --help and its row in
docs/configuration.md."""

from __future__ import annotations

import dataclasses

from effinfer.config import SUB_CONFIGS, EngineConfig, field_docs
from effinfer.serving.api_server import ServerConfig


def test_every_option_has_a_docstring():
    for cls in [*SUB_CONFIGS.values(), EngineConfig, ServerConfig]:
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls)
                        if not docs.get(f.name, "").strip() and not (cls is EngineConfig and f.name in SUB_CONFIGS)]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_the_serve_help_shows_each_options_text():
    from effinfer.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["serve"].format_help().split())
    for cls in (SUB_CONFIGS["scheduler"], ServerConfig):
        for name, doc in field_docs(cls).items():
            assert " ".join(doc.split())[:30] in help_text, name
