"""Tensor- and pipeline-parallel ranks as processes on torch.distributed (gloo on CPU; NCCL for CUDA tensors, gloo
for messages).

Rank 0 is the engine's own process, the driver: it schedules once, broadcasts each step's scheduled sequences,
runs its part of the model and samples from the logits. Ranks 1..N-1 are worker processes that it starts and
watches: each loads its part (a tensor-parallel slice of every layer, or a pipeline stage of consecutive layers),
allocates the same KV block pool for its KV heads or layers, then runs its part of every step it is sent: the
whole step through its own `ModelRunner`, meeting the others in the collectives inside the model (tensor
parallel), or its stage of the micro-batches, receiving from the stage before and sending to the next (pipeline).

A worker that dies breaks the collective, send or receive the driver is in (gloo reports the closed connection
at once), and the driver then fails the step with `WorkerFailed`, naming the rank and its exit code; the engine
is dead from then on (the engine-core process exits, and the server restarts it or stops). Workers end when the
driver tells them to, or when its connection closes.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import subprocess
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from effinfer.compression.quant import get_kv_dtype
from effinfer.distributed import shm
from effinfer.distributed.pipeline import PipelineStage
from effinfer.distributed.sharding import Shard, use_shared_memory
from effinfer.distributed.stages import Stage
from effinfer.engine.kv_cache import allocate_kv_cache
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.layers.attn_backends import get_backend
from effinfer.models import LoadedModel, load_model, model_arch_config
from effinfer.utils import default_device, parse_dtype

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120
"""How long the driver waits for every worker to join the group (a worker imports torch first)."""
STEP_TIMEOUT = datetime.timedelta(days=7)
"""Collectives wait this long: a worker idles inside the step broadcast for as long as the server has no work
(a dead peer is reported at once, not after this)."""
STOP_WAIT_S = 10


class WorkerFailed(RuntimeError):
    """A worker died or a collective, send or receive failed: the engine cannot run another step."""


class WorkerGroup:
    """The driver's side: the worker processes, the process group, and the messages it broadcasts."""

    active: "WorkerGroup | None" = None
    """torch.distributed has one default group per process, so one multi-process engine per process."""

    def __init__(self, size: int, processes: list[subprocess.Popen], kind: str, widest_kv: float = 1.0):
        self.size, self.processes, self.kind = size, processes, kind
        self.widest_kv = widest_kv
        """KV bytes per block of the rank that holds the most (heads x layers) over rank 0's, which holds the least:
        the pool is sized for that rank, since every rank allocates the same block count."""
        self.failure: str | None = None

    @classmethod
    def start(cls, config) -> "WorkerGroup":
        """Start ranks 1..size-1, form the group with them as rank 0, and send them the engine's config."""
        size, kind = config.parallel.world_size, parallel_kind(config)
        if cls.active is not None:
            raise RuntimeError(f"a {cls.active.kind} engine is already running in this process; close it first")
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
        backend = backend_for(config)
        widest = widest_kv_share(config)      # before any worker starts: it reads the model's architecture
        if "nccl" in backend and torch.cuda.device_count() < size:
            raise ValueError(f"{size} {kind} ranks need {size} GPUs (one per rank); this machine has "
                             f"{torch.cuda.device_count()}")
        processes = [subprocess.Popen([sys.executable, "-m", "effinfer.distributed.workers", "--port", str(store.port),
                                       "--rank", str(rank), "--size", str(size), "--backend", backend])
                     for rank in range(1, size)]
        group = cls(size, processes, kind, widest)
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=size, timeout=STEP_TIMEOUT)
        except Exception as exc:
            group.kill()
            raise WorkerFailed(f"the {kind} workers did not join the group: {exc}; "
                               f"{group.describe_exits() or 'no worker exited'}") from exc
        cls.active = group
        try:
            group.broadcast(config)
            group.guard(lambda: join_shared_memory(config, backend, 0, group.workers_alive))
        except BaseException:
            group.failure = group.failure or "the workers could not be set up"
            group.release()
            raise
        return group

    def workers_alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def broadcast(self, message) -> None:
        """Send `message` (any picklable object) to every worker; raises `WorkerFailed` if one is gone."""
        self.guard(lambda: dist.broadcast_object_list([message], src=0))

    def guard(self, action):
        """Run `action` (which takes part in collectives); a failure makes the group dead, with the reason."""
        if self.failure is not None:
            raise WorkerFailed(self.failure)
        try:
            return action()
        except WorkerFailed:
            raise
        except RuntimeError as exc:
            self.failure = (f"{self.kind} step failed: {self.describe_exits(wait_s=2.0) or 'a collective failed'} "
                            f"({str(exc).splitlines()[0][:200]})")
            log.error(self.failure)
            self.release()
            raise WorkerFailed(self.failure) from exc
        except BaseException as exc:   # Ctrl-C or a bug on rank 0 mid-step: the workers wait in a collective forever
            self.failure = f"{self.kind} step interrupted on rank 0 ({type(exc).__name__}); the workers were stopped"
            self.release()
            raise

    def describe_exits(self, wait_s: float = 0.0) -> str:
        """Which workers have exited, and how (waits up to `wait_s` for one that is on its way out)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and all(p.poll() is None for p in self.processes):
            time.sleep(0.05)
        exits = [(rank, p.poll()) for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]
        return "; ".join(f"worker rank {rank} exited with code {code}" for rank, code in exits)

    def close(self) -> None:
        """Tell the workers to stop, wait for them, and leave the group."""
        if self.failure is None:
            try:
                self.broadcast(None)
            except WorkerFailed:
                pass
        deadline = time.monotonic() + STOP_WAIT_S
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
        self.release()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def release(self) -> None:
        """Leave the process group (after a failure too: a group left open aborts the process at exit)."""
        leave_shared_memory()
        if dist.is_initialized():
            dist.destroy_process_group()
        if WorkerGroup.active is self:
            WorkerGroup.active = None
        if self.failure is not None:
            self.kill()


def join_shared_memory(config, backend: str, rank: int, alive) -> None:
    """Tensor-parallel ranks on one CPU host run the model's collectives through shared memory (`shm`): gloo's
    loopback TCP costs a millisecond a call here. Every rank calls this at the same point, right after the config
    (pipeline stages send point to point, on gloo)."""
    size = config.parallel.tensor_parallel_size
    if size > 1 and backend == "gloo" and shm.available():
        use_shared_memory(shm.SharedMemoryComm(rank, size, alive))


def leave_shared_memory() -> None:
    from effinfer.distributed import sharding

    if sharding._shared_memory is not None:
        sharding._shared_memory.close()
        use_shared_memory(None)


def backend_for(config) -> str:
    """Model collectives on the model's device (NCCL for CUDA), object messages always on gloo."""
    device = config.model.device
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") or device == "auto" and torch.cuda.is_available() \
        else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Each rank its own GPU (cuda:rank); CPU ranks share the machine."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def parallel_kind(config) -> str:
    return "pipeline-parallel" if config.parallel.pipeline_parallel_size > 1 else "tensor-parallel"


