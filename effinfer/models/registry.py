"""Architecture name -> model class, imported lazily so that loading one family imports only its file.

Keys are HF `architectures` names (GGUF files are mapped to them by the loader).
"""

from __future__ import annotations

import importlib

from torch import nn

_MODELS = {
    "LlamaForCausalLM": ("effinfer.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("effinfer.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("effinfer.models.llama", "Qwen2ForCausalLM"),
    "Gemma3ForCausalLM": ("effinfer.models.gemma3", "Gemma3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
