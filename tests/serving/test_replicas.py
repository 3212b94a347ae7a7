"""Replicas on Ray behind one engine interface: the router's policies, two real replicas on a local Ray cluster
(prefix-aware routing against round-robin on a shared-prefix workload whose prefixes do not all fit one replica's
cache), and a replica killed under load: every request completes, moves to the other replica, or ends with an error
that says so; Ray restarts the replica and it serves again."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from effinfer import SamplingParams
from effinfer.config import EngineConfig
from effinfer.serving.async_engine import EngineDeadError
from effinfer.serving.replicas import ReplicaSet, Router, prefix_hashes, sum_stats
from effinfer.outputs import EngineStats
from tests.tiny_models import save_tiny_folder


# ---- the router ------------------------------------------------------------------------------------------------
def test_equal_prefixes_hash_alike_up_to_where_they_differ():
    a, b = list(range(40)), list(range(32)) + [99] * 8
    assert prefix_hashes(a, 16)[:2] == prefix_hashes(b, 16)[:2] and len(prefix_hashes(a, 16)) == 2
    assert prefix_hashes(a, 16)[0] != prefix_hashes(list(range(1, 41)), 16)[0]


def test_prefix_routing_keeps_a_prefix_on_one_replica_and_spreads_the_others():
    router = Router(2, "prefix", block_size=16)
    groups = [[g] * 64 for g in range(16)]
    first = [router.choose(groups[g] + [100 + g]) for g in range(16)]
    assert 4 <= first.count(0) <= 12                      # new prefixes spread over the replicas
    assert [router.choose(groups[g] + [200 + g]) for g in range(16)] == first   # and each stays where it went


def test_a_busy_replica_loses_its_prefix_to_an_idle_one():
    router = Router(2, "prefix", block_size=16, max_imbalance=2)
    prompt = [7] * 64
    home = router.choose(prompt)
    for _ in range(3):
        router.started(home)
    assert router.choose(prompt + [1]) != home
    router.replicas[1 - home].healthy = False
    assert router.choose(prompt + [2]) == home               # only one replica left: it takes the request


def test_round_robin_and_least_loaded():
    router = Router(3, "round_robin")
    assert [router.choose([1, 2]) for _ in range(4)] == [0, 1, 2, 0]
    router = Router(3, "least_loaded")
    router.started(0), router.started(0), router.started(1)
    assert router.choose([1]) == 2
    for replica in router.replicas:
        replica.healthy = False
    with pytest.raises(EngineDeadError, match="no replica is running"):
        router.choose([1])


def test_the_replicas_counters_add_up():
    total = sum_stats([EngineStats(num_running=2, num_free_blocks=10, num_blocks=20, prefix_hit_tokens=5),
                       EngineStats(num_running=1, num_free_blocks=20, num_blocks=20, prefix_hit_tokens=7)])
    assert (total.num_running, total.prefix_hit_tokens, total.kv_cache_usage) == (3, 12, 0.25)


# ---- two replicas on Ray ------------------------------------------------------------------------------------
BLOCK = 16


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-replica")
    save_tiny_folder("llama", folder)
    # a small pool: 30 blocks hold six of the workload's 4-block prefixes next to a running request
    config = EngineConfig.from_kwargs(model=str(folder), dtype="float32", num_blocks=30, max_num_seqs=4,
                                      max_model_len=256, compile=False, show_progress=False)
    replica_set = ReplicaSet(config, 2, "prefix")
    replica_set.start()
    yield replica_set
    replica_set.stop()
    import ray

    assert not ray.is_initialized()


def run(replica_set, coroutine_fn, timeout: float = 120):
    async def main():
        await replica_set.start_async()
        return await asyncio.wait_for(coroutine_fn(), timeout)
    return asyncio.run(main())


async def complete(replica_set, prompt_ids, request_id, max_tokens=4):
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)]
    tokens = []
    async for _, output in replica_set.generate(prompt_ids, params, request_id):
        tokens.extend(output.new_token_ids)
    return tokens


def replica_counters(replica_set) -> tuple[int, int]:
    import ray

    stats = [s for s, _ in ray.get([a.status.remote() for a in replica_set.actors])]
    return sum(s.prefix_hit_tokens for s in stats), sum(s.prefix_queried_tokens for s in stats)


def shared_prefix_workload(seed: int, groups: int = 10, passes: int = 4) -> list[list[int]]:
    """`groups` system prompts of 4 blocks, each asked `passes` times with its own question, in a shuffled order."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 250) for _ in range(4 * BLOCK)] for _ in range(groups)]
    prompts = [prefix + [rng.randrange(1, 250) for _ in range(8)] for prefix in prefixes for _ in range(passes)]
    rng.shuffle(prompts)
    return prompts


def hit_rate(replica_set, policy: str, seed: int) -> float:
    replica_set.router = Router(2, policy, BLOCK, replica_set.router.max_imbalance)
    before = replica_counters(replica_set)

    async def one_by_one():
        for i, prompt in enumerate(shared_prefix_workload(seed)):
            await complete(replica_set, prompt, f"{policy}-{seed}-{i}")
    run(replica_set, one_by_one)
    after = replica_counters(replica_set)
    return (after[0] - before[0]) / (after[1] - before[1])


def test_prefix_routing_hits_the_cache_far_more_often_than_round_robin(replicas):
    round_robin = hit_rate(replicas, "round_robin", seed=1)
    prefix = hit_rate(replicas, "prefix", seed=2)      # fresh prefixes: nothing cached from the first run
    assert round_robin > 0.1 and prefix >= 1.8 * round_robin, (prefix, round_robin)   # both hit; one far more


def test_a_killed_replica_loses_no_request_silently_and_comes_back(replicas):
    import ray

    replicas.router = Router(2, "least_loaded")
    prompts = [[i % 200 + 1] * 24 for i in range(12)]
    outcomes: dict[str, object] = {}
    streaming = asyncio.Event

    async def load_then_kill():
        started = streaming()

        async def one(i):
            params = [SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)]
            tokens = []
            try:
                async for _, output in replicas.generate(prompts[i], params, f"kill-{i}"):
                    tokens.extend(output.new_token_ids)
                    started.set()
                outcomes[f"k{i}"] = tokens
            except EngineDeadError as exc:
                outcomes[f"k{i}"] = exc
        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        await started.wait()
        os.kill(replicas.pids[0], signal.SIGKILL)
        await asyncio.gather(*tasks)
    run(replicas, load_then_kill)
    assert len(outcomes) == 12
    errors = [o for o in outcomes.values() if not isinstance(o, list)]
    assert all(len(o) == 200 for o in outcomes.values() if isinstance(o, list))    # whole answers
    assert all("replica 0 failed" in str(e) and "cut short" in str(e) for e in errors)   # or errors that say why
    assert len(errors) == replicas.num_cut_short and replicas.num_cut_short + replicas.num_moved >= 1
    deadline = time.monotonic() + 90       # Ray restarts the actor; it builds its engine again and serves

    async def until_back():
        while time.monotonic() < deadline:
            try:
                info_ref = replicas.actors[0].info.remote()
                _, pid = await asyncio.wrap_future(info_ref.future())
                replicas.pids[0] = pid
                break
            except ray.exceptions.RayError:
                await asyncio.sleep(1)
        await asyncio.sleep(2.5)           # the health poll sees it
        assert replicas.router.replicas[0].healthy
        replicas.router = Router(2, "round_robin")
        return [await complete(replicas, prompts[0], f"back-{i}") for i in range(2)]
    assert all(len(tokens) == 4 for tokens in run(replicas, until_back, timeout=150))

