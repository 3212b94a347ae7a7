"""Decode steps through `torch.compile` (a server's default, or `--compile`): a fast-kernel path for small models.

A single-token decode step of a small model is mostly overhead: per layer two norms, rotary, the KV
write, attention, the activation and two residual adds are ~25 tiny ops of a few microseconds each,
dispatched from Python. Compiled, they fuse into ~5 generated kernels per layer, attention and the KV
write included (gather, dequantize, both reductions: the backend's `decode_attention_traced`; `PagedKVCache.write_traced`).
Prefill chunks, verification of drafts and early exits keep the eager path.

Only the batch size and the context width are dynamic; the KV pages and weights are static shapes
(dynamic page shapes cost ~15% of the step in generic index arithmetic), and guards are kept on the
step's inputs only; its kernels are called from a C++ wrapper (and with `--compile` the weights are frozen
into the graph). The price is the compile: 3-4 minutes for both batch-size variants of SmolLM2 on 2 cores the first time
with given settings, the graphs being keyed to the KV pool's size (later starts take less, from PyTorch's
inductor cache). Every variant is compiled before the runner uses any, so a server never stalls mid-stream
on a recompile: either when the engine starts (`compile=True`), or, by default in a server, on a
background thread while the engine serves eagerly (`BackgroundCompile`), the runner switching to the
graphs between two steps once all are built. The warm-up steps write into a scratch block of the KV pool
that no request owns, so they never touch the pages of the requests being served meanwhile.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from typing import Callable

import torch

from effinfer.layers.attention import AttentionMetadata, DecodeBatch
from effinfer.utils import progress, release_free_memory

log = logging.getLogger("effinfer.engine")

MAX_BATCH = 16
"""Decode steps of more sequences run eagerly: there the matmuls dominate and the step's overhead is shared
(measured at 32 sequences: bf16 0.87x with compiled steps, from unbucketed padded attention). Not above
the quantized matmuls' kernel switch (`weight_only.KERNEL_MAX_ROWS`, a test checks), so one graph serves
every compiled batch of 2 or more."""
SWITCH_INTERVAL = 0.0002
"""The GIL switch interval (seconds) while a background compile runs (`BackgroundCompile._run`)."""
WARMUP_BATCHES = (1, 2)
"""Batch sizes with their own graph: the compiler specializes a size of 1; 2 serves 2..MAX_BATCH."""


def compile_decode(model: torch.nn.Module, freeze: bool = True):
    """The model's forward compiled for decode steps, with dynamic batch size and context length."""
    # dynamic dims are marked on the warm-up inputs (`_dummy_step`). Freezing makes the weights constants of
    # the graph: the step no longer passes ~300 of them in and folds their casts (int8 decode 126 -> 143-146),
    # but it is redone on every start, cache or not (SmolLM2 GGUF: ~50 s of a warm start against ~14 s without,
    # at the same decode speed, whose matmuls are effinfer's kernels: what a background compile does without).
    # The C++ wrapper calls the step's ~300 kernels from C++ instead of Python: +1-11% tokens/s in an A/B of
    # alternating processes (benchmarks/README.md); the first compile takes 3-4 minutes instead of ~1.5.
    options = {"guard_filter_fn": _step_guards_only, "freezing": freeze, "cpp_wrapper": True}
    return torch.compile(_own_code(model.forward), options=options)


def _own_code(method):
    """`method` bound to a copy of its code object. Compiled graphs are cached per code object, and with
    the model's guards dropped, a second engine in the process (a bench comparison, a draft model) would
    otherwise run the first engine's graph on its own, different weights."""
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, method.__self__)


def compile_now(model: torch.nn.Module, block_size: int, scratch_block: int, max_num_seqs: int,
                device: torch.device, show_progress: bool):
    """The compiled forward, every batch-size variant built (`compile=True`: the engine starts compiled)."""
    try:
        return build(compile_decode, model, block_size, scratch_block, max_num_seqs, device, show_progress)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; run without --compile") from e.__cause__


@torch.inference_mode()
def build(compile_fn: Callable, model: torch.nn.Module, block_size: int, scratch_block: int, max_num_seqs: int,
          device: torch.device, show_progress: bool):
    """`compile_fn(model)`, with every batch-size variant compiled now, on dummy steps that read and write
    only `scratch_block`."""
    sizes = [n for n in WARMUP_BATCHES if n <= max_num_seqs]
    try:
        compiled = compile_fn(model)
        for n in progress(sizes, "compile decode step", show_progress, unit="graph"):
            compiled(*_dummy_step(n, block_size, scratch_block, device))
    except Exception as e:   # no C++ compiler, an unsupported op, ...: say so instead of a compiler trace
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(f"compiling the decode step failed ({type(e).__name__}: {first_line[:300]})") from e
    return compiled