def rank_threads(config) -> int:
    """CPU threads per rank: the configured number, else the cores shared out between the ranks."""
    return config.model.num_threads or max(1, (os.cpu_count() or 1) // config.parallel.world_size)


def part_plan(config, rank: int):
    """(architecture) -> rank `rank`'s part: a slice of every layer (tensor parallel) or a stage of layers."""
    pc = config.parallel
    if pc.pipeline_parallel_size > 1:
        return partial(Stage.plan, rank=rank, size=pc.pipeline_parallel_size)
    return partial(Shard.plan, rank=rank, size=pc.tensor_parallel_size)


def widest_kv_share(config) -> float:
    """KV bytes per block of the rank with the most KV heads x layers, over rank 0's."""
    mc = config.model
    arch = model_arch_config(mc.model, mc.cache_dir, False)
    sizes = []
    for rank in range(config.parallel.world_size):
        local = part_plan(config, rank)(arch).local_config(arch)
        sizes.append(local.num_kv_heads * local.num_layers)
    return max(sizes) / sizes[0]


def check_plan(config) -> None:
    """Plan rank 0's part before any worker starts: a split that does not fit the model fails here, once and clearly
    (and a catalog model is pulled here, once, not by every rank at the same time)."""
    mc = config.model
    part_plan(config, 0)(model_arch_config(mc.model, mc.cache_dir, config.show_progress))


def load_part(config, rank: int, show_progress: bool) -> LoadedModel:
    """Rank `rank`'s part of the configured model, on its device with its share of the threads (the driver and
    every worker load through here, so all build the same layers)."""
    mc = config.model
    torch.set_num_threads(rank_threads(config))
    device = rank_device(torch.device(default_device() if mc.device == "auto" else mc.device), rank)
    return load_model(mc.model, parse_dtype(mc.dtype), str(device), mc.cache_dir, show_progress, config.quant.spec(),
                      part_plan(config, rank))


def own_part(runner: ModelRunner, config):
    """What a rank runs of each step, (seqs, pooled) -> logits on rank 0: the whole step on its slice (tensor
    parallel), or its stage of the step's micro-batches (pipeline parallel)."""
    if config.parallel.pipeline_parallel_size > 1:
        return PipelineStage(runner, config.parallel.num_microbatches, parse_dtype(config.model.dtype)).execute
    return partial(ModelRunner.execute, runner)


class DriverRunner(ModelRunner):
    """Rank 0's runner: each step's sequences go to the workers, then rank 0 runs its own part of the step."""

    def __init__(self, group: WorkerGroup, config, model, device: torch.device):
        super().__init__(model, config.cache.block_size, device)
        self.group, self.own_part = group, own_part(self, config)

    @property
    def failure(self) -> str | None:
        """Why no step can run: a collective failed, or (noticed while idle) a worker has exited."""
        if self.group.failure is None and not self.group.workers_alive():
            self.group.failure = f"{self.group.kind} {self.group.describe_exits()}"
            log.error(self.group.failure)
            self.group.release()
        return self.group.failure

    def execute(self, seqs: list[ScheduledSeq], pooled: dict | None = None) -> torch.Tensor:
        self.group.broadcast(("step", seqs, pooled is not None))
        return self.group.guard(lambda: self.own_part(seqs, pooled))

    def close(self) -> None:
        self.group.close()


# ---- a worker process ----------------------------------------------------------------------------------
def receive():
    message = [None]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def run_worker(port: int, rank: int, size: int, backend: str) -> None:
    """Join the group, build this rank's part and its KV pool as the driver says, then run steps until told to stop."""
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=STEP_TIMEOUT)
    driver = os.getppid()
    try:
        config = receive()
        join_shared_memory(config, backend, rank, lambda: os.getppid() == driver)
        loaded = load_part(config, rank, show_progress=False)
        device = next(loaded.model.parameters()).device
        cc, mc = config.cache, config.model
        num_blocks = receive()       # the driver sizes the pool; every rank holds the same block ids
        if num_blocks is None:       # the driver failed to build its part and stopped us
            return
        allocate_kv_cache(loaded.model, num_blocks, cc.block_size, parse_dtype(mc.dtype), device,
                          get_backend(mc.attention_backend), get_kv_dtype(cc.kv_cache_dtype))
        run_step = own_part(ModelRunner(loaded.model, cc.block_size, device), config)
        while (message := receive()) is not None:
            _, seqs, pooled = message
            run_step(seqs, {} if pooled else None)
    finally:
        leave_shared_memory()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="an effinfer tensor- or pipeline-parallel worker (started by the "
                                                 "engine)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args(argv)
    code = 0
    try:
        run_worker(args.port, args.rank, args.size, args.backend)
    except Exception as exc:   # the driver went away, or this rank could not load: the driver reports the exit
        first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"effinfer worker rank {args.rank}: {type(exc).__name__}: {first_line}", file=sys.stderr)
        code = 1
    # Leave without the interpreter's teardown: gloo's threads can abort it, and a worker holds nothing to save.
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
