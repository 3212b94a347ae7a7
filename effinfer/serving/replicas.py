"""Replicas behind one endpoint, on Ray: `effinfer serve --replicas N`.

Each replica is a Ray actor that builds its own engine and steps it on a thread (`ThreadEngine`); Ray places
the actors (on the machine, or across a cluster given by address), restarts one that dies, and carries the
requests and their output deltas (a streaming actor call per request). The API process keeps HTTP, validation
and the tokenizer, and a router picks the replica for each request:

- `prefix` (default): the replica that most likely holds the prompt's prefix in its prefix cache, judged by the
  chained hashes of the prompt's first blocks that the router has sent to each replica before; when that
  replica has clearly more requests in flight than the least-loaded one, the least-loaded one instead;
- `least_loaded`: fewest requests in flight;
- `round_robin`.

A replica that dies ends the streams it was serving: a request that had produced nothing yet is sent to another
replica, one that had already streamed text ends with an error that says so. Nothing is dropped silently. The
server's metrics are the replicas' counters summed, polled once a second, which is also the health check.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
from dataclasses import dataclass

from effinfer.core_process import EngineInfo
from effinfer.outputs import EngineStats
from effinfer.serving.async_engine import EngineClient, EngineDeadError, OnStep

log = logging.getLogger("effinfer.serving")

ROUTING = ("prefix", "least_loaded", "round_robin")
ROUTE_BLOCKS = 64
"""Leading blocks of a prompt the router hashes: enough for long shared system prompts, bounded per request."""
REMEMBERED_BLOCKS = 100_000
"""Block hashes remembered per replica (least recently routed forgotten first), about a large KV pool's worth."""
POLL_SECONDS = 1.0
START_TIMEOUT_S = 900
"""How long the replicas may take to build their engines (a large model, a first pull) before start-up gives up."""
MAX_RESTARTS = 5
"""Ray restarts a replica that dies this many times; after that it stays down and the others serve."""