def _dummy_step(n: int, block_size: int, scratch_block: int, device: torch.device):
    """Step inputs whose batch size (unless 1) and context width are marked dynamic: the graph traced
    on them serves every size of their range. Everything else, the KV pages included, stays static."""
    ids, positions = torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device)
    slots = scratch_block * block_size + torch.arange(n, device=device) % block_size
    tables = torch.full((n, 3), scratch_block, dtype=torch.long, device=device)   # 3 blocks: no size shared with another input
    seq_lens = torch.ones(n, dtype=torch.long, device=device)
    torch._dynamo.mark_dynamic(tables, 1)
    if n > 1:
        for t in (ids, positions, slots, tables, seq_lens):
            torch._dynamo.mark_dynamic(t, 0)
    meta = AttentionMetadata(slots, list(range(n + 1)), [1] * n, [tables[0, :1]] * n, block_size)
    meta.decode = DecodeBatch(tables, seq_lens)
    return ids, positions, meta


class BackgroundCompile:
    """Builds the compiled decode step on a daemon thread while the engine serves eagerly, then hands it to
    the runner: its next plain decode step runs compiled (an attribute swap between two steps of the engine's
    own thread, so no stream is dropped or recomputed). A compile that fails leaves the engine eager and says
    why (`runner.decode_steps`)."""

    def __init__(self, runner, compile_fn: Callable, block_size: int, scratch_block: int, max_num_seqs: int):
        self.runner, self.compile_fn = runner, compile_fn
        self.args = (block_size, scratch_block, max_num_seqs, runner.device, False)
        self.thread = threading.Thread(target=self._run, name="effinfer-compile", daemon=True)

    def start(self) -> "BackgroundCompile":
        self.runner.decode_steps = "compiling"
        self.thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        log.info("compiling the decode step in the background; serving eagerly meanwhile")
        # Tracing is Python holding the GIL, and the eager step takes the GIL back after each of its ~1,000
        # ops: at the default 5 ms switch interval it waits up to that long each time (SmolLM2's eager decode
        # fell from ~60 to ~3 tokens/s while graphs loaded from the cache; ~9 at this interval). The C++
        # compiles of a cold start hold no GIL (~40 tokens/s meanwhile).
        _short_switch_interval(+1)
        try:
            compiled = build(self.compile_fn, self.runner.model, *self.args)
        except RuntimeError as e:   # an eager engine still serves: a warning, not a failure
            self.runner.decode_steps = "eager (compile failed)"
            log.warning("%s; decode steps stay eager", e)
            return
        finally:
            _short_switch_interval(-1)
        self.runner.compiled_forward = compiled
        self.runner.decode_steps = "compiled"
        release_free_memory()
        log.info("decode step compiled in %.0f s; decode steps now run compiled", time.perf_counter() - started)


_compiles = {"running": 0, "interval": sys.getswitchinterval()}
_compiles_lock = threading.Lock()


def _short_switch_interval(change: int) -> None:
    """`SWITCH_INTERVAL` while any background compile of this process runs (two engines may compile at once),
    the interval it had before once none does."""
    with _compiles_lock:
        if _compiles["running"] == 0:
            _compiles["interval"] = sys.getswitchinterval()
        _compiles["running"] += change
        sys.setswitchinterval(SWITCH_INTERVAL if _compiles["running"] else _compiles["interval"])


def _step_guards_only(guards) -> list[bool]:
    """Keep the guards on the step's inputs (shapes, dtypes) and on global state; drop the ~2,500 on the
    model's modules, weights and hooks, whose checks cost ~1 ms per step: nothing changes a serving model."""
    keep = {"SHAPE_ENV", "GLOBAL_STATE", "GRAD_MODE", "DEFAULT_DEVICE"}
    return [g.guard_type in keep or (g.guard_type == "TENSOR_MATCH" and not _in_model(g)) for g in guards]


def _in_model(guard) -> bool:
    source = guard.orig_guard.source
    return source is not None and source.is_unspecialized_nn_module()
