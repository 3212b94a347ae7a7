"""`build_engine`: loads the model, applies what the config asks for (quantization at load, pruning, exit
heads, compiled steps, a speculator), sizes the KV cache, and hands the results to an `LLMEngine`, which
runs them. The offline facade (`effinfer.llm.LLM`) and the engine core process (`effinfer.core_process`) build
their engines here. Part of the facade: the engine itself names no technique."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
from torch import nn

from effinfer.compression.prune import Calibration, get_prune_method, prune_model
from effinfer.compression.quant import AUTO, get_kv_dtype
from effinfer.compression.quant.calibrate import calibration_windows
from effinfer.config import CacheConfig, EngineConfig, QuantConfig
from effinfer.decoding.early_exit import EarlyExit, ExitHeads
from effinfer.decoding.spec import DraftContext, speculator_from_config
from effinfer.distributed.workers import DriverRunner, WorkerGroup, check_plan, load_part
from effinfer.engine import compiled_decode
from effinfer.engine.block_manager import BlockManager
from effinfer.engine.kv_cache import allocate_kv_cache, bytes_per_block
from effinfer.engine.llm_engine import LLMEngine
from effinfer.engine.model_runner import ModelRunner
from effinfer.engine.offline import score
from effinfer.engine.side_model import SideModel
from effinfer.layers.attention import AutoKV, KVCodec
from effinfer.layers.attn_backends import get_backend
from effinfer.models import LoadedModel, load_model
from effinfer.utils import available_memory, default_device, parse_dtype


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None, serving: bool = False) -> LLMEngine:
    """Load the model (unless `loaded` is given), prune it, size and allocate its KV cache, build the plug-ins
    the config names, and hand them all to an `LLMEngine`. `serving`: the engine of a long-running server,
    where `compile=None` (auto) compiles the decode step in the background."""
    if config.parallel.world_size > 1:
        if loaded is not None:
            raise ValueError("a tensor- or pipeline-parallel engine loads its own parts; it cannot take a loaded model")
        return _build_parallel(config, serving)
    mc = config.model
    if mc.num_threads:
        torch.set_num_threads(mc.num_threads)
    device, dtype = torch.device(default_device() if mc.device == "auto" else mc.device), parse_dtype(mc.dtype)
    loaded = loaded or load_model(mc.model, dtype, str(device), mc.cache_dir, config.show_progress, config.quant.spec())
    return _assemble(config, loaded, device, serving)


def _build_parallel(config: EngineConfig, serving: bool) -> LLMEngine:
    """Rank 0's engine: check the split against the model, start the workers, load this rank's part (the workers
    load theirs meanwhile), then assemble as for one process, with a runner that broadcasts each step. The workers
    stop if building fails."""
    check_plan(config)
    group = WorkerGroup.start(config)
    try:
        loaded = load_part(config, 0, config.show_progress)
        return _assemble(config, loaded, next(loaded.model.parameters()).device, serving, group)
    except BaseException:
        group.close()
        raise


def _assemble(config: EngineConfig, loaded: LoadedModel, device: torch.device, serving: bool,
              group: WorkerGroup | None = None) -> LLMEngine:
    mc, cc = config.model, config.cache
    dtype = parse_dtype(mc.dtype)
    if config.quant.quantization == AUTO:   # the engine's config says what runs
        config = dataclasses.replace(config, quant=dataclasses.replace(config.quant, quantization=loaded.quantization))
    if config.prune.prune:
        loaded.prune_report = _prune(config, loaded)
    compile_when = _compile_when(config, serving)
    num_blocks, kv_sizing = _num_blocks(config, loaded, dtype, device, group.widest_kv if group is not None else 1.0)
    block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
    scratch_block = block_manager.num_blocks     # one block past the manager's: only compile warm-ups use it
    if group is not None:
        group.broadcast(block_manager.num_blocks)
    allocate_kv_cache(loaded.model, block_manager.num_blocks + (compile_when is not None), cc.block_size, dtype,
                      device, get_backend(mc.attention_backend), get_kv_dtype(cc.kv_cache_dtype))
    max_model_len = _max_model_len(config, loaded, block_manager.num_blocks)
    compiled = None
    if compile_when == "now":
        compiled = compiled_decode.compile_now(loaded.model, cc.block_size, scratch_block, config.scheduler.max_num_seqs,
                                               device, config.show_progress)
    if group is not None:
        runner = DriverRunner(group, config, loaded.model, device)
    else:
        runner = ModelRunner(loaded.model, cc.block_size, device, compiled, _early_exit(config, loaded.model))
    speculator = None
    if config.spec.speculative_method:
        speculator = speculator_from_config(config.spec, _draft_context(config, loaded, device, dtype, max_model_len))
    torch.manual_seed(config.global_seed)   # what draws from the global state (proposers) starts alike, whatever building did
    summary = _summary(config, loaded, num_blocks, kv_sizing, max_model_len, device, dtype, compile_when)
    engine = LLMEngine(config, loaded, block_manager, runner, max_model_len, speculator, summary)
    if compile_when == "background":
        engine.background_compile = compiled_decode.BackgroundCompile(
            runner, partial(compiled_decode.compile_decode, freeze=False), cc.block_size, scratch_block,
            config.scheduler.max_num_seqs).start()
    return engine


def _compile_when(config: EngineConfig, serving: bool) -> str | None:
    """"now" (before the engine serves), "background" (while it serves eagerly) or None (eager)."""
    if config.parallel.world_size > 1:
        return None        # the workers run their steps eagerly, and the driver's steps must match theirs
    if config.model.compile is None:
        return "background" if serving else None
    return "now" if config.model.compile else None


COMPILE_NOTES = {"now": "compiled", None: "eager (--compile: compiled)",
                 "background": "eager, compiled in the background then (--no-compile: eager only)"}


def _summary(config: EngineConfig, loaded: LoadedModel, num_blocks: int, kv_sizing: str, max_model_len: int,
             device: torch.device, dtype: torch.dtype, compile_when: str | None) -> str:
    """One line of what runs and why, printed at start-up and kept in metrics and bench records."""
    cc = config.cache
    kv_mib = num_blocks * bytes_per_block(loaded.model, cc.block_size, dtype, get_kv_dtype(cc.kv_cache_dtype)) / 2**20
    weights = loaded.weights_note or ("weights " + (loaded.quantization or str(dtype).removeprefix("torch.")))
    steps = "eager (several processes)" if config.parallel.world_size > 1 else COMPILE_NOTES[compile_when]
    return (f"{weights}; decode steps {steps}; "
            f"KV cache {cc.kv_cache_dtype} {num_blocks} blocks x {cc.block_size} tokens ({kv_mib:.0f} MiB"
            f"{', resident as used' if device.type == 'cpu' else ''}; {kv_sizing}), "
            f"max_model_len {max_model_len}; {torch.get_num_threads()} threads on {device}"
            f"{_parallel_note(config)}")


def _parallel_note(config: EngineConfig) -> str:
    pc = config.parallel
    if pc.pipeline_parallel_size > 1:
        return (f", pipeline parallel x{pc.pipeline_parallel_size}, up to {pc.num_microbatches} micro-batches "
                "(the KV of this stage's layers)")
    if pc.tensor_parallel_size > 1:
        return f", tensor parallel x{pc.tensor_parallel_size} (this rank's share of the KV)"
    return ""


def _prune(config: EngineConfig, loaded: LoadedModel) -> dict:
    """Prune the loaded model in place, calibrating through a throwaway engine with a small cache
    (pruning can remove layers, so the real engine's cache is sized afterwards)."""
    pc = config.prune
    calibration = None
    if get_prune_method(pc.prune).needs_calibration:
        scratch = EngineConfig(model=config.model, cache=CacheConfig(kv_cache_memory_gb=0.1), show_progress=False)
        text = Path(pc.prune_calibration_text).read_text(encoding="utf-8")
        windows = calibration_windows(loaded.tokenizer, text, pc.prune_calibration_tokens, 256)
        calibration = Calibration(windows, partial(score, build_engine(scratch, loaded)), config.show_progress)
    return prune_model(loaded.model, pc.prune, pc.sparsity, calibration)


CPU_KV_BUDGET_GB = 1.0
"""The auto-sized pool's limit on CPU, unless one full-length sequence needs more (pages are resident as used,
but a pool is used whole over time: freed blocks keep their prefixes cached until evicted)."""
GPU_KV_SHARE = 0.8
"""The auto-sized pool's share of the GPU memory free after the weights (the rest: activations, graphs)."""


def _num_blocks(config: EngineConfig, loaded: LoadedModel, dtype: torch.dtype, device: torch.device,
                widest: float = 1.0) -> tuple[int, str]:
    """Blocks in the KV pool, and how that was decided (for the start-up line). `widest`: the bytes of a block on
    the rank that holds the most KV (most heads or layers) over this rank's; every rank allocates the same count, so
    that rank's memory is what bounds it."""
    cc = config.cache
    if cc.num_blocks:
        return cc.num_blocks, "num_blocks"
    codec = get_kv_dtype(cc.kv_cache_dtype)
    block_bytes = int(bytes_per_block(loaded.model, cc.block_size, dtype, codec) * widest)
    if cc.kv_cache_memory_gb is not None:
        return max(1, int(cc.kv_cache_memory_gb * 2**30) // block_bytes), "kv_cache_memory_gb"
    seqs, seq_len = config.scheduler.max_num_seqs, config.scheduler.max_model_len or loaded.config.max_position_embeddings
    wanted = seqs * -(-seq_len // cc.block_size)
    if device.type == "cuda":
        cap = int(torch.cuda.mem_get_info(device)[0] * GPU_KV_SHARE) // block_bytes
        limit = f"{GPU_KV_SHARE:.0%} of free GPU memory"
    else:   # tensor- or pipeline-parallel ranks on one CPU share its memory: each takes its part of the budget
        ranks = config.parallel.world_size
        one_sequence = -(-seq_len // cc.block_size)
        budget = max(1, int(CPU_KV_BUDGET_GB / ranks * 2**30) // block_bytes)
        cap = min(max(budget, one_sequence), available_memory() // 4 // ranks // block_bytes)
        limit = "the CPU budget (--kv-cache-memory-gb sets the size)"
    if wanted <= cap:
        return wanted, f"sized for max_num_seqs {seqs} x {seq_len} tokens"
    return max(1, cap), f"max_num_seqs {seqs} x {seq_len} tokens capped at {limit}"


def _blocks_in(memory_gb: float, model: nn.Module, block_size: int, dtype: torch.dtype,
               codec: KVCodec = AutoKV()) -> int:
    """How many KV blocks of `model` (all its layers, in `codec`'s storage) fit in `memory_gb`."""
    return max(1, int(memory_gb * 2**30) // bytes_per_block(model, block_size, dtype, codec))


def _max_model_len(config: EngineConfig, loaded: LoadedModel, num_blocks: int) -> int:
    capacity = num_blocks * config.cache.block_size
    context = loaded.config.max_position_embeddings
    limit = config.scheduler.max_model_len or min(context, capacity)
    if limit > context:
        raise ValueError(f"max_model_len={limit} exceeds the model's context length {context}")
    if limit > capacity:
        raise ValueError(f"max_model_len={limit} tokens do not fit in the KV cache ({capacity} tokens); "
                         "raise kv_cache_memory_gb or num_blocks, or lower max_model_len")
    return limit


def _early_exit(config: EngineConfig, model: nn.Module) -> EarlyExit | None:
    if not config.exit.early_exit_heads:
        return None
    return EarlyExit(model, ExitHeads.load(config.exit.early_exit_heads, model))


def _draft_context(config: EngineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                   max_model_len: int) -> DraftContext:
    mc, block_size = config.model, config.cache.block_size

    def load_draft(name: str, quantization: str | None) -> LoadedModel:
        quant = QuantConfig(quantization=quantization).spec() if quantization else None
        return load_model(name, dtype, str(device), mc.cache_dir, config.show_progress, quant)

    def side_model(model: nn.Module, memory_gb: float, max_len: int | None = None) -> SideModel:
        """`model` with its own KV pool of `memory_gb` (not taken from the engine's), keyed by request id."""
        return SideModel(model, _blocks_in(memory_gb, model, block_size, dtype), block_size, dtype, device,
                         get_backend(mc.attention_backend), min(max_len or max_model_len, max_model_len))

    return DraftContext(loaded.model, loaded.tokenizer, loaded.config.vocab_size, mc.cache_dir, load_draft, side_model)
