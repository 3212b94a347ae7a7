"""One configuration source: dataclass sub-configs composed into `EngineConfig`.

Every field has a one-line docstring and is validated in `__post_init__` with a message that names the
bad value and the fix; a field that names a plug-in is checked against its registry (`option_choices`)
before any model loads. `EngineConfig.from_kwargs` takes flat field names (`LLM(model, max_num_seqs=8)`),
and the CLI derives its flags (and their choices) from the same names.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from effinfer.loader.catalog import DEFAULT_MODEL
from effinfer.utils import DTYPES


def option_choices() -> dict[str, list[str]]:
    """Config fields whose value names a registered plug-in -> the names registered ("none": the field is off).
    The tables are imported here, not with this module: an engine that imports the config loads no technique."""
    from effinfer.compression.prune import PRUNE_METHODS
    from effinfer.compression.quant import CPU_KERNELS, KV_CACHE_DTYPES, QUANT_METHODS
    from effinfer.decoding.spec import PROPOSERS
    from effinfer.layers.attn_backends import ATTENTION_BACKENDS

    return {"attention_backend": list(ATTENTION_BACKENDS), "kv_cache_dtype": list(KV_CACHE_DTYPES),
            "quantization": ["auto", *QUANT_METHODS, "none"], "speculative_model_quantization": [*QUANT_METHODS, "none"],
            "prune": [*PRUNE_METHODS, "none"], "speculative_method": [*PROPOSERS, "none"], "cpu_kernel": list(CPU_KERNELS)}


def check_choice(name: str, value) -> None:
    """`value` of field `name` is one of its registry's names (or None where the field may be off)."""
    choices = option_choices()[name]
    if value is not None and value not in choices or value is None and "none" not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose from {', '.join(choices)}")


