"""effinfer: an efficient LLM inference engine in PyTorch. Public API: LLM, SamplingParams, EngineConfig."""

from effinfer.config import EngineConfig
from effinfer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str):
    if name == "LLM":  # imports the engine and torch models only when used
        from effinfer.llm import LLM

        return LLM
    raise AttributeError(f"module 'effinfer' has no attribute {name!r}")
