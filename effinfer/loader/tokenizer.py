"""Tokenizers from tokenizer.json (HF folders) or from a GGUF file's `tokenizer.ggml.*` metadata, with the
model's chat template and an incremental detokenizer for streaming.

The runtime object wraps a `tokenizers.Tokenizer` (Rust, fast). For GGUF files the vocabulary is
converted by transformers' GGUF tokenizer converter, the same code transformers itself uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from effinfer.utils import ModelLoadError

if TYPE_CHECKING:
    import tokenizers


FIM_TOKENS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),          # StarCoder, SmolLM
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),    # Qwen2.5-Coder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),        # DeepSeek-Coder
)
"""(before the gap, after the gap, fill the gap) token names by model family."""


@dataclass
class Tokenizer:
    backend: "tokenizers.Tokenizer"
    eos_token_ids: list[int]
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    special_ids: set[int] = field(default_factory=set)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template_vars: dict | None = None) -> str:
        """Render the model's Jinja chat template the way transformers does (same environment and globals);
        `template_vars` are extra variables a template may read (tools, a thinking switch), never overriding
        the messages or the special tokens. A template that fails on its input is a ValueError."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (it is probably a base model); "
                             "send a plain prompt instead of chat messages")
        _check_messages(messages)
        template = _jinja_env().from_string(self.chat_template)
        try:
            return template.render({**(template_vars or {}), "messages": messages,
                                    "add_generation_prompt": add_generation_prompt,
                                    "bos_token": self.bos_token or "", "eos_token": self.eos_token or ""})
        except Exception as exc:   # whatever a template does with odd input (its sandbox errors included)
            raise ValueError(f"the chat template could not render these messages: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    template_vars: dict | None = None) -> list[int]:
        # the template writes the special tokens itself, so none are added on top
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, template_vars),
                           add_special_tokens=False)

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """Fill in the middle, prefix-suffix-middle order, in the vocabulary's own FIM tokens."""
        for names in FIM_TOKENS:
            ids = [self.backend.token_to_id(name) for name in names]
            if all(i is not None for i in ids):
                start, hole, end = ids
                return (self.encode("", add_special_tokens=True) + [start] + self.encode(prefix, False) + [hole]
                        + self.encode(suffix, False) + [end])
        raise ValueError("this model has no fill-in-the-middle tokens, so it cannot complete with a suffix")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never end inside a UTF-8 character.

    Decodes a short window `ids[prefix_offset:]` and emits what it adds past `ids[prefix_offset:read_offset]`.
    A byte-level token may hold part of a character: its window then decodes to a trailing U+FFFD and we
    wait for the next token. Starting the window a few prompt tokens back keeps the leading space that
    SentencePiece decoders drop at the start of a sequence. (The scheme of vLLM's detokenizer.)
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids or [])[-6:]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - 5, 0)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.ids))
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.ids))
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)


def load_hf_tokenizer(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"{folder} has no tokenizer.json; effinfer needs the fast tokenizer file")
    backend = Backend.from_file(str(file))
    cfg = _read_json(folder / "tokenizer_config.json")
    template = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos_ids = _eos_ids(backend, cfg, _read_json(folder / "generation_config.json"), _read_json(folder / "config.json"))
    return _build(backend, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")), eos_ids, template)


def load_gguf_tokenizer(gguf_path: Path, eos_token_ids: list[int], cache: Path | None = None) -> Tokenizer:
    """Convert the GGUF vocabulary once (seconds for large vocabularies) and keep the result in `cache`."""
    from tokenizers import Tokenizer as Backend

    cached = cache / _file_key(gguf_path) if cache else None
    if cached and (cached / "tokenizer.json").is_file():
        meta = json.loads((cached / "meta.json").read_text())
        backend = Backend.from_file(str(cached / "tokenizer.json"))
        return _build(backend, meta["bos_token"], meta["eos_token"], eos_token_ids, meta["chat_template"])
    hf_tok = _convert_gguf_tokenizer(gguf_path)
    if cached:
        cached.mkdir(parents=True, exist_ok=True)
        hf_tok.backend_tokenizer.save(str(cached / "tokenizer.json"))
        meta = {"bos_token": hf_tok.bos_token, "eos_token": hf_tok.eos_token, "chat_template": hf_tok.chat_template}
        (cached / "meta.json").write_text(json.dumps(meta))
    return _build(hf_tok.backend_tokenizer, hf_tok.bos_token, hf_tok.eos_token, eos_token_ids, hf_tok.chat_template)


def _convert_gguf_tokenizer(gguf_path: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # the converter raises many types on missing or odd metadata
        raise ModelLoadError(f"cannot build a tokenizer from {gguf_path.name}'s metadata: {exc}") from exc


def _file_key(path: Path) -> str:
    """Identifies one version of a file without hashing its contents: path, size and mtime."""
    import hashlib

    stat = path.resolve().stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _build(backend, bos: str | None, eos: str | None, eos_ids: list[int], template) -> Tokenizer:
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    special = {t_id for t_id, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return Tokenizer(backend, eos_ids, bos, eos, template, special)


def _eos_ids(backend, tok_cfg: dict, gen_cfg: dict, model_cfg: dict) -> list[int]:
    ids = gen_cfg.get("eos_token_id", model_cfg.get("eos_token_id"))
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    eos = _token_str(tok_cfg.get("eos_token"))
    if eos is not None and backend.token_to_id(eos) is not None:
        ids.append(backend.token_to_id(eos))
    return sorted(set(ids))


def _token_str(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"message {i} must be an object with a string 'role' and a 'content'")


def _jinja_env():
    """The sandboxed environment and globals of transformers' `apply_chat_template`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