@dataclass
class ModelConfig:
    model: str = DEFAULT_MODEL
    """Catalog name, GGUF file or Hugging Face folder."""
    dtype: str = "bfloat16"
    """Weight and activation dtype: bfloat16, float32 or float16."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    cache_dir: str | None = None
    """Where pulled models are kept (default: $EFFINFER_CACHE_DIR or ~/.cache/effinfer)."""
    num_threads: int | None = None
    """CPU threads for PyTorch's kernels (default: PyTorch's choice, one per physical core)."""
    attention_backend: str = "torch_sdpa"
    """Paged attention implementation: torch_sdpa (batched decodes) or torch_ref (per-sequence oracle)."""
    compile: bool | None = None
    """Decode steps through torch.compile (fused norms, rotary and attention; ~2x single-stream decode of small
    models on CPU). Default (auto): a server compiles in the background while it serves eagerly, then switches;
    offline runs stay eager. --compile: compile before serving (minutes the first time, less from PyTorch's
    cache after). --no-compile: eager only."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be at least 1")
        check_choice("attention_backend", self.attention_backend)


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory_gb: float | None = None
    """Memory for the KV-cache block pool, in GiB (per tensor- or pipeline-parallel rank). Unset: room for
    max_num_seqs sequences of max_model_len tokens, within 1 GiB on CPU, shared by its ranks (more if one full-length
    sequence needs it, never past a quarter of the free RAM) and within 80% of the free memory on a GPU."""
    num_blocks: int | None = None
    """Exact number of blocks; overrides kv_cache_memory_gb when set."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of equal prompt prefixes across requests."""
    kv_cache_dtype: str = "auto"
    """KV pages: auto (the model dtype), int8 (per-token scales) or fp8 (e4m3): 8-bit holds ~2x the tokens."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two, e.g. 16")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb={self.kv_cache_memory_gb} must be positive")
        check_choice("kv_cache_dtype", self.kv_cache_dtype)
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be at least 1")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests in the running batch."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (prefill chunks and decodes together)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); default: the model's context length, capped by the cache."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so running decodes keep flowing."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be at least 2")


@dataclass
class QuantConfig:
    quantization: str | None = "auto"
    """Weight format: auto (a GGUF file's own blocks where the CPU runs them fast, else none), int8 (per channel),
    int4 (per group), w8a8, gguf (a GGUF file's own blocks), or none (the model dtype)."""
    group_size: int = 32
    """int4: input columns that share a scale (32, 64, 128; it must divide the layers' widths)."""
    symmetric: bool = False
    """int4: a scale per group only (q - 8) instead of scale and offset."""
    quantize_lm_head: bool = True
    """With a quantization: the output head (and a tied embedding) in int8 too."""
    cpu_kernel: str = "auto"
    """int8 matmuls of decode steps on CPU: effinfer's kernel where it builds (auto; 1.5x at one row here) or aten
    (PyTorch's `_weight_int8pack_mm`, for comparison)."""

    def __post_init__(self) -> None:
        if self.quantization in ("", "none"):
            self.quantization = None
        check_choice("quantization", self.quantization)
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size={self.group_size} is not supported; choose 32, 64, 128 or 256")
        check_choice("cpu_kernel", self.cpu_kernel)

    def spec(self):
        from effinfer.compression.quant import QuantSpec

        if self.quantization is None:
            return None
        return QuantSpec(**dataclasses.asdict(self))


@dataclass
class PruneConfig:
    prune: str | None = None
    """Pruning applied after loading: magnitude, wanda, 2:4, layers or mlp_channels (see docs/techniques.md)."""
    sparsity: float = 0.5
    """Share of weights (magnitude, wanda), of decoder layers (layers) or of MLP channels (mlp_channels) removed."""
    prune_calibration_text: str | None = None
    """A UTF-8 text file whose activations guide wanda, 2:4, layers and mlp_channels."""
    prune_calibration_tokens: int = 4096
    """Calibration tokens read from that text."""

    def __post_init__(self) -> None:
        if self.prune in ("", "none"):
            self.prune = None
        check_choice("prune", self.prune)
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity} must be between 0 and 1")
        if self.prune is not None and _needs_calibration(self.prune) and not self.prune_calibration_text:
            raise ValueError(f"prune={self.prune} needs prune_calibration_text (a text file to calibrate on)")


@dataclass
class SpecConfig:
    speculative_method: str | None = None
    """Draft proposer for speculative decoding: ngram (prompt lookup), retrieval (a corpus datastore),
    draft_model (a smaller model with the same tokenizer), self (a subset of the target's layers), lookahead
    (Jacobi iteration on the verification pass, with an n-gram pool), or none."""
    num_speculative_tokens: int = 4
    """Most draft tokens per request per step (adapted down by the measured acceptance)."""
    speculative_max_batch: int = 4
    """Speculate only while at most this many requests decode: a fuller batch gains nothing from it
    (measured: n-gram drafts at 8 concurrent requests were 18% slower than plain decoding)."""
    ngram_min: int = 1
    """ngram: shortest tail of the sequence to look up (1: a single token; drafts are nearly free to verify
    at small batch, where speculation runs, so more of them pay)."""
    ngram_max: int = 4
    """ngram: longest tail of the sequence to look up; lookahead: the size of its n-grams."""
    speculative_corpus: str | None = None
    """retrieval: a UTF-8 text file whose tokens form the draft datastore."""
    speculative_model: str | None = None
    """draft_model: the draft (catalog name, GGUF file or HF folder, e.g. a student from `effinfer distill`)."""
    speculative_model_quantization: str | None = None
    """draft_model: quantize the draft at load (int8, int4): a cheaper draft, the output stays the target's."""
    speculative_draft_layers: str | None = None
    """self: the target's layers that draft, e.g. "0-11,29"; default: every other layer of the middle half
    skipped (first and last quarters kept)."""
    speculative_draft_memory_gb: float = 0.25
    """draft_model/self: memory for the draft's own KV-cache pool, in GiB."""

    def __post_init__(self) -> None:
        if self.speculative_method in ("", "none"):
            self.speculative_method = None
        check_choice("speculative_method", self.speculative_method)
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be between 1 and 16")
        if self.speculative_max_batch < 1:
            raise ValueError(f"speculative_max_batch={self.speculative_max_batch} must be at least 1")
        for option, what in _required_options(self.speculative_method).items():
            if not getattr(self, option):
                raise ValueError(f"speculative_method={self.speculative_method} needs {option} ({what})")
        if self.speculative_model_quantization:
            try:
                QuantConfig(quantization=self.speculative_model_quantization)
            except ValueError as exc:
                raise ValueError(f"speculative_model_{exc}") from None
        if self.speculative_draft_memory_gb <= 0:
            raise ValueError(f"speculative_draft_memory_gb={self.speculative_draft_memory_gb} must be positive")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")


def _needs_calibration(prune: str) -> bool:
    from effinfer.compression.prune import PRUNE_METHODS

    return PRUNE_METHODS[prune].needs_calibration


def _required_options(speculative_method: str | None) -> dict[str, str]:
    from effinfer.decoding.spec import proposer_class

    return proposer_class(speculative_method).required_options if speculative_method else {}


@dataclass
class ExitConfig:
    early_exit_heads: str | None = None
    """Exit heads from `effinfer exit-heads` (a .safetensors file): decode tokens may leave the model after
    an intermediate layer when its head is confident (lossy; measured against the full model)."""
    early_exit_threshold: float = 0.9
    """Confidence a token needs to exit, for requests that do not set their own; 1 never exits."""
    early_exit_max_batch: int = 4
    """Test for exits only in steps of at most this many sequences: a step exits only when all of its tokens
    may, which a large batch almost never allows, so there the tests would be pure cost."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ValueError(f"early_exit_threshold={self.early_exit_threshold} must be between 0 and 1")
        if self.early_exit_max_batch < 1:
            raise ValueError(f"early_exit_max_batch={self.early_exit_max_batch} must be at least 1")
        if self.early_exit_heads and not os.path.isfile(self.early_exit_heads):   # before minutes of model loading
            raise ValueError(f"early_exit_heads={self.early_exit_heads!r}: no such file "
                             "(train one with `effinfer exit-heads`)")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks that split every layer (Megatron-style: heads, MLP columns and the vocabulary) on torch.distributed, one
    process each (gloo on CPU, NCCL on GPUs); rank 0 is the engine's process. Decode steps then run eagerly."""
    pipeline_parallel_size: int = 1
    """Stages of consecutive layers on torch.distributed, one process each; rank 0 (the engine's process) holds the
    first stage, embeds and samples. A step's sequences go through the stages as micro-batches, one behind the
    other. Decode steps then run eagerly."""
    pipeline_microbatches: int | None = None
    """Pipeline parallelism: most micro-batches a step's sequences are split into, by tokens (default: one per
    stage): while a stage computes one, the stage before it computes the next."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "pipeline_microbatches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} and pipeline_parallel_size="
                             f"{self.pipeline_parallel_size} do not combine yet; choose one of them")

    @property
    def world_size(self) -> int:
        """Processes of one engine (only one of the sizes is above 1)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def num_microbatches(self) -> int:
        return self.pipeline_microbatches or self.pipeline_parallel_size


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    global_seed: int = 0
    """Seed of the engine's global RNG (requests without their own seed draw from it)."""
    show_progress: bool = True
    """Progress bars while pulling and loading."""

    def __post_init__(self) -> None:
        if self.prune.prune and self.quant.quantization == "auto":   # pruning works on float weights
            self.quant.quantization = None
        if self.exit.early_exit_heads and self.spec.speculative_method:
            raise ValueError("early exit and speculative decoding do not combine: verification needs every layer's "
                             "logits (self-speculation is the lossless form of early exit)")
        if self.parallel.world_size > 1:
            self._check_parallel()

    def _check_parallel(self) -> None:
        """What does not run on a model split over processes yet, refused before any loading."""
        pc = self.parallel
        option = "tensor_parallel_size" if pc.tensor_parallel_size > 1 else "pipeline_parallel_size"
        size = getattr(pc, option)
        model_drafts = self.spec.speculative_method in ("draft_model", "self")   # ngram, retrieval, lookahead: fine
        unsupported = {"early_exit_heads": self.exit.early_exit_heads, "prune": self.prune.prune,
                       f"speculative_method={self.spec.speculative_method}": model_drafts}
        given = [name for name, value in unsupported.items() if value]
        if given:
            raise ValueError(f"{option}={size} does not combine with {', '.join(given)} yet")
        if self.model.compile:
            raise ValueError(f"{option}={size} runs decode steps eagerly; drop --compile")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Route flat field names to their sub-config; unknown names list the valid ones."""
        sub_kwargs: dict[str, dict] = {name: {} for name in SUB_CONFIGS}
        top = {}
        for key, value in kwargs.items():
            owner = next((name for name, sub in SUB_CONFIGS.items() if key in _field_names(sub)), None)
            if owner is not None:
                sub_kwargs[owner][key] = value
            elif key in all_option_names():
                top[key] = value
            else:
                raise TypeError(f"unknown engine option {key!r}; valid options: {', '.join(sorted(all_option_names()))}")
        return cls(**{g: SUB_CONFIGS[g](**kw) for g, kw in sub_kwargs.items()}, **top)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SUB_CONFIGS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "quant": QuantConfig,
               "prune": PruneConfig, "spec": SpecConfig, "exit": ExitConfig, "parallel": ParallelConfig}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def all_option_names() -> set[str]:
    top = _field_names(EngineConfig) - set(SUB_CONFIGS)
    return top.union(*(_field_names(c) for c in SUB_CONFIGS.values()))


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the CLI shows them as flag help)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field_node, doc in zip(body, body[1:]):
        if isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            docs[field_node.target.id] = str(doc.value.value)
    return docs