# ---- the router ------------------------------------------------------------------------------------------
def prefix_hashes(prompt_ids: list[int], block_size: int, max_blocks: int = ROUTE_BLOCKS) -> list[int]:
    """Chained hashes of the prompt's full leading blocks: equal hashes mean equal prefixes up to that block
    (Python's hash of a tuple of ints: the same in every process, and ~1 us a block)."""
    hashes, previous = [], 0
    for start in range(0, min(len(prompt_ids) // block_size, max_blocks) * block_size, block_size):
        previous = hash((previous, *prompt_ids[start:start + block_size]))
        hashes.append(previous)
    return hashes


@dataclass
class ReplicaLoad:
    """What the router knows of one replica."""

    in_flight: int = 0
    healthy: bool = True


class Router:
    """Picks a replica per request, by policy; counts requests in flight per replica (the caller says when one ends).

    For prefix routing one table maps each remembered block hash to the replicas it was sent to (least recently
    routed forgotten first), so a decision walks the prompt's blocks once, whatever the number of replicas."""

    def __init__(self, num_replicas: int, policy: str = "prefix", block_size: int = 16, max_imbalance: int = 4):
        if policy not in ROUTING:
            raise ValueError(f"routing={policy!r} is not supported; choose from {', '.join(ROUTING)}")
        self.policy, self.block_size, self.max_imbalance = policy, block_size, max_imbalance
        self.replicas = [ReplicaLoad() for _ in range(num_replicas)]
        self.owners: collections.OrderedDict[int, set[int]] = collections.OrderedDict()
        """Block hash -> the replicas that were sent a prompt with that prefix, oldest first."""
        self.max_remembered = REMEMBERED_BLOCKS * num_replicas
        self.cached_blocks = [0] * num_replicas
        """Per replica: remembered block hashes it holds (what the router has filled its cache with)."""
        self._turn = itertools.count()

    def choose(self, prompt_ids: list[int], exclude: frozenset = frozenset()) -> int:
        candidates = [i for i, r in enumerate(self.replicas) if r.healthy and i not in exclude]
        if not candidates:
            raise EngineDeadError("no replica is running")
        if self.policy == "round_robin":
            return candidates[next(self._turn) % len(candidates)]
        least = min(candidates, key=lambda i: self.replicas[i].in_flight)
        if self.policy == "least_loaded":
            return least
        hashes = prefix_hashes(prompt_ids, self.block_size)
        holders = self._longest_holders(hashes, set(candidates))
        if holders:     # the replicas with the longest cached prefix: the least busy of them
            best = min(holders, key=lambda i: self.replicas[i].in_flight)
        elif hashes:    # a prefix seen nowhere: the replica with the fewest prefix blocks so far, so caches fill evenly
            best = min(candidates, key=lambda i: (self.cached_blocks[i], self.replicas[i].in_flight))
        else:           # shorter than a block: nothing to cache
            best = least
        if self.replicas[best].in_flight - self.replicas[least].in_flight > self.max_imbalance:
            best = least    # the cache saves a prefill; a queue there would cost more
        self._remember(best, hashes)
        return best

    def _longest_holders(self, hashes: list[int], candidates: set[int]) -> set[int]:
        """The candidates that were sent the longest run of this prompt's leading blocks (empty: none was sent any)."""
        holders: set[int] = set()
        for h in hashes:
            narrowed = (holders or candidates) & self.owners.get(h, set())
            if not narrowed:
                break
            holders = narrowed
        return holders

    def _remember(self, index: int, hashes: list[int]) -> None:
        for h in hashes:
            owners = self.owners.setdefault(h, set())
            if index not in owners:
                owners.add(index)
                self.cached_blocks[index] += 1
            self.owners.move_to_end(h)
        while len(self.owners) > self.max_remembered:
            for owner in self.owners.popitem(last=False)[1]:
                self.cached_blocks[owner] -= 1

    def started(self, index: int) -> None:
        self.replicas[index].in_flight += 1

    def ended(self, index: int) -> None:
        self.replicas[index].in_flight -= 1

    def forget(self, index: int) -> None:
        """A replica restarted: its cache is empty."""
        for owners in self.owners.values():
            owners.discard(index)
        self.cached_blocks[index] = 0


# ---- a replica: a Ray actor around an engine on a thread ---------------------------------------------------
class EngineReplica:
    """The actor's class (made remote at start-up: Ray is imported only when replicas are asked for)."""

    def __init__(self, config, stall_timeout: float):
        from effinfer.build import build_engine
        from effinfer.serving.async_engine import ThreadEngine

        self.client = ThreadEngine(build_engine(config, serving=True), stall_timeout=stall_timeout)
        self.started = False

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self.client.start_async()

    async def info(self) -> tuple[EngineInfo, int]:
        await self._start()
        return self.client.info, os.getpid()

    async def generate(self, prompt_ids: list[int], params: list, request_id: str, priority: int):
        """A streaming call: yields (sample index, output delta); cancelled by the caller, it aborts the request."""
        await self._start()
        async for index, output in self.client.generate(prompt_ids, params, request_id, priority):
            yield index, output

    async def status(self) -> tuple[EngineStats, str | None]:
        await self._start()
        return self.client.stats, self.client.health()


# ---- the API process's side ----------------------------------------------------------------------------
class ReplicaSet(EngineClient):
    """N engine replicas on Ray behind the server's engine interface."""

    def __init__(self, config, num_replicas: int, routing: str = "prefix", ray_address: str | None = None,
                 on_step: OnStep | None = None, stall_timeout: float = 60.0):
        super().__init__(EngineInfo(config.model.model, 0, 0), on_step, stall_timeout)
        if num_replicas < 1:
            raise ValueError(f"replicas={num_replicas} must be at least 1")
        self.config, self.num_replicas, self.ray_address = config, num_replicas, ray_address
        self.router = Router(num_replicas, routing, config.cache.block_size,
                             max_imbalance=max(2, config.scheduler.max_num_seqs // 8))
        self.actors: list = []
        self.pids: list[int | None] = [None] * num_replicas
        self._started_ray = False
        self._poller: asyncio.Task | None = None
        self._stopped = False
        self.replica_stats: list[EngineStats] = [EngineStats() for _ in range(num_replicas)]
        self.num_moved = 0
        """Requests sent to another replica because theirs died before answering."""
        self.num_cut_short = 0
        """Requests ended with an error because their replica died while they streamed."""

    def start(self) -> None:
        """Start (or join) Ray, create the replicas and wait until every one has built its engine."""
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError("replicas run on Ray, which is not installed: pip install 'ray>=2.40'") from exc
        from effinfer.loader.source import load_tokenizer

        if not ray.is_initialized():
            threads = self.config.model.num_threads or max(1, (os.cpu_count() or 1) // self.num_replicas)
            options = {"address": self.ray_address} if self.ray_address else {   # "local": a new cluster, here
                "address": "local", "num_cpus": max(os.cpu_count() or 1, self.num_replicas),
                "object_store_memory": 256 << 20, "include_dashboard": False}
            try:
                ray.init(log_to_driver=True, configure_logging=False, **options)
            except (ConnectionError, ValueError) as exc:
                raise RuntimeError(f"could not start or join Ray ({self.ray_address or 'a local cluster'}): {exc}") from exc
            self._started_ray = True
        else:
            threads = self.config.model.num_threads
        actor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0, num_cpus=1,
                           num_gpus=self._gpus_per_replica(ray))(EngineReplica)
        config = self._replica_config(threads)
        self.actors = [actor.options(name=None).remote(config, self.stall_timeout) for _ in range(self.num_replicas)]
        self.tokenizer = load_tokenizer(self.config.model.model, self.config.model.cache_dir)
        try:
            infos = ray.get([a.info.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise RuntimeError(f"the replicas did not start within {START_TIMEOUT_S} s: the cluster may lack what each "
                               f"asks for ({self._demand(ray)})") from None
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"the replicas could not start: {_cause(exc)}") from exc
        self.info = infos[0][0]
        self.pids = [pid for _, pid in infos]
        self.info.summary = f"{self.num_replicas} replicas on Ray ({self.router.policy} routing); each: {self.info.summary}"
        self.info.settings = {**self.info.settings, "replicas": str(self.num_replicas), "routing": self.router.policy}

    def _gpus_per_replica(self, ray) -> int:
        """One GPU each where the replicas run on GPUs (asked for, or `auto` on a cluster with a GPU per replica), so
        that Ray places them on different GPUs; none for CPU replicas."""
        device, ranks = self.config.model.device, self.config.parallel.world_size   # a split replica: a GPU a rank
        if device.startswith("cuda"):
            return ranks
        return ranks if device == "auto" and ray.cluster_resources().get("GPU", 0) >= self.num_replicas * ranks else 0

    def _demand(self, ray) -> str:
        return f"1 CPU and {self._gpus_per_replica(ray)} GPUs each"

    def _replica_config(self, threads: int | None):
        import dataclasses

        model = dataclasses.replace(self.config.model, num_threads=threads) if threads else self.config.model
        return dataclasses.replace(self.config, model=model, show_progress=False)

    async def start_async(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._poller is not None:
            self._poller.cancel()
        self.fail_all(EngineDeadError("the server is shutting down"))
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self._started_ray:
            ray.shutdown()

    def dead_reason(self) -> str | None:
        if self._stopped:
            return "the server is shutting down"
        if not self.actors:
            return "the replicas are starting"
        return None if any(r.healthy for r in self.router.replicas) else "no replica is running"

    # ---- requests ----------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: list, request_id: str, priority: int = 0):
        """Stream from the chosen replica; if it dies before its first output, the request goes to another."""
        reason = self.dead_reason()
        if reason is not None:
            raise EngineDeadError(reason)
        tried: set[int] = set()
        self.num_in_flight += len(params)
        try:
            while True:
                index = self.router.choose(prompt_ids, frozenset(tried))
                tried.add(index)
                delivered = False
                try:
                    async for item in self._stream(index, prompt_ids, params, request_id, priority):
                        delivered = True
                        yield item
                    return
                except ReplicaLost as lost:
                    if delivered:
                        self.num_cut_short += 1
                        raise EngineDeadError(f"{lost}; the answer was cut short") from None
                    self.num_moved += 1
                    log.warning("%s before answering %s; sending it to another replica", lost, request_id)
        finally:
            self.num_in_flight -= len(params)

    async def _stream(self, index: int, prompt_ids, params, request_id, priority):
        import ray

        self.router.started(index)
        stream = self.actors[index].generate.options(num_returns="streaming").remote(
            prompt_ids, params, request_id, priority)
        finished = False
        try:
            async for ref in stream:
                item = await ref
                self.report_progress(self.stats, [item[1]], None)     # token counters, between polls
                yield item
            finished = True
        except ray.exceptions.RayTaskError as exc:   # the replica refused it (a bad request): its own error, no traceback
            finished = True
            raise _cause(exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            finished = True
            self.router.replicas[index].healthy = False
            self.router.forget(index)
            raise ReplicaLost(f"replica {index} failed ({type(exc).__name__})") from exc
        finally:
            self.router.ended(index)
            if not finished:     # the client left: the replica aborts the request and frees its blocks
                ray.cancel(stream)

    # ---- health and metrics --------------------------------------------------------------------------------
    async def _poll(self) -> None:
        """Every second: each replica's counters and health; the sums are the server's metrics."""
        import ray

        while True:
            refs = [actor.status.remote() for actor in self.actors]
            for index, ref in enumerate(refs):
                try:
                    stats, problem = await asyncio.wait_for(asyncio.wrap_future(ref.future()), POLL_SECONDS * 2)
                except (asyncio.TimeoutError, ray.exceptions.RayError):
                    self.router.replicas[index].healthy = False
                    continue
                if not self.router.replicas[index].healthy and problem is None:
                    log.warning("replica %d is serving again", index)
                self.router.replicas[index].healthy = problem is None
                self.replica_stats[index] = stats
            self.report_progress(sum_stats(self.replica_stats), [], None)
            await asyncio.sleep(POLL_SECONDS)


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, without Ray's wrapping (whose text is the remote traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ReplicaLost(RuntimeError):
    """The replica serving a stream died or became unreachable."""


def sum_stats(parts: list[EngineStats]) -> EngineStats:
    """The replicas' counters as one engine's (usage: blocks in use over all blocks)."""
    total = EngineStats(decode_steps=parts[0].decode_steps if parts else "eager")
    for s in parts:
        for name in ("num_running", "num_waiting", "num_free_blocks", "num_blocks", "prefix_hit_tokens",
                     "prefix_queried_tokens", "num_preemptions", "exit_candidates"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for key, value in s.spec.items():
            total.spec[key] = total.spec.get(key, 0) + value
    total.kv_cache_usage = 1.0 - total.num_free_blocks / total.num_blocks if total.num_blocks else 0.0
    return total
