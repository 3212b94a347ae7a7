"""The routing simulation (benchmarks/simulate_routing.py): its replica model against hand-computed timelines
and the engine's cache rules, its fast path against step-by-step simulation, the routing policies' defining
properties, conservation, the router as a bottleneck, and the cost-model fit. No engine, no network."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

from effinfer.bench.provenance import REPO_ROOT

_spec = importlib.util.spec_from_file_location("simulate_routing", REPO_ROOT / "benchmarks" / "simulate_routing.py")
sim = importlib.util.module_from_spec(_spec)
sys.modules["simulate_routing"] = sim          # dataclasses look their module up while the class is made
_spec.loader.exec_module(sim)

AFFINE = sim.StepCostModel([], [0.010, 0.0004, 0.0002, 1e-6, 2e-6, 0.0, 0.0])
"""10 ms a step, 0.4 ms a token, 0.2 ms a decoding sequence, 1 us a token of decode context and 2 us a token
of the longest one."""


def one_replica(lengths, config=None, costs=AFFINE, concurrency=None, shared_len=0, **kwargs):
    config = config or sim.ReplicaConfig()
    requests = [sim.SimRequest(i, i, 0, p, o, shared_len, 0 if shared_len else -1, config.block_size)
                for i, (p, o) in enumerate(lengths)]
    result = sim.simulate(sim.ListClients(requests, [0.0] * len(requests), concurrency), 1, "round-robin", config,
                          costs, **kwargs)
    return requests, result


def session_trace(num_sessions=60, turns=4, num_prefixes=3, seed=0, block_size=16):
    """Sessions of several turns over a few shared system prompts, random lengths."""
    rng = np.random.default_rng(seed)
    settings = sim.TraceSettings(num_system_prompts=num_prefixes, max_turns=turns, think_time_s=2.0)
    conversations = [[(int(rng.integers(5, 120)), int(rng.integers(1, 60))) for _ in range(turns)]
                     for _ in range(num_sessions)]
    return sim.build_trace(conversations, num_sessions * turns, settings, block_size, seed)


def run_sessions(sessions, num_replicas, policy, rate=2.0, config=None, **kwargs):
    return sim.simulate(sim.SessionClients(sessions, rate), num_replicas, policy, config or sim.ReplicaConfig(),
                        AFFINE, **kwargs)


def test_one_request_follows_the_hand_computed_timeline():
    # prompt 1000, budget 512: chunks 512 and 488 (the second after 512 cached tokens: no prior-context cost
    # in this model), the first token at the second step's end, then 4 decode steps of one sequence
    (request,), _ = one_replica([(1000, 5)])
    step1 = 0.010 + 0.0004 * 512
    step2 = 0.010 + 0.0004 * 488
    assert request.first_token == pytest.approx(step1 + step2, abs=1e-12)
    decodes = sum(0.010 + 0.0004 + 0.0002 + 3e-6 * (1000 + g) for g in range(1, 5))
    assert request.finish == pytest.approx(step1 + step2 + decodes, abs=1e-12)


def test_decodes_share_the_budget_with_a_later_prompt_chunk():
    # a decoding request takes one token of the budget; a prompt that arrives meanwhile gets the other 511
    config = sim.ReplicaConfig(max_num_batched_tokens=512)
    first = sim.SimRequest(0, 0, 0, 100, 50)
    second = sim.SimRequest(1, 1, 0, 600, 2)
    step = 0.010 + 0.0004 * 100
    clients = sim.ListClients([first, second], [0.0, step + 0.001], None)
    sim.simulate(clients, 1, "round-robin", config, AFFINE)
    t = step + 0.010 + 0.0004 * 1 + 0.0002 + 3e-6 * 101          # the decode step under way when it arrives
    t += 0.010 + 0.0004 * 512 + 0.0002 + 3e-6 * 102              # 1 decode + 511 prompt tokens
    t += 0.010 + 0.0004 * 90 + 0.0002 + 3e-6 * 103               # 1 decode + the last 89 prompt tokens
    assert second.first_token == pytest.approx(t, abs=1e-12)


def test_fast_forward_gives_the_same_timeline_as_step_by_step():
    for policy in sim.POLICIES:
        results, events = [], []
        for fast in (True, False):
            sessions = session_trace()
            result = run_sessions(sessions, 3, policy, rate=1.5, fast_forward=fast)
            results.append(sorted((r.request_id, r.first_token, r.finish, r.hit_tokens, r.replica) for r in result.requests))
            events.append(sum(r.num_plans for r in result.replicas))
        assert events[0] < events[1] / 3                          # the fast path did take runs of steps at once
        for a, b in zip(*results):
            assert a[0] == b[0] and a[3:] == b[3:]
            assert a[1] == pytest.approx(b[1], abs=1e-9) and a[2] == pytest.approx(b[2], abs=1e-9)


def test_every_request_finishes_once_and_every_block_comes_back():
    sessions = session_trace(num_sessions=80)
    config = sim.ReplicaConfig(num_blocks=120)                   # tight: admissions wait for blocks
    result = run_sessions(sessions, 4, "prefix-aware", rate=4.0, config=config)
    trace = [r for s in sessions for r in s]
    assert sorted(r.request_id for r in result.requests) == sorted(r.request_id for r in trace)
    assert all(r.arrival <= r.routed_at <= r.first_token <= r.finish for r in trace)
    assert all(r.generated == r.output_len for r in trace)
    assert sum(r.num_steps for r in result.replicas) > 0
    for replica in result.replicas:
        assert not replica.running and not replica.waiting
        assert replica.pool.num_free == config.num_blocks and not replica.pool.in_use
    assert not result.router.outstanding.any() and not result.router.load_key.any()
    # turns of a session follow each other: each is sent after the previous one's answer
    for session in sessions:
        for earlier, later in zip(session, session[1:]):
            assert later.arrival >= earlier.finish


def test_the_cache_evicts_the_least_recently_freed_blocks_tail_first():
    config = sim.ReplicaConfig(num_blocks=6, block_size=4)
    pool = sim.BlockPool(config)
    a = sim.SimRequest(0, 0, 0, 12, 4, block_size=4)              # 16 tokens: 4 blocks
    assert pool.admit(a, 0)
    pool.register(a, 16)
    pool.release(a)
    keys = [a.key(i) for i in range(4)]
    assert list(pool.free_cached) == keys[::-1] and pool.num_free == 6
    b = sim.SimRequest(1, 1, 0, 10, 2, block_size=4)              # 3 blocks: 2 empty ones, then evict a's last
    assert pool.admit(b, 0)
    assert list(pool.free_cached) == keys[2::-1]
    a_again = sim.SimRequest(2, 0, 1, 13, 2, block_size=4)        # a's session, later turn: hits a's first 3
    assert pool.cached_prefix_blocks(a_again) == 3
    assert not pool.admit(a_again, 3)                             # 4 more blocks needed, 3 free after the hits
    assert list(pool.free_cached) == keys[2::-1]                  # a refusal changes nothing


def test_a_prefix_scheduled_in_a_step_is_a_hit_for_requests_admitted_after_it():
    # prefix_cache.py's workload: 32 requests at once sharing 1,000 tokens; the engine registers blocks as they
    # are scheduled, so only the first request misses (its 62 whole prefix blocks serve the other 31)
    config = sim.ReplicaConfig(max_num_seqs=32, max_num_batched_tokens=2048)
    requests, _ = one_replica([(1020, 8)] * 32, config, shared_len=1000)
    assert [r.hit_tokens for r in requests] == [0] + [992] * 31
    off = sim.ReplicaConfig(max_num_seqs=32, max_num_batched_tokens=2048, enable_prefix_caching=False)
    requests, _ = one_replica([(1020, 8)] * 32, off, shared_len=1000)
    assert all(r.hit_tokens == 0 for r in requests)


def two_prefix_hit_rate(policy: str) -> float:
    """Every request is one of two 1,024-token prefixes (chosen at random) plus 16 own tokens; each replica's
    cache holds one prefix, not both; two clients, so each replica serves one request at a time. A prefix seen
    for the first time goes to the least-loaded replica (a home chosen by hash could be the same for both)."""
    rng = np.random.default_rng(0)
    config = sim.ReplicaConfig(num_blocks=70)
    requests = [sim.SimRequest(i, i, 0, 1040, 4, 1024, int(rng.integers(2))) for i in range(200)]
    settings = sim.RouterSettings(new_prefix="least-loaded")
    sim.simulate(sim.ListClients(requests, [0.0] * 200, 2), 2, policy, config, AFFINE, router_settings=settings)
    return sum(r.hit_tokens for r in requests) / sum(r.prompt_len for r in requests)


def test_prefix_aware_routing_keeps_each_prefix_warm_and_round_robin_does_not():
    assert two_prefix_hit_rate("prefix-aware") > 0.9
    assert 0.35 < two_prefix_hit_rate("round-robin") < 0.65


def test_new_prefixes_go_to_homes_spread_over_the_replicas():
    router = sim.Router("prefix-aware", 8)

    def route_and_finish(request_id: int, system: int) -> int:
        request = sim.SimRequest(request_id, request_id, 0, 600, 4, 512, system)
        replica = router.route(request)
        router.done(replica, request)          # every replica idle again: no load bound in play
        return replica

    homes = [route_and_finish(i, system) for i, system in enumerate(range(64))]
    assert set(homes) == set(range(8))
    assert [route_and_finish(100 + i, system) for i, system in enumerate(range(64))] == homes   # and they stay


def test_least_loaded_never_sends_a_request_past_an_idle_replica():
    sessions = session_trace(num_sessions=100)
    result = run_sessions(sessions, 5, "least-loaded", rate=6.0, log_decisions=True)
    decisions = result.router.decisions
    assert len(decisions) == sum(len(s) for s in sessions)
    assert all(chosen == fewest for chosen, fewest in decisions)
    # the property is the policy's: round-robin on the same trace does send requests to busier replicas
    rr = run_sessions(session_trace(num_sessions=100), 5, "round-robin", rate=6.0, log_decisions=True)
    assert any(chosen > fewest for chosen, fewest in rr.router.decisions)


def test_prefix_aware_leaves_an_overloaded_replica():
    # one shared prefix for everyone: without the bound every request would go to one replica
    rng = np.random.default_rng(1)
    requests = [sim.SimRequest(i, i, 0, 600, 40, 512, 0) for i in range(300)]
    times = np.cumsum(rng.exponential(0.01, 300)).tolist()
    settings = sim.RouterSettings(imbalance_bound=3)
    result = sim.simulate(sim.ListClients(requests, times, None), 4, "prefix-aware", sim.ReplicaConfig(), AFFINE,
                          router_settings=settings, log_decisions=True)
    assert len({r.replica for r in requests}) == 4
    assert all(chosen - fewest <= 3 for chosen, fewest in result.router.decisions)


def router_wait_s(cost_s: float, rate: float, num: int = 400) -> float:
    rng = np.random.default_rng(2)
    requests = [sim.SimRequest(i, i, 0, 20, 2) for i in range(num)]
    times = np.cumsum(rng.exponential(1 / rate, num)).tolist()
    result = sim.simulate(sim.ListClients(requests, times, None), 8, "least-loaded", sim.ReplicaConfig(), AFFINE,
                          router_cost_s=cost_s)
    return float(np.mean([r.routed_at - r.arrival - cost_s for r in result.requests]))


def test_the_router_becomes_the_bottleneck_when_rate_times_cost_exceeds_one():
    rate = 100.0
    below = router_wait_s(0.005, rate)            # utilisation 0.5: a short queue
    above = router_wait_s(0.020, rate)            # utilisation 2: the queue grows for the whole run
    assert below < 0.02
    # 400 requests arrive over ~4 s but take 8 s to route: the mean wait is about (8 - 4) / 2 s
    assert 1.0 < above < 3.0


def test_saturation_replicas_solves_rate_times_cost_equals_one():
    a, b, rate = 20e-6, 0.05e-6, 0.5
    r = sim.saturation_replicas(a, b, rate)
    assert rate * r * (a + b * r) == pytest.approx(1.0)
    assert sim.saturation_replicas(20e-6, 0.0, 0.5) == pytest.approx(1e5)
    rows = [{"policy": "least-loaded", "replicas": n, "router_service_us": 20 + 0.05 * n} for n in (1, 10, 100, 1000)]
    fit = sim.router_saturation(rows, rate)["least-loaded"]
    assert fit["cost_us_intercept"] == pytest.approx(20) and fit["cost_us_per_replica"] == pytest.approx(0.05)
    assert fit["saturation_replicas"] == pytest.approx(r)


def test_the_cost_fit_reproduces_its_input_points():
    truth = sim.StepCostModel(sim.COST_KNOTS, [0.006, 0.0009, 0.0005, -0.0004, -0.0002, -0.0001, 0.0002, 1.3e-6,
                                               1.8e-6, 9e-6, 1e-7])
    shapes = [sim.StepShape(n, prefill_prior=c, prefill_pairs=n * c) for n, c in sim.PREFILL_POINTS]
    for groups in sim.DECODE_POINTS:
        seqs = sum(n for n, _ in groups)
        shapes.append(sim.StepShape(seqs, seqs, sum(n * c for n, c in groups), max(c for _, c in groups)))
    points = [(s, truth.step_time(**s.__dict__)) for s in shapes]
    fitted = sim.fit_cost_model(points, sim.COST_KNOTS)
    assert max(abs(e) for e in sim.fit_errors(fitted, points)) < 1e-9
    assert fitted.coefficients == pytest.approx(truth.coefficients, rel=1e-6, abs=1e-12)
    mixed = sim.StepShape(16 + 256, 16, 16 * 514, 514)            # a step it was not fitted on
    assert fitted.step_time(**mixed.__dict__) == pytest.approx(truth.step_time(**mixed.__dict__))
    assert sim.StepCostModel.from_dict(fitted.to_dict()) == fitted


def test_a_plan_knows_how_many_of_its_growing_steps_are_done():
    plan = sim.Plan(start=1.0, steps=10, base=0.1, growth=0.01, chunks=[], decodes=[])
    ends = [plan.end(k) for k in range(11)]
    assert ends[1] == pytest.approx(1.1) and ends[2] == pytest.approx(1.21)
    for k in range(10):
        assert plan.steps_done_by(ends[k]) == k
        assert plan.steps_done_by((ends[k] + ends[k + 1]) / 2) == k


def test_validation_replays_a_serve_record_for_any_replica_count():
    record = {"benchmark": "serve", "commit": "c" * 40, "completed": 16, "total_input_tokens": 16 * 210,
              "config": {"workload": "random", "input_len": 200, "output_len": 64, "max_concurrency": 4,
                         "request_rate": "inf", "seed": 0, "label": "two replicas"}}
    one = sim.validate(record, "r.json", AFFINE, sim.ReplicaConfig(), 1)[0]
    simulated = {k: m["simulated"] for k, m in one["metrics"].items()}
    assert set(simulated) == set()                                 # the record has no measured metric yet
    record.update(mean_ttft_ms=100.0, mean_tpot_ms=20.0, output_throughput=50.0, median_ttft_ms=90.0, p99_ttft_ms=200.0)
    rows = {n: sim.validate(record, "r.json", AFFINE, sim.ReplicaConfig(), n)[0] for n in (1, 2)}
    for row in rows.values():
        assert set(row["metrics"]) == {"mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "output_throughput"}
        for m in row["metrics"].values():
            assert m["rel_error"] == pytest.approx(m["simulated"] / m["measured"] - 1)
    # four clients on two replicas: two batches of two instead of one of four, each step cheaper
    assert rows[2]["metrics"]["mean_tpot_ms"]["simulated"] < rows[1]["metrics"]["mean_tpot_ms"]["simulated"]
    # the replayed prompts carry the record's token total (210 each, not the nominal 200)
    lengths, shared = sim.serve_workload("random", 16, 200, 64, 0, None, 16 * 210)
    assert lengths == [(210, 64)] * 16 and shared == 0
    with pytest.raises(ValueError, match="cannot replay"):
        sim.validate({"benchmark": "latency"}, "x.json", AFFINE, sim.ReplicaConfig())


def test_unknown_policies_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="round-robin, least-loaded, prefix-aware"):
        sim.Router("random", 2)


def test_a_conversation_becomes_turns_whose_prompts_extend_each_other():
    settings = sim.TraceSettings(max_turns=3, max_total_len=10_000)
    think = np.zeros(3)
    turns = sim.session_requests([(30, 40), (20, 50), (10, 5)], 7, 2, 300, settings, 0, 16, think)
    assert [t.prompt_len for t in turns] == [305 + 38, 305 + 38 + 40 + 2 + 28, 305 + 38 + 40 + 2 + 28 + 50 + 2 + 18]
    assert [t.output_len for t in turns] == [40, 50, 5]
    # the second turn's prompt starts with the first turn's prompt and answer: the same block keys
    first, second = turns[0], turns[1]
    shared_blocks = (first.prompt_len + first.output_len) // 16
    assert [first.key(i) for i in range(shared_blocks)] == [second.key(i) for i in range(shared_blocks)]
    assert first.key(0) == sim.SimRequest(99, 8, 0, 400, 1, 305, 2).key(0)     # another session, same system prompt
    assert first.key(19) != sim.SimRequest(99, 8, 0, 400, 1, 305, 2).key(19)   # past the shared 305 tokens
    assert sim.session_requests([(30, 40)], 7, 2, 300, sim.TraceSettings(max_total_len=350), 0, 16, think) == []


def test_router_costs_are_measured_and_positive():
    requests = [r for s in session_trace(num_sessions=30) for r in s]
    for policy in sim.POLICIES:
        cost = sim.measure_route_cost(policy, 64, requests, sim.RouterSettings(), repeats=1)
        assert 0 < cost < 0.01 and math.isfinite(cost)


def test_a_study_row_counts_only_its_window_and_renders_as_the_docs_table(tmp_path):
    import json

    from effinfer.bench import tables

    study = sim.StudySettings(rate_per_replica=0.5, warmup_s=20.0)
    rows = []
    for policy in sim.POLICIES:
        rows.append(sim.run_one(session_trace(num_sessions=40), 2, policy, AFFINE, sim.ReplicaConfig(), study,
                                sim.RouterSettings()))
    for row in rows:
        start, end = row["window_s"]
        assert start == 20.0 and row["requests"] < row["requests_simulated"]
        assert 0 < row["replica_busy_fraction"] < 1 and 0 <= row["hit_rate"] <= 1
        # the router's utilisation is the requests it routed in the window times its cost, over the window
        assert row["router_utilisation"] == pytest.approx(row["requests"] * row["router_service_us"] * 1e-6 / (end - start))
    record = {"benchmark": "simulate_routing", "commit": "d" * 40, "dirty": False, "date": "2026-12-06",
              "command": "python benchmarks/simulate_routing.py ...", "config": {"study": {"rate_per_replica": 0.5}},
              "runs": rows, "router_saturation": sim.router_saturation(rows, 0.5),
              "validation": [{"record": "serve_x.json", "commit": "e" * 40, "configuration": "default", "metrics":
                              {"mean_ttft_ms": {"measured": 200.0, "simulated": 150.0, "rel_error": -0.25}}}]}
    (tmp_path / "simulate_routing.json").write_text(json.dumps(record))
    text = tables.TABLES["simulate_routing"](tmp_path)
    first = rows[0]
    assert f"| 2 | round-robin | {first['hit_rate']:.0%} | {first['p50_ttft_ms']:,.0f} ms |" in text
    assert "| `serve_x.json` (eeeeeeeeee) | default | mean ttft ms | 200.0 | 150.0 | -25% |" in text
    assert "one router saturates at" in text and "at dddddddddd" in text
