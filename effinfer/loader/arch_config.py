"""The architecture hyperparameters of a checkpoint, read from its metadata (config.json or GGUF keys).

One dataclass for every supported family: the model classes read only these fields, so a GGUF file and
a Hugging Face folder of the same model build the same module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass
class ArchConfig:
    architecture: str
    """Registry key, the HF `architectures` name (e.g. `LlamaForCausalLM`)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    """HF-style rope scaling dict (`rope_type` linear or llama3), or None."""
    rope_local_theta: float | None = None
    """Rope base of sliding-window layers where it differs from `rope_theta` (Gemma 3)."""
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    """Per layer: `full_attention` or `sliding_attention`; filled with full attention when empty."""
    query_pre_attn_scalar: float | None = None
    """Attention scale is this ** -0.5 when set, else head_dim ** -0.5 (Gemma)."""
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [FULL_ATTENTION] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        bad = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; supported: {FULL_ATTENTION}, {SLIDING_ATTENTION}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window size")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ArchConfig":
        """Build from a Hugging Face config.json dict (text part of multimodal configs included)."""
        cfg = {**cfg, **cfg.get("text_config", {})}
        architectures = cfg.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no `architectures` entry; cannot tell which model class to build")
        arch = architectures[0].replace("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_theta, rope_scaling, rope_local = _hf_rope(cfg)
        eos = cfg.get("eos_token_id")
        layer_types = cfg.get("layer_types") or _default_layer_types(arch, cfg)
        sliding = cfg.get("sliding_window") if SLIDING_ATTENTION in layer_types else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act", "silu"),
            rope_scaling=rope_scaling,
            rope_local_theta=rope_local,
            sliding_window=sliding,
            layer_types=layer_types,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )


HF_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                  "Gemma3ForCausalLM": "gemma3_text"}


def to_hf_config(cfg: ArchConfig) -> dict:
    """The config.json of a Hugging Face folder holding this architecture (what `from_hf_config` reads
    back, and what transformers builds the model from): for checkpoints effinfer writes, e.g. students."""
    if cfg.architecture not in HF_MODEL_TYPES:
        raise ValueError(f"cannot write a Hugging Face config for {cfg.architecture}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    out = {"architectures": [cfg.architecture], "model_type": HF_MODEL_TYPES[cfg.architecture],
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "max_position_embeddings": cfg.max_position_embeddings,
           "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
           "hidden_act": cfg.hidden_act, "layer_types": cfg.layer_types, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.eos_token_ids, "torch_dtype": "bfloat16"}
    if cfg.architecture == "Gemma3ForCausalLM":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": local}, hidden_activation=cfg.hidden_act,
                   query_pre_attn_scalar=cfg.query_pre_attn_scalar, final_logit_softcapping=cfg.final_logit_softcapping)
    if cfg.sliding_window:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    return out


def _default_layer_types(arch: str, cfg: dict) -> list[str]:
    """Older configs without `layer_types`: Gemma 3 has one global layer per `sliding_window_pattern`;
    Mistral-style configs slide on every layer when `sliding_window` is set and enabled."""
    num_layers = cfg["num_hidden_layers"]
    if arch.startswith("Gemma3"):
        pattern = cfg.get("sliding_window_pattern", 6)
        return [FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers)]
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        return [SLIDING_ATTENTION] * num_layers
    return [FULL_ATTENTION] * num_layers


def _hf_rope(cfg: dict) -> tuple[float, dict | None, float | None]:
    """(global theta, scaling dict, local theta) from both the old and the transformers-5 rope layouts."""
    params = cfg.get("rope_parameters")
    if params and "full_attention" in params:  # per-layer-type layout (Gemma 3 in transformers 5)
        full, local = params["full_attention"], params.get("sliding_attention", {})
        return full["rope_theta"], _scaling_or_none(full), local.get("rope_theta")
    if params:
        return params.get("rope_theta", cfg.get("rope_theta", 10000.0)), _scaling_or_none(params), None
    scaling = cfg.get("rope_scaling")
    return cfg.get("rope_theta", 10000.0), _scaling_or_none(scaling or {}), cfg.get("rope_local_base_freq")


def _scaling_or_none(params: dict) -> dict | None:
    kind = params.get("rope_type") or params.get("type") or "default"
    return None if kind == "default" else {**params, "rope_type": kind}
