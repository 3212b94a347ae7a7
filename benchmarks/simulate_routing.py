"""Serving on 1 to 1,000 effinfer replicas behind a router: a discrete-event simulation that compares routing
policies (round-robin, least-loaded, prefix-aware) on ShareGPT conversations, with a replica model whose step
costs are measured on this machine and which is first checked against the repository's measured serving records.

Two commands. The first times the real engine (`effinfer.LLM`, the default model and configuration) and writes
the fitted step-cost model as a record (about three minutes); the second reads that record and simulates
(a few minutes on 2 cores):

    python benchmarks/simulate_routing.py --measure --out benchmarks/results/step_costs_smollm2.json
    python benchmarks/simulate_routing.py --costs benchmarks/results/step_costs_smollm2.json \\
        --out benchmarks/results/simulate_routing.json

The model, in brief (docs/scaling.md says more):

- A replica is the engine's scheduler in miniature: continuous batching within a token budget per step
  (`max_num_batched_tokens`), at most `max_num_seqs` running requests, chunked prefill, and a prefix cache of
  `num_blocks` blocks of `block_size` tokens with the engine's rules (a hit is a run of whole cached blocks from
  the start of the prompt, blocks are registered when their tokens are scheduled, freed blocks stay cached until
  reused, least recently freed first, tails before heads). One difference: a request is admitted only when the
  blocks of its whole sequence (prompt and output) fit, so the simulated replica never preempts.
- A step takes `StepCostModel.step_time(...)`, fitted to steps timed on the engine: a piecewise-linear function
  of the tokens the step computes, plus terms per decoding sequence, per token of context that decodes attend
  to, and per token of cached context that prefill chunks attend to.
- Events are per step and replica, never per token: while a replica only decodes and nothing can join its
  batch, its steps up to the next finish are taken as one event (steps lengthen as contexts grow; an arrival
  cuts the run at the step in progress). `fast_forward=False` runs every step as its own event (the reference
  the tests compare with).
- The router is a single-server queue whose service time per request is the measured wall time of this
  script's own routing function (`Router.route`, plus hashing the prompt's blocks for prefix-aware routing).
- The trace: ShareGPT conversations of the development range, token counts from the SmolLM2 tokenizer, each
  conversation a session with one of K shared system prompts (Zipf popularity), every later turn's prompt the
  whole conversation so far. Sessions start as a Poisson process scaled with the replica count; a session's next
  turn follows its previous answer after an exponential think time. When a run needs more sessions than the
  development range holds, conversations are drawn with replacement (each draw is a session of its own).
- Before the study, the measured records named by `--validate` (by default the repository's serving, prefix-cache
  and replica records) are replayed with their own workloads, and simulated against measured metrics go into
  the record with their relative errors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from heapq import heappop, heappush
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg  # noqa: E402

POLICIES = ("round-robin", "least-loaded", "prefix-aware")
REPLICA_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
DEFAULT_COSTS = "benchmarks/results/step_costs_smollm2.json"
DEFAULT_VALIDATION = ("serve_effinfer_c1.json", "serve_effinfer_c8.json", "serve_effinfer_c32.json",
                      "serve_effinfer_sharegpt_c8.json", "serve_default.json", "prefix_cache.json",
                      "replicas_smollm2.json")
"""Measured records replayed before the study (one that is not there yet is skipped, and the run says so)."""
SYSTEM_OVERHEAD = 5
"""Template tokens around a system message in SmolLM2's ChatML (`<|im_start|>system\\n` ... `<|im_end|>\\n`)."""
USER_OVERHEAD = 8
"""Template tokens a user turn adds: its message markers (5) and the assistant header that follows (3)."""
ASSISTANT_OVERHEAD = 2
"""`<|im_end|>\\n` after an answer, before the next user turn."""


# ---- the step-cost model ---------------------------------------------------------------------------------

@dataclass
class StepShape:
    """What one engine step computes, in the terms its cost depends on."""

    tokens: int
    """Tokens computed: one per decoding sequence plus every prefill chunk's tokens."""
    decode_seqs: int = 0
    decode_kv: int = 0
    """Sum over decoding sequences of the tokens each attends to (its whole context)."""
    decode_kv_max: int = 0
    """The longest decoding context: one long sequence among short ones costs more than its share of
    `decode_kv` (measured), as if its attention were a critical path that the other threads cannot shorten."""
    prefill_prior: int = 0
    """Sum over prefill chunks of the tokens already in the cache before them (read from the pages)."""
    prefill_pairs: int = 0
    """Sum over prefill chunks of chunk tokens x tokens before them (attention scores against the cache)."""


@dataclass
class StepCostModel:
    """step seconds = g(tokens) + decode_seqs * c_seq + decode_kv * c_kv + decode_kv_max * c_kv_max
    + prefill_prior * c_prior + prefill_pairs * c_pairs, with g continuous and piecewise linear: a line plus a
    hinge at each knot (the matmuls, whose kernels change with the number of rows).

    Example (knots [64]): g(t) = c0 + c1 * t + c2 * max(0, t - 64); a step of 16 decodes over 500-token contexts
    costs g(16) + 16 * c_seq + 8000 * c_kv + 500 * c_kv_max."""

    knots: list[float]
    coefficients: list[float]
    """[c0, c1, one per knot, c_seq, c_kv, c_kv_max, c_prior, c_pairs]."""

    def step_time(self, tokens: int, decode_seqs: int = 0, decode_kv: int = 0, decode_kv_max: int = 0,
                  prefill_prior: int = 0, prefill_pairs: int = 0) -> float:
        c = self.coefficients
        g = c[0] + c[1] * tokens
        for i, knot in enumerate(self.knots):
            if tokens > knot:
                g += c[2 + i] * (tokens - knot)
        k = 2 + len(self.knots)
        return (g + c[k] * decode_seqs + c[k + 1] * decode_kv + c[k + 2] * decode_kv_max + c[k + 3] * prefill_prior
                + c[k + 4] * prefill_pairs)

    def decode_growth(self, decode_seqs: int) -> float:
        """Seconds a decode-only step gains over the previous one: every context is one token longer."""
        k = 2 + len(self.knots)
        return self.coefficients[k + 1] * decode_seqs + self.coefficients[k + 2]

    def to_dict(self) -> dict:
        names = ["intercept", "tokens", *[f"tokens_above_{k:g}" for k in self.knots], "decode_seqs", "decode_kv",
                 "decode_kv_max", "prefill_prior", "prefill_pairs"]
        return {"knots": self.knots, "coefficients": self.coefficients, "names": names}

    @classmethod
    def from_dict(cls, d: dict) -> "StepCostModel":
        return cls(list(d["knots"]), list(d["coefficients"]))


def design_row(shape: StepShape, knots: list[float]) -> list[float]:
    hinges = [max(0.0, shape.tokens - k) for k in knots]
    return [1.0, shape.tokens, *hinges, shape.decode_seqs, shape.decode_kv, shape.decode_kv_max, shape.prefill_prior,
            shape.prefill_pairs]


def fit_cost_model(points: list[tuple[StepShape, float]], knots: list[float]) -> StepCostModel:
    """Least squares on relative error (each row divided by its time), so fast decode steps count as much as
    long prefills."""
    rows = np.array([design_row(shape, knots) for shape, _ in points])
    times = np.array([t for _, t in points])
    coefficients, *_ = np.linalg.lstsq(rows / times[:, None], np.ones(len(times)), rcond=None)
    return StepCostModel(list(knots), coefficients.tolist())


def fit_errors(model: StepCostModel, points: list[tuple[StepShape, float]]) -> list[float]:
    """predicted / measured - 1 for each point."""
    return [model.step_time(**asdict(shape)) / t - 1 for shape, t in points]


# ---- measuring step costs on the engine -----------------------------------------------------------------

DECODE_POINTS = ([((b, 32),) for b in (1, 2, 4, 8, 16, 32, 48, 64)]
                 + [((b, c),) for c in (512, 2048) for b in (1, 4, 16, 64)]
                 + [((1, 2048), (n, 32)) for n in (3, 15, 63)] + [((1, 512), (15, 32))])
"""The timed decode steps' batches, as (sequences, context tokens) groups: equal contexts, and one long
context among short ones."""
PREFILL_POINTS = [(n, 0) for n in (16, 32, 64, 128, 256, 512, 1024, 2048)] + [(n, 1024) for n in (16, 128, 512)]
"""(chunk tokens, cached tokens before the chunk) of the timed prefill steps."""
MIXED_POINTS = [(16, 512, 256), (4, 2048, 480)]
"""(decodes, their context, prefill chunk): steps held out of the fit, to check how the terms combine."""
COST_KNOTS = [8.0, 16.0, 64.0, 256.0]
MEASURE_BUDGET = 2048
"""The measuring engine's token budget, so that one step can hold the largest chunk timed (the step's cost
does not depend on the budget; the simulated replicas use the engine's default)."""


class StepTimer:
    """Drives an engine core step by step (as `effinfer serve`'s engine process does) and times steps of a
    chosen shape. Prompts are random token ids, so nothing is shared unless a test shares it on purpose."""

    def __init__(self, llm, seed: int = 0):
        self.engine = llm.engine
        self.engine.text_elsewhere()
        self.rng = np.random.default_rng(seed)
        self.ids = itertools.count()

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(100, 40_000, n).tolist()

    def add(self, prompt_ids: list[int], max_tokens: int) -> str:
        from effinfer import SamplingParams

        request_id = f"measure-{next(self.ids)}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(prompt_ids, params, request_id)
        return request_id

    def step(self) -> tuple[float, list]:
        start = time.perf_counter()
        outputs = self.engine.core_step()
        return time.perf_counter() - start, outputs

    def start_decoding(self, request_ids: list[str]) -> None:
        """Step until every request has its first token (its prompt is in the cache)."""
        pending = set(request_ids)
        while pending:
            _, outputs = self.step()
            pending -= {o.request_id for o in outputs if o.new_token_ids}

    def drain(self) -> None:
        while self.engine.has_unfinished():
            self.step()

    def decode(self, groups: tuple[tuple[int, int], ...], steps: int = 8) -> tuple[StepShape, float]:
        """Median time of `steps` decode steps of a batch of (sequences, context tokens) groups (the sequences of
        a group share all but their last 16 prompt tokens: long contexts without long prefills)."""
        ids = []
        for count, context in groups:
            shared = self.tokens(max(context - 16, 0))
            ids += [self.add(shared + self.tokens(min(context, 16)), 10_000) for _ in range(count)]
        self.start_decoding(ids)
        times = [self.step()[0] for _ in range(steps)]
        for request_id in ids:
            self.engine.abort(request_id)
        grown = 1 + steps // 2                         # contexts at the middle of the timed steps
        kv = sum(count * (context + grown) for count, context in groups)
        longest = max(context for _, context in groups) + grown
        return StepShape(len(ids), len(ids), kv, longest), statistics.median(times)

    def prefill(self, chunk: int, cached: int, repeats: int = 3) -> tuple[StepShape, float]:
        """Median time of a step that prefills `chunk` new tokens after `cached` tokens from the prefix cache."""
        times = []
        for _ in range(repeats):
            prefix = self.tokens(cached)
            if cached:
                self.add(prefix + self.tokens(1), 1)
                self.drain()
            self.add(prefix + self.tokens(chunk), 1)
            times.append(self.step()[0])
            self.drain()
        return StepShape(chunk, prefill_prior=cached, prefill_pairs=chunk * cached), statistics.median(times)

    def mixed(self, batch: int, context: int, chunk: int, repeats: int = 3) -> tuple[StepShape, float]:
        shared = self.tokens(context - 16)
        ids = [self.add(shared + self.tokens(16), 10_000) for _ in range(batch)]
        self.start_decoding(ids)
        times = []
        for _ in range(repeats):
            self.add(self.tokens(chunk), 1)
            times.append(self.step()[0])
        for request_id in ids:
            self.engine.abort(request_id)
        self.drain()
        return StepShape(batch + chunk, batch, batch * (context + 2), context + 2), statistics.median(times)


def measure_step_costs(rounds: int, threads: int | None = None, show_progress: bool = True) -> dict:
    """Time every point `rounds` times (whole sweeps, one after another) and keep each point's fastest round:
    the machine is shared, and another process's burst only ever makes a step slower."""
    import torch

    from effinfer import LLM

    load_before = os.getloadavg()
    llm = LLM(max_num_batched_tokens=MEASURE_BUDGET, num_threads=threads, show_progress=False)
    timer = StepTimer(llm)
    timer.decode(((4, 32),), 3)  # warm-up: first calls of each kernel
    timer.prefill(64, 0, 1)
    jobs = ([("decode", p, lambda p=p: timer.decode(p)) for p in DECODE_POINTS]
            + [("prefill", p, lambda p=p: timer.prefill(*p)) for p in PREFILL_POINTS]
            + [("mixed", p, lambda p=p: timer.mixed(*p)) for p in MIXED_POINTS])
    measured: dict[tuple, list] = {(kind, point): [] for kind, point, _ in jobs}
    with _progress(show_progress) as progress:
        task = progress.add_task("timing engine steps", total=rounds * len(jobs))
        for _ in range(rounds):
            for kind, point, job in jobs:
                measured[(kind, point)].append(job())
                progress.advance(task)
    return _cost_record(llm, measured, load_before, torch.get_num_threads())


def _cost_record(llm, measured: dict, load_before: tuple, threads: int) -> dict:
    from effinfer.config import CacheConfig, SchedulerConfig

    points = []
    for (kind, point), runs in measured.items():
        shape = runs[0][0]
        points.append({"kind": kind, "point": list(point), "shape": asdict(shape),
                       "seconds": min(t for _, t in runs), "rounds_s": [t for _, t in runs]})
    fitted = [(StepShape(**p["shape"]), p["seconds"]) for p in points if p["kind"] != "mixed"]
    held_out = [(StepShape(**p["shape"]), p["seconds"]) for p in points if p["kind"] == "mixed"]
    model = fit_cost_model(fitted, COST_KNOTS)
    errors = fit_errors(model, fitted)
    scheduler, cache = SchedulerConfig(), CacheConfig()
    replica = ReplicaConfig(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, cache.block_size,
                            llm.engine.block_manager.num_blocks, cache.enable_prefix_caching)
    return {"model": model.to_dict(), "replica": asdict(replica), "points": points, "threads": threads,
            "fit": {"max_abs_rel_error": max(abs(e) for e in errors),
                    "rms_rel_error": float(np.sqrt(np.mean(np.square(errors)))), "rel_errors": errors},
            "held_out": [{"shape": asdict(s), "measured_s": t, "predicted_s": model.step_time(**asdict(s)),
                          "rel_error": model.step_time(**asdict(s)) / t - 1} for s, t in held_out],
            "engine": llm.engine.summary, "resolved_config": llm.config.to_dict(),
            "measuring_budget": MEASURE_BUDGET, "load_average": {"before": load_before, "after": os.getloadavg()}}


# ---- requests and the trace -----------------------------------------------------------------------------

class SimRequest:
    """One request's lengths, its block keys, and what happened to it.

    Block keys stand in for the engine's chained block hashes: block i of a request is `shared_base + i` while
    it lies wholly inside the prefix shared by everyone with the same system prompt, and `own_base + i` after
    that (the conversation's own tokens, shared by its later turns, whose prompts extend this one's)."""

    __slots__ = ("request_id", "session", "turn", "prompt_len", "output_len", "shared_blocks", "shared_base",
                 "own_base", "think_s", "arrival", "replica", "routed_at", "computed", "generated",
                 "first_token", "finish", "hit_tokens", "held_keys", "anonymous_blocks", "registered_blocks")

    def __init__(self, request_id: int, session: int, turn: int, prompt_len: int, output_len: int,
                 shared_len: int = 0, system_prompt: int = -1, block_size: int = 16, think_s: float = 0.0):
        self.request_id, self.session, self.turn = request_id, session, turn
        self.prompt_len, self.output_len = prompt_len, max(1, output_len)
        self.shared_blocks = shared_len // block_size if system_prompt >= 0 else 0
        self.shared_base = (system_prompt + 1) << 40
        self.own_base = -((session + 1) << 40)
        self.think_s = think_s
        self.arrival = self.routed_at = self.first_token = self.finish = math.nan
        self.replica = -1
        self.computed = self.generated = self.hit_tokens = 0
        self.held_keys: list[int] = []
        self.anonymous_blocks = self.registered_blocks = 0

    def key(self, i: int) -> int:
        return self.shared_base + i if i < self.shared_blocks else self.own_base + i


@dataclass
class TraceSettings:
    num_system_prompts: int = 64
    """K: shared system prompts, one per session."""
    zipf: float = 1.0
    """Popularity of the k-th system prompt proportional to 1 / k**zipf."""
    system_len: tuple[int, int] = (200, 800)
    """System prompt lengths, uniform in this range (tokens)."""
    max_turns: int = 8
    """Exchanges kept per conversation (the first ones)."""
    max_total_len: int = 4096
    """A conversation ends before the first turn whose prompt and answer exceed this (tokens)."""
    think_time_s: float = 20.0
    """Mean of the exponential pause between an answer and the session's next turn."""


def conversation_exchanges(conversation: dict) -> list[tuple[str, str]]:
    """(user text, assistant text) pairs from the first human turn on, up to the first break in alternation."""
    turns = conversation.get("conversations") or []
    start = next((i for i, t in enumerate(turns) if t.get("from") == "human"), len(turns))
    pairs = []
    for i in range(start, len(turns) - 1, 2):
        if turns[i].get("from") != "human" or turns[i + 1].get("from") != "gpt":
            break
        pairs.append((turns[i].get("value") or "", turns[i + 1].get("value") or ""))
    return pairs


def load_conversations(tokenizer, max_turns: int, max_chars: int = 40_000, show_progress: bool = True
                       ) -> list[list[tuple[int, int]]]:
    """Token counts (user, assistant) of the exchanges of ShareGPT's development conversations (texts cut at
    `max_chars`: longer turns end their conversation anyway)."""
    from effinfer.bench.workloads import SHAREGPT_DEVELOPMENT, load_sharegpt

    exchanges = [conversation_exchanges(c)[:max_turns] for c in load_sharegpt()[:SHAREGPT_DEVELOPMENT]]
    texts = [text[:max_chars] for pairs in exchanges for pair in pairs for text in pair]
    counts = []
    with _progress(show_progress) as progress:
        task = progress.add_task("tokenizing ShareGPT turns", total=len(texts))
        for start in range(0, len(texts), 4096):
            batch = tokenizer.backend.encode_batch(texts[start:start + 4096], add_special_tokens=False)
            counts.extend(len(e.ids) for e in batch)
            progress.advance(task, len(batch))
    lengths, it = [], iter(counts)
    for pairs in exchanges:
        lengths.append([(next(it), next(it)) for _ in pairs])
    return [c for c in lengths if c]


def session_requests(exchanges: list[tuple[int, int]], session: int, system_prompt: int, system_len: int,
                     settings: TraceSettings, first_id: int, block_size: int, think: np.ndarray) -> list[SimRequest]:
    """A conversation's turns as requests: turn t's prompt is the system prompt, every earlier exchange and the
    new user message (with the template's tokens); its output is the recorded answer."""
    shared = system_len + SYSTEM_OVERHEAD
    context, requests = shared, []
    for turn, (user, answer) in enumerate(exchanges[:settings.max_turns]):
        prompt = context + user + USER_OVERHEAD
        if prompt + max(answer, 1) > settings.max_total_len:
            break
        requests.append(SimRequest(first_id + turn, session, turn, prompt, answer, shared, system_prompt,
                                   block_size, float(think[turn])))
        context = prompt + max(answer, 1) + ASSISTANT_OVERHEAD
    return requests


def build_trace(conversations: list[list[tuple[int, int]]], num_requests: int, settings: TraceSettings,
                block_size: int, seed: int) -> list[list[SimRequest]]:
    """Sessions until `num_requests` turns: conversations drawn without replacement while the pool lasts, with
    replacement beyond it, each given a system prompt by Zipf popularity."""
    rng = np.random.default_rng(seed)
    system_lens = rng.integers(settings.system_len[0], settings.system_len[1] + 1, settings.num_system_prompts)
    popularity = 1.0 / np.arange(1, settings.num_system_prompts + 1) ** settings.zipf
    popularity /= popularity.sum()
    order = rng.permutation(len(conversations))
    sessions, total = [], 0
    for session in itertools.count():
        index = order[session] if session < len(order) else rng.integers(len(conversations))
        system = int(rng.choice(settings.num_system_prompts, p=popularity))
        think = rng.exponential(settings.think_time_s, settings.max_turns)
        requests = session_requests(conversations[index], session, system, int(system_lens[system]), settings,
                                    total, block_size, think)
        if requests:
            sessions.append(requests)
            total += len(requests)
        if total >= num_requests:
            return sessions
    raise AssertionError("unreachable")


# ---- clients: where requests come from ------------------------------------------------------------------

class SessionClients:
    """Open loop: sessions start as a Poisson process (`session_rate` per second); a session's next turn is
    sent its think time after the previous answer."""

    def __init__(self, sessions: list[list[SimRequest]], session_rate: float, seed: int = 0):
        gaps = np.random.default_rng(seed + 1).exponential(1.0 / session_rate, len(sessions))
        self.starts = np.cumsum(gaps) - gaps[0]
        self.sessions = sessions
        self.next_turn = {s[0].session: s[1:] for s in sessions}

    def initial(self) -> list[tuple[float, SimRequest]]:
        return [(float(t), s[0]) for t, s in zip(self.starts, self.sessions)]

    def on_arrival(self, request: SimRequest, now: float) -> bool:
        return True

    def on_finish(self, request: SimRequest, now: float) -> list[tuple[float, SimRequest]]:
        rest = self.next_turn[request.session]
        if not rest:
            return []
        nxt = rest.pop(0)
        return [(now + request.think_s, nxt)]


class ListClients:
    """A fixed list sent at given times through at most `max_concurrency` connections, waiting ones first come
    first served: what `effinfer bench serve` does (an infinite rate sends everything at once)."""

    def __init__(self, requests: list[SimRequest], send_times: list[float], max_concurrency: int | None):
        self.requests, self.send_times = requests, send_times
        self.max_concurrency = max_concurrency or len(requests)
        self.in_flight, self.held, self.passed = 0, deque(), set()

    def initial(self) -> list[tuple[float, SimRequest]]:
        return list(zip(self.send_times, self.requests))

    def on_arrival(self, request: SimRequest, now: float) -> bool:
        if request.request_id in self.passed:     # its slot was taken for it when one freed
            self.passed.remove(request.request_id)
            return True
        if self.in_flight < self.max_concurrency:
            self.in_flight += 1
            return True
        self.held.append(request)
        return False

    def on_finish(self, request: SimRequest, now: float) -> list[tuple[float, SimRequest]]:
        if not self.held:
            self.in_flight -= 1
            return []
        nxt = self.held.popleft()
        self.passed.add(nxt.request_id)
        return [(now, nxt)]


# ---- a replica: prefix cache and scheduler --------------------------------------------------------------

@dataclass
class ReplicaConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int = 2912
    enable_prefix_caching: bool = True


class BlockPool:
    """A replica's KV blocks as the engine's BlockManager keeps them, by block key instead of token hash.

    Physical blocks are free, held by one request (`anonymous_blocks`: not yet, or never, a full cached block),
    or cached under a key with a reference count (`in_use`). A freed keyed block joins `free_cached`, the
    eviction order: least recently freed first, and a request's blocks are freed tail first, so a prefix loses
    its last blocks before its first. Free blocks that hold nothing cached are reused before cached ones (the
    engine reuses strictly in freeing order; the difference is at most a few partial blocks)."""

    def __init__(self, config: ReplicaConfig):
        self.block_size, self.num_blocks = config.block_size, config.num_blocks
        self.enabled = config.enable_prefix_caching
        self.num_free = config.num_blocks
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.in_use: dict[int, int] = {}

    def cached_prefix_blocks(self, request: SimRequest) -> int:
        """Leading blocks of the prompt found cached, leaving at least one prompt token to compute."""
        if not self.enabled:
            return 0
        limit, n = (request.prompt_len - 1) // self.block_size, 0
        while n < limit:
            key = request.key(n)
            if key not in self.in_use and key not in self.free_cached:
                break
            n += 1
        return n

    def admit(self, request: SimRequest, hits: int) -> bool:
        """Take the cached blocks and new blocks for the whole sequence, or change nothing and say False."""
        total = -(-(request.prompt_len + request.output_len) // self.block_size)
        keys = [request.key(i) for i in range(hits)]
        revived = sum(1 for k in keys if k in self.free_cached)
        if total - hits > self.num_free - revived:
            return False
        for key in keys:
            if key in self.free_cached:
                del self.free_cached[key]
                self.num_free -= 1
                self.in_use[key] = 1
            else:
                self.in_use[key] += 1
        self.num_free -= total - hits
        while len(self.free_cached) > self.num_free:       # no empty block left: evict the least recent
            self.free_cached.popitem(last=False)
        request.held_keys, request.anonymous_blocks, request.registered_blocks = keys, total - hits, hits
        return True

    def register(self, request: SimRequest, num_tokens: int) -> None:
        """Cache the blocks that `num_tokens` fill completely (a key already cached elsewhere stays there)."""
        if not self.enabled:
            return
        for i in range(request.registered_blocks, num_tokens // self.block_size):
            key = request.key(i)
            if key not in self.in_use and key not in self.free_cached and request.anonymous_blocks:
                self.in_use[key] = 1
                request.held_keys.append(key)
                request.anonymous_blocks -= 1
        request.registered_blocks = max(request.registered_blocks, num_tokens // self.block_size)

    def release(self, request: SimRequest) -> None:
        for key in reversed(request.held_keys):
            count = self.in_use[key] - 1
            if count:
                self.in_use[key] = count
            else:
                del self.in_use[key]
                self.free_cached[key] = None
                self.num_free += 1
        self.num_free += request.anonymous_blocks
        request.held_keys, request.anonymous_blocks = [], 0


@dataclass
class Plan:
    """The step(s) a replica runs from `start`: `steps` steps of the same batch (more than one only when it
    only decodes), each `base` seconds plus `growth` per step already taken (contexts grow)."""

    start: float
    steps: int
    base: float
    growth: float
    chunks: list
    """(request, prefill tokens) of the first step."""
    decodes: list

    def end(self, steps: int | None = None) -> float:
        k = self.steps if steps is None else steps
        return self.start + k * self.base + self.growth * k * (k - 1) / 2

    def steps_done_by(self, now: float) -> int:
        """Steps whose end is at or before `now`."""
        elapsed = now - self.start
        if self.growth <= 0:
            k = int(elapsed // self.base)
        else:
            a, b = self.growth / 2, self.base - self.growth / 2
            k = int((-b + math.sqrt(b * b + 4 * a * elapsed)) / (2 * a))
        while k > 0 and self.end(k) > now:
            k -= 1
        while self.end(k + 1) <= now:
            k += 1
        return k


class Replica:
    """The engine's scheduler in miniature (effinfer/engine/scheduler.py): running requests first, in arrival
    order (a decode takes one token of the budget, a prompt in progress its next chunk), then waiting ones
    join first come first served while the budget, `max_num_seqs` and the block pool allow."""

    def __init__(self, index: int, config: ReplicaConfig, costs: StepCostModel, fast_forward: bool = True):
        self.index, self.config, self.costs, self.fast_forward = index, config, costs, fast_forward
        self.pool = BlockPool(config)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.plan: Plan | None = None
        self.version = 0
        """Bumped whenever the pending end-of-plan event is replaced."""
        self.num_steps = self.num_plans = 0

    def add(self, request: SimRequest, now: float) -> float | None:
        """Queue a request; returns the end time of a new or shortened plan (the caller schedules it)."""
        self.waiting.append(request)
        if self.plan is None:
            return self._start_plan(now)
        if self.plan.steps == 1:
            return None                           # it joins at the end of the step under way
        done = self.plan.steps_done_by(now)
        if done + 1 >= self.plan.steps:
            return None
        self.plan.steps = done + 1                # cut the run of decodes after the step in progress
        self.version += 1
        return self.plan.end()

    def end_plan(self, now: float) -> tuple[list[SimRequest], int, float | None]:
        """Apply the finished plan: -> (requests finished, output tokens produced, end of the next plan)."""
        plan, finished, produced = self.plan, [], 0
        self.num_steps += plan.steps
        self.num_plans += 1
        for request in plan.decodes:
            request.generated += plan.steps
            produced += plan.steps
            if request.generated >= request.output_len:
                finished.append(request)
        for request, n in plan.chunks:
            request.computed += n
            if request.computed == request.prompt_len:
                request.generated, request.first_token = 1, now
                produced += 1
                if request.output_len == 1:
                    finished.append(request)
        for request in finished:
            self._finish(request, now)
        return finished, produced, self._start_plan(now)

    def _finish(self, request: SimRequest, now: float) -> None:
        request.finish = now
        self.running.remove(request)
        self.pool.register(request, request.prompt_len + request.output_len)
        self.pool.release(request)

    def _start_plan(self, now: float) -> float | None:
        self.plan = self._schedule(now)
        if self.plan is None:
            return None
        self.version += 1
        return self.plan.end()

    def _schedule(self, now: float) -> Plan | None:
        budget, chunks, decodes, decode_kv, longest = self.config.max_num_batched_tokens, [], [], 0, 0
        for request in self.running:
            if budget <= 0:
                break
            pending = request.prompt_len - request.computed
            if pending > 0:
                chunks.append((request, min(pending, budget)))
                budget -= chunks[-1][1]
            else:
                decodes.append(request)
                context = request.prompt_len + request.generated
                decode_kv += context
                longest = max(longest, context)
                budget -= 1
        self._admit(budget, chunks)
        if not chunks and not decodes:
            return None
        return self._plan(now, chunks, decodes, decode_kv, longest)

    def _admit(self, budget: int, chunks: list) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self.pool.cached_prefix_blocks(request)
            if not self.pool.admit(request, hits):
                break
            self.waiting.popleft()
            self.running.append(request)
            request.computed = request.hit_tokens = hits * self.config.block_size
            chunks.append((request, min(request.prompt_len - request.computed, budget)))
            budget -= chunks[-1][1]

    def _plan(self, now: float, chunks: list, decodes: list, decode_kv: int, longest: int) -> Plan:
        prior = sum(r.computed for r, _ in chunks)
        pairs = sum(r.computed * n for r, n in chunks)
        for request, n in chunks:
            self.pool.register(request, request.computed + n)
        tokens = len(decodes) + sum(n for _, n in chunks)
        base = max(self.costs.step_time(tokens, len(decodes), decode_kv, longest, prior, pairs), MIN_STEP_S)
        steps = 1
        if not chunks and self.fast_forward:      # only decodes, and nobody can join before a finish
            steps = min(r.output_len - r.generated for r in decodes)
        return Plan(now, steps, base, self.costs.decode_growth(len(decodes)), chunks, decodes)


# ---- the router -----------------------------------------------------------------------------------------

@dataclass
class RouterSettings:
    imbalance_bound: int = 4
    """prefix-aware: leave the preferred replica for the least-loaded one when it has more than this many
    outstanding requests above the least-loaded one's."""
    route_blocks: int = 64
    """prefix-aware: the prompt's first blocks the router hashes and remembers."""
    owners_per_block: int = 4
    """prefix-aware: replicas remembered per block (the most recent ones)."""
    max_entries: int = 1_000_000
    """prefix-aware: blocks remembered in all (least recently used forgotten first)."""
    new_prefix: str = "home"
    """prefix-aware, a prompt whose first block was never routed: "home" (a replica chosen by hashing that block,
    as `effinfer serve --routing prefix` does, so new prefixes spread evenly) or "least-loaded"."""
    block_size: int = 16


class Router:
    """Picks a replica per request and counts each replica's outstanding requests and prompt tokens.

    - round-robin: replicas in turn.
    - least-loaded: fewest outstanding requests, then fewest outstanding prompt tokens.
    - prefix-aware: the router remembers, for each of the first `route_blocks` prompt blocks it has routed,
      the replicas it sent them to. A request goes to the least-loaded of the replicas that got its longest
      remembered prefix (a prefix never seen goes to its home replica, chosen by hashing its first block), unless
      that one has more than `imbalance_bound` outstanding requests above the least-loaded replica's: then to
      the least-loaded replica. (effinfer's own router, effinfer/serving/replicas.py, and SGLang's cache-aware
      router work this way.)

    Example (bound 4): replica 0 got a prompt with blocks a, b, c; a new prompt a, b, d goes to replica 0 while
    its outstanding requests are at most 4 above the least-loaded replica's."""

    def __init__(self, policy: str, num_replicas: int, settings: RouterSettings | None = None,
                 log_decisions: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.policy, self.num_replicas = policy, num_replicas
        self.settings = settings or RouterSettings()
        self.outstanding = np.zeros(num_replicas, dtype=np.int64)
        self.load_key = np.zeros(num_replicas, dtype=np.int64)
        """outstanding requests * 2**32 + outstanding prompt tokens: one argmin orders by both."""
        self.owners: OrderedDict[int, list[int]] = OrderedDict()
        self.next_replica = 0
        self.decisions: list[tuple[int, int]] | None = [] if log_decisions else None
        """(chosen replica's outstanding requests, the fewest any replica had), when logged."""

    def route(self, request: SimRequest) -> int:
        if self.policy == "round-robin":
            choice = self.next_replica
            self.next_replica = (choice + 1) % self.num_replicas
        elif self.policy == "least-loaded":
            choice = int(np.argmin(self.load_key))
        else:
            choice = self._prefix_aware(request)
        if self.decisions is not None:
            self.decisions.append((int(self.outstanding[choice]), int(self.outstanding.min())))
        self.outstanding[choice] += 1
        self.load_key[choice] += (1 << 32) + request.prompt_len
        return choice

    def done(self, replica: int, request: SimRequest) -> None:
        self.outstanding[replica] -= 1
        self.load_key[replica] -= (1 << 32) + request.prompt_len

    def _prefix_aware(self, request: SimRequest) -> int:
        least = int(np.argmin(self.load_key))
        num_blocks = min(self.settings.route_blocks, request.prompt_len // self.settings.block_size)
        keys = [request.key(i) for i in range(num_blocks)]
        candidates = None
        for key in keys:
            owners = self.owners.get(key)
            if owners is None:
                break
            candidates = owners
        if candidates:
            preferred = min(candidates, key=lambda r: self.load_key[r])
        elif keys and self.settings.new_prefix == "home":
            preferred = _mix(keys[0]) % self.num_replicas
        else:
            preferred = least
        bound = self.settings.imbalance_bound
        choice = preferred if self.outstanding[preferred] - self.outstanding[least] <= bound else least
        self._remember(keys, choice)
        return choice

    def _remember(self, keys: list[int], replica: int) -> None:
        owners_map, limit = self.owners, self.settings.owners_per_block
        for key in keys:
            owners = owners_map.pop(key, None) or []
            if replica in owners:
                owners.remove(replica)
            owners.append(replica)
            owners_map[key] = owners[-limit:]
        while len(owners_map) > self.settings.max_entries:
            owners_map.popitem(last=False)


def _mix(key: int) -> int:
    """A well-spread non-negative hash of a block key (splitmix64's finaliser): keys differ in high bits only."""
    x = key & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def prompt_block_hashes(token_ids: list[int], block_size: int, max_blocks: int) -> list[int]:
    """The chained block hashes a real router computes from a prompt's tokens (as the engine's BlockManager
    does); the simulation's block keys stand in for them, and router costs include this work."""
    hashes, parent = [], None
    for i in range(min(max_blocks, len(token_ids) // block_size)):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes


def measure_route_cost(policy: str, num_replicas: int, requests: list[SimRequest], settings: RouterSettings,
                       repeats: int = 3) -> float:
    """Seconds per routing decision: `Router.route` timed on these requests against random replica loads
    (plus, for prefix-aware routing, hashing each prompt's first blocks), the fastest of `repeats` passes."""
    rng = np.random.default_rng(0)
    size = settings.block_size
    token_lists = [rng.integers(0, 49_152, min(r.prompt_len, settings.route_blocks * size)).tolist() for r in requests]
    best = math.inf
    for _ in range(repeats):
        router = Router(policy, num_replicas, settings)
        router.outstanding[:] = rng.integers(0, 8, num_replicas)
        router.load_key[:] = router.outstanding * (1 << 32)
        start = time.perf_counter()
        for request, tokens in zip(requests, token_lists):
            if policy == "prefix-aware":
                prompt_block_hashes(tokens, size, settings.route_blocks)
            router.route(request)
        best = min(best, (time.perf_counter() - start) / len(requests))
    return best


# ---- the event loop -------------------------------------------------------------------------------------

ARRIVE, ROUTED, PLAN_END = 0, 1, 2
MIN_STEP_S = 1e-5
"""A floor under a fitted step time (a fit's extrapolation must not stop the clock)."""


@dataclass
class RunResult:
    requests: list[SimRequest]
    replicas: list[Replica]
    router: Router
    router_service_s: float
    window_tokens: int
    """Output tokens produced inside the window."""
    window_busy_s: float
    """Replica time spent on steps that ended inside the window, all replicas together."""
    end_time: float


def simulate(clients, num_replicas: int, policy: str, config: ReplicaConfig, costs: StepCostModel,
             router_cost_s: float = 0.0, router_settings: RouterSettings | None = None,
             window: tuple[float, float] = (0.0, math.inf), fast_forward: bool = True,
             log_decisions: bool = False) -> RunResult:
    """Run every request to its end. The router serves requests one at a time, `router_cost_s` each, first
    come first served; output tokens and replica time inside `window` (seconds) are counted for throughput and
    utilisation."""
    replicas = [Replica(i, config, costs, fast_forward) for i in range(num_replicas)]
    router = Router(policy, num_replicas, router_settings, log_decisions)
    heap, order, sent = [], itertools.count(), []
    for t, request in clients.initial():
        heappush(heap, (t, next(order), ARRIVE, request))
    router_queue, router_busy, window_tokens, window_busy, now = deque(), False, 0, 0.0, 0.0

    def start_routing(request: SimRequest, now: float) -> None:
        request.replica = router.route(request)
        heappush(heap, (now + router_cost_s, next(order), ROUTED, request))

    while heap:
        now, _, kind, item = heappop(heap)
        if kind == PLAN_END:
            replica, version = item
            if version != replica.version:
                continue                                   # replaced by a shortened plan
            started = replica.plan.start
            finished, produced, end = replica.end_plan(now)
            if window[0] <= now < window[1]:
                window_tokens += produced
                window_busy += now - started
            if end is not None:
                heappush(heap, (end, next(order), PLAN_END, (replica, replica.version)))
            for request in finished:
                router.done(replica.index, request)
                for t, nxt in clients.on_finish(request, now):
                    heappush(heap, (t, next(order), ARRIVE, nxt))
        elif kind == ARRIVE:
            if not clients.on_arrival(item, now):
                continue
            item.arrival = now
            sent.append(item)
            if router_busy:
                router_queue.append(item)
            else:
                router_busy = True
                start_routing(item, now)
        else:                                              # ROUTED: the router hands it to its replica
            item.routed_at = now
            replica = replicas[item.replica]
            end = replica.add(item, now)
            if end is not None:
                heappush(heap, (end, next(order), PLAN_END, (replica, replica.version)))
            if router_queue:
                start_routing(router_queue.popleft(), now)
            else:
                router_busy = False
    return RunResult(sent, replicas, router, router_cost_s, window_tokens, window_busy, now)


# ---- metrics --------------------------------------------------------------------------------------------

def summarize(result: RunResult, window: tuple[float, float]) -> dict:
    """Metrics over the requests sent inside `window`: prefix-cache hit rate (prompt tokens served from the
    cache), TTFT and TPOT; and over the window's time: output tokens/s, the share of replica time spent
    stepping, the router's utilisation (requests routed x its service time / time); how evenly requests spread."""
    inside = [r for r in result.requests if window[0] <= r.arrival < window[1]] or result.requests
    ttft = np.array([r.first_token - r.arrival for r in inside]) * 1000
    tpot = [(r.finish - r.first_token) / (r.output_len - 1) * 1000 for r in inside if r.output_len > 1]
    waits = np.array([r.routed_at - r.arrival for r in inside]) * 1000
    span = min(window[1], result.end_time) - window[0]
    num_replicas = len(result.replicas)
    per_replica = np.bincount([r.replica for r in inside], minlength=num_replicas)
    return {"requests": len(inside), "requests_simulated": len(result.requests),
            "hit_rate": sum(r.hit_tokens for r in inside) / sum(r.prompt_len for r in inside),
            "mean_ttft_ms": float(ttft.mean()), "p50_ttft_ms": float(np.percentile(ttft, 50)),
            "p99_ttft_ms": float(np.percentile(ttft, 99)), "mean_tpot_ms": statistics.mean(tpot) if tpot else None,
            "output_tok_s": result.window_tokens / span, "output_tok_s_per_replica": result.window_tokens / span / num_replicas,
            "mean_router_wait_ms": float(waits.mean()), "router_utilisation": len(inside) * result.router_service_s / span,
            "replica_busy_fraction": result.window_busy_s / span / num_replicas,
            "requests_per_replica_cv": float(per_replica.std() / per_replica.mean()),
            "mean_prompt_tokens": float(np.mean([r.prompt_len for r in inside])),
            "mean_output_tokens": float(np.mean([r.output_len for r in inside]))}


# ---- the routing study ----------------------------------------------------------------------------------

@dataclass
class StudySettings:
    replica_counts: tuple[int, ...] = REPLICA_COUNTS
    policies: tuple[str, ...] = POLICIES
    rate_per_replica: float = 0.3
    """Requests per second per replica (sessions start at this rate / mean turns per session)."""
    duration_s: float = 400.0
    """Sessions start over this long (each then runs to its last turn)."""
    warmup_s: float = 150.0
    """Requests sent before this are simulated but not counted: caches fill and sessions reach later turns."""
    min_requests: int = 2000
    """Fewer replicas get a longer span of session starts, so that every run has at least this many requests."""
    router_overhead_us: float = 0.0
    """Added to the measured routing cost per request (e.g. a proxy's forwarding work)."""
    seed: int = 0


def run_study(conversations, costs: StepCostModel, config: ReplicaConfig, trace: TraceSettings,
              study: StudySettings, router_settings: RouterSettings, show_progress: bool = True) -> list[dict]:
    """Every policy at every replica count, each replica count on one trace (the policies compared on the
    same requests at the same times)."""
    rows = []
    with _progress(show_progress) as progress:
        task = progress.add_task("simulating", total=len(study.replica_counts) * len(study.policies))
        for num_replicas in study.replica_counts:
            span = max(study.duration_s, study.min_requests / (num_replicas * study.rate_per_replica))
            num_requests = math.ceil(num_replicas * study.rate_per_replica * span)
            for policy in study.policies:
                progress.update(task, description=f"simulating {policy}, {num_replicas} replicas")
                sessions = build_trace(conversations, num_requests, trace, config.block_size, study.seed)
                rows.append(run_one(sessions, num_replicas, policy, costs, config, study, router_settings))
                progress.advance(task)
    return rows


def run_one(sessions, num_replicas: int, policy: str, costs: StepCostModel, config: ReplicaConfig,
            study: StudySettings, router_settings: RouterSettings) -> dict:
    turns = sum(len(s) for s in sessions) / len(sessions)
    clients = SessionClients(sessions, num_replicas * study.rate_per_replica / turns, study.seed)
    route_s = measure_route_cost(policy, num_replicas, [s[0] for s in sessions[:2000]], router_settings)
    router_s = route_s + study.router_overhead_us * 1e-6
    window = (study.warmup_s, float(clients.starts[-1]))
    started = time.perf_counter()
    result = simulate(clients, num_replicas, policy, config, costs, router_s, router_settings, window)
    return {"policy": policy, "replicas": num_replicas, "offered_rate": num_replicas * study.rate_per_replica,
            "sessions": len(sessions), "window_s": list(window),
            "route_cost_us": route_s * 1e6, "router_service_us": router_s * 1e6,
            **summarize(result, window), "simulated_s": result.end_time, "wall_s": time.perf_counter() - started}


def router_saturation(rows: list[dict], rate_per_replica: float) -> dict:
    """Per policy: routing cost fitted as a + b * replicas (microseconds) over the simulated counts, and the
    replica count where the offered rate times that cost reaches 1 (a single router saturates there)."""
    out = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        points = [(r["replicas"], r["router_service_us"]) for r in rows if r["policy"] == policy]
        a, b = _line_fit(points)
        out[policy] = {"cost_us_intercept": a, "cost_us_per_replica": b,
                       "saturation_replicas": saturation_replicas(a * 1e-6, b * 1e-6, rate_per_replica),
                       "max_rate_at_largest": 1e6 / (a + b * max(p[0] for p in points))}
    return out


def _line_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    xs, ys = np.array(points, dtype=float).T
    if len(points) < 2 or np.ptp(xs) == 0:
        return float(ys.mean()), 0.0
    b, a = np.polyfit(xs, ys, 1)
    if b < 0:                                   # a cost that falls with replicas is noise: keep it flat
        return float(ys.mean()), 0.0
    return float(a), float(b)


def saturation_replicas(a: float, b: float, rate_per_replica: float) -> float:
    """The replica count R where rate_per_replica * R * (a + b * R) = 1 (a, b in seconds)."""
    if b <= 0:
        return 1.0 / (rate_per_replica * a) if a > 0 else math.inf
    return (-a + math.sqrt(a * a + 4 * b / rate_per_replica)) / (2 * b)


# ---- validation against measured records ---------------------------------------------------------------

def validate(record: dict, name: str, costs: StepCostModel, config: ReplicaConfig, num_replicas: int = 1,
             policy: str = "least-loaded", tokenizer=None) -> list[dict]:
    """Replay a measured record's workload (the same lengths, the same arrivals and concurrency) on
    `num_replicas` simulated replicas and compare: one row per configuration the record measured, with
    simulated / measured - 1 for each metric. Accepts `effinfer bench serve` records (any replica count behind
    the endpoint), `serve_default.py`, `prefix_cache.py` and `replicas.py` records (the last name their own
    replica counts and routing)."""
    kind = record.get("benchmark")
    if kind == "serve":
        return [_validate_serve(record, name, costs, config, num_replicas, policy, tokenizer)]
    if kind == "serve_default":
        return _validate_serve_default(record, name, costs, config, num_replicas, policy, tokenizer)
    if kind == "prefix_cache":
        return _validate_prefix_cache(record, name, costs, config)
    if kind == "replicas":
        return _validate_replicas(record, name, costs, config, tokenizer)
    raise ValueError(f"{name}: cannot replay a {kind!r} record; it takes serve, serve_default, prefix_cache and "
                     "replicas records")


def serve_workload(workload: str, num: int, input_len, output_len, seed: int, tokenizer,
                   total_input: int | None = None) -> tuple[list[tuple[int, int]], int]:
    """((prompt, output) lengths, tokens of the prefix they all share) of a `bench serve` run: its ShareGPT
    sample drawn again (same seed, same loader), or the random workloads' lengths (`bench serve`'s defaults
    where the record has none); the record's prompt-token total, where given, corrects the mean prompt length
    (the server counts the tokens of the prompt text it was sent)."""
    from effinfer.bench.workloads import WORKLOADS, sharegpt_requests

    shared = 0
    if workload == "sharegpt":
        lengths = [(r.prompt_len, r.output_len) for r in sharegpt_requests(tokenizer, num, seed, output_len=output_len)]
    elif workload in WORKLOADS:
        shape = {"input_len": 128, "prefix_len": 0, **WORKLOADS[workload]}
        shared = shape["prefix_len"]
        lengths = [(shared + (input_len or shape["input_len"]), output_len or 64)] * num
    else:
        raise ValueError(f"cannot replay the {workload!r} workload; choose from sharegpt, {', '.join(WORKLOADS)}")
    if total_input:
        shift = round((total_input - sum(p for p, _ in lengths)) / num)
        lengths = [(max(1, p + shift), o) for p, o in lengths]
    return lengths, shared


def replay(lengths: list[tuple[int, int]], send_times: list[float], max_concurrency: int | None, num_replicas: int,
           policy: str, costs: StepCostModel, config: ReplicaConfig, shared_len: int = 0) -> dict:
    """Simulate a fixed request list; metrics as `bench serve` reports them."""
    requests = [SimRequest(i, i, 0, p, o, shared_len, 0 if shared_len else -1, config.block_size)
                for i, (p, o) in enumerate(lengths)]
    simulate(ListClients(requests, send_times, max_concurrency), num_replicas, policy, config, costs)
    return replay_metrics(requests)


def replay_metrics(requests: list[SimRequest]) -> dict:
    ttft = [(r.first_token - r.arrival) * 1000 for r in requests]
    tpot = [(r.finish - r.first_token) / (r.output_len - 1) * 1000 for r in requests if r.output_len > 1]
    duration = max(r.finish for r in requests) - min(r.arrival for r in requests)
    return {"mean_ttft_ms": statistics.mean(ttft), "median_ttft_ms": statistics.median(ttft),
            "p99_ttft_ms": float(np.percentile(ttft, 99)), "mean_tpot_ms": statistics.mean(tpot) if tpot else None,
            "output_throughput": sum(r.output_len for r in requests) / duration, "duration_s": duration,
            "hit_rate": sum(r.hit_tokens for r in requests) / sum(r.prompt_len for r in requests)}


def compare(measured: dict, simulated: dict, keys: dict[str, str]) -> dict:
    """{metric: {measured, simulated, rel_error}} for `keys` (simulated name -> measured name)."""
    out = {}
    for sim_key, measured_key in keys.items():
        m, s = measured.get(measured_key), simulated.get(sim_key)
        if m is not None and s is not None:
            out[sim_key] = {"measured": m, "simulated": s, "rel_error": s / m - 1 if m else None}
    return out


SERVE_METRICS = {"mean_ttft_ms": "mean_ttft_ms", "median_ttft_ms": "median_ttft_ms", "p99_ttft_ms": "p99_ttft_ms",
                 "mean_tpot_ms": "mean_tpot_ms", "output_throughput": "output_throughput"}


def _validate_serve(record, name, costs, config, num_replicas, policy, tokenizer) -> dict:
    from effinfer.bench.serve import arrival_delays

    cfg = record["config"]
    num = record["completed"]
    lengths, shared = serve_workload(cfg.get("workload", "random"), num, cfg.get("input_len"), cfg.get("output_len"),
                                     cfg.get("seed", 0), tokenizer, record.get("total_input_tokens"))
    rate = float(cfg.get("request_rate") or math.inf)
    send_times = np.cumsum(arrival_delays(num, rate, cfg.get("burstiness", 1.0), cfg.get("seed", 0))).tolist()
    simulated = replay(lengths, send_times, cfg.get("max_concurrency"), num_replicas, policy, costs, config, shared)
    return {"record": name, "configuration": cfg.get("label") or "served", "replicas": num_replicas,
            "commit": record.get("commit"), "workload": f"{cfg.get('workload')}, {num} requests, concurrency "
            f"{cfg.get('max_concurrency') or num}", "metrics": compare(record, simulated, SERVE_METRICS)}


def _validate_serve_default(record, name, costs, config, num_replicas, policy, tokenizer) -> list[dict]:
    """serve_default.py served ShareGPT prompts one at a time (`--max-concurrency 1`) with `--output-len`."""
    num, output_len = record["num_prompts"], record["output_len"]
    lengths, _ = serve_workload("sharegpt", num, None, output_len, 0, tokenizer)
    simulated = replay(lengths, [0.0] * num, 1, num_replicas, policy, costs, config)
    keys = {"mean_ttft_ms": "mean_ttft_ms", "mean_tpot_ms": "mean_tpot_ms", "output_throughput": "output_tok_s"}
    configurations = [c for c in ("default", "eager (--no-compile)") if c in record["median"]]
    rows = [{"record": name, "configuration": c, "replicas": num_replicas, "commit": record.get("commit"),
             "workload": f"sharegpt, {num} requests, concurrency 1",
             "metrics": compare(record["median"][c], simulated, keys)} for c in configurations]
    in_process = {"pp512_tok_s": 512 / costs.step_time(512), "tg128_tok_s": single_stream_decode_rate(costs, 16, 128)}
    return rows + [{"record": name, "configuration": f"{c}, in process (`bench latency`)", "replicas": 1,
                    "commit": record.get("commit"), "workload": "pp512 / tg128, one sequence",
                    "metrics": compare(record["in_process_latency"][c], in_process, {k: k for k in in_process})}
                   for c in configurations if c in record.get("in_process_latency", {})]


def single_stream_decode_rate(costs: StepCostModel, prompt_len: int, gen_len: int) -> float:
    """Tokens/s of one sequence decoding `gen_len` tokens after a `prompt_len`-token prompt (llama-bench's tg)."""
    steps = [costs.step_time(1, 1, prompt_len + g, prompt_len + g) for g in range(1, gen_len)]
    return len(steps) / sum(steps)


def _validate_prefix_cache(record, name, costs, config) -> list[dict]:
    """prefix_cache.py: all requests at once in one offline engine, a shared prefix plus 20 own tokens, 8
    output tokens, its scheduler settings; TTFT and the batch's total time with the cache on and off."""
    scheduler = record["resolved_config"]["scheduler"]
    num, prefix = record["num_requests"], record["prefix_tokens"]
    rows = []
    for mode in ("off", "on"):
        replica = ReplicaConfig(scheduler["max_num_seqs"], scheduler["max_num_batched_tokens"], config.block_size,
                                config.num_blocks, mode == "on")
        simulated = replay([(prefix + 20, 8)] * num, [0.0] * num, None, 1, "round-robin", costs, replica, prefix)
        simulated["total_s"] = simulated["duration_s"]
        simulated["mean_ttft_s"] = simulated["mean_ttft_ms"] / 1000
        keys = {"mean_ttft_s": "mean_ttft_s", "total_s": "total_s", "hit_rate": "hit_rate"}
        rows.append({"record": name, "configuration": f"prefix cache {mode}", "replicas": 1, "commit": record.get("commit"),
                     "workload": f"{num} requests at once, {prefix}-token shared prefix",
                     "metrics": compare(record["summary"][mode], simulated, keys)})
    return rows


REPLICAS_METRICS = {"hit_rate": "prefix_hit_rate", "median_ttft_ms": "ttft_p50_ms", "p99_ttft_ms": "ttft_p99_ms",
                    "mean_ttft_ms": "ttft_mean_ms", "output_throughput": "output_tok_s"}


def _validate_replicas(record, name, costs, config, tokenizer) -> list[dict]:
    """benchmarks/replicas.py: its tenants' prompts drawn again with its own `workload` (same seeds), sent by its
    closed-loop clients to 1 or 2 replicas with its pool size and `max_num_seqs`. Its replicas split the
    machine's threads between them; the cost model was timed with `threads` of its own (the row says both)."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("replicas_benchmark", ROOT / "benchmarks" / "replicas.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = argparse.Namespace(**record["settings"])
    rows = []
    for index, (configuration, measured) in enumerate(record["summary"].items()):
        num_replicas = int(configuration.split()[0])
        policy = "prefix-aware" if "prefix" in configuration else "round-robin"
        blocks = int(re.search(r"(\d+) blocks x", measured["engine"]).group(1))
        replica = ReplicaConfig(settings.concurrency, config.max_num_batched_tokens, config.block_size, blocks, True)
        prompts = bench.workload(tokenizer, settings, seed=settings.seed + index)
        tenants = {}
        lengths = [(len(p), settings.output_tokens, tenants.setdefault(tuple(p[:settings.system_tokens]), len(tenants)))
                   for p in prompts]
        simulated = replay_tenants(lengths, settings.concurrency, num_replicas, policy, costs, replica,
                                   settings.system_tokens)
        wanted = {"prefix_hit_rate": measured["prefix_hit_rate"], "ttft_p50_ms": measured["ttft_p50_s"]["value"] * 1000,
                  "ttft_p99_ms": measured["ttft_p99_s"] * 1000, "ttft_mean_ms": measured["ttft_mean_s"] * 1000,
                  "output_tok_s": measured["output_tok_s"]}
        rows.append({"record": name, "configuration": configuration, "replicas": num_replicas,
                     "commit": record.get("commit"), "workload": f"{settings.requests} requests, {settings.tenants} "
                     f"system prompts, concurrency {settings.concurrency}",
                     "threads_per_replica": max(1, settings.threads // num_replicas),
                     "metrics": compare(wanted, simulated, REPLICAS_METRICS)})
    return rows


def replay_tenants(lengths: list[tuple[int, int, int]], concurrency: int, num_replicas: int, policy: str,
                   costs: StepCostModel, config: ReplicaConfig, shared_len: int) -> dict:
    """`replay` for requests that each start with one of several shared prefixes: (prompt, output, prefix id)."""
    requests = [SimRequest(i, i, 0, p, o, shared_len, tenant, config.block_size) for i, (p, o, tenant) in enumerate(lengths)]
    simulate(ListClients(requests, [0.0] * len(requests), concurrency), num_replicas, policy, config, costs)
    return replay_metrics(requests)


# ---- plots ----------------------------------------------------------------------------------------------

def plot_study(rows: list[dict], saturation: dict, rate_per_replica: float, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_policy = {p: sorted((r for r in rows if r["policy"] == p), key=lambda r: r["replicas"])
                 for p in dict.fromkeys(r["policy"] for r in rows)}
    return [_plot_hit_rate(plt, by_policy, out_dir / "simulate_routing_hit_rate.png"),
            _plot_ttft(plt, by_policy, out_dir / "simulate_routing_ttft.png"),
            _plot_router(plt, by_policy, saturation, rate_per_replica, out_dir / "simulate_routing_router.png")]


def _axes(plt, ylabel: str, title: str, width: float = 6.5):
    fig, ax = plt.subplots(figsize=(width, 4))
    ax.set_xscale("log")
    ax.set_xlabel("replicas")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(plt, fig, ax, path: Path) -> Path:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_hit_rate(plt, by_policy: dict, path: Path) -> Path:
    fig, ax = _axes(plt, "prompt tokens from the prefix cache", "Prefix-cache hit rate")
    for policy, rows in by_policy.items():
        ax.plot([r["replicas"] for r in rows], [r["hit_rate"] for r in rows], marker="o", label=policy)
    ax.set_ylim(0, 1)
    return _save(plt, fig, ax, path)


def _plot_ttft(plt, by_policy: dict, path: Path) -> Path:
    fig, ax = _axes(plt, "TTFT (ms)", "Time to first token: p50 (solid), p99 (dashed)")
    for (policy, rows), color in zip(by_policy.items(), ("C0", "C1", "C2", "C3")):
        xs = [r["replicas"] for r in rows]
        ax.plot(xs, [r["p50_ttft_ms"] for r in rows], marker="o", color=color, label=f"{policy} p50")
        ax.plot(xs, [r["p99_ttft_ms"] for r in rows], marker="s", linestyle="--", color=color, label=f"{policy} p99")
    ax.set_yscale("log")
    return _save(plt, fig, ax, path)


def _plot_router(plt, by_policy: dict, saturation: dict, rate_per_replica: float, path: Path) -> Path:
    fig, ax = _axes(plt, "router utilisation (rate x cost)", f"One router at {rate_per_replica:g} req/s per replica")
    for (policy, rows), color in zip(by_policy.items(), ("C0", "C1", "C2", "C3")):
        ax.plot([r["replicas"] for r in rows], [r["router_utilisation"] for r in rows], "o", color=color, label=policy)
        fit = saturation[policy]
        xs = np.geomspace(1, max(fit["saturation_replicas"] * 1.5, 2000), 100)
        ax.plot(xs, rate_per_replica * xs * (fit["cost_us_intercept"] + fit["cost_us_per_replica"] * xs) * 1e-6,
                color=color, alpha=0.5, label=f"{policy} fit: saturates at {fit['saturation_replicas']:,.0f} replicas")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    return _save(plt, fig, ax, path)


# ---- command line ---------------------------------------------------------------------------------------

def _progress(show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not show)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="time the engine's steps and write the cost record (--out)")
    p.add_argument("--measure-rounds", type=int, default=2, help="sweeps of the timed points (the fastest is kept)")
    p.add_argument("--threads", type=int, default=None, help="--measure: the engine's threads (default: PyTorch's)")
    p.add_argument("--costs", default=DEFAULT_COSTS, help="a cost record from --measure")
    p.add_argument("--out", required=True, help="the JSON record to write")
    p.add_argument("--plots-dir", default="benchmarks/results/plots")
    p.add_argument("--replicas", default=",".join(map(str, REPLICA_COUNTS)), help="comma-separated replica counts")
    p.add_argument("--policies", default=",".join(POLICIES))
    study, trace, router = StudySettings(), TraceSettings(), RouterSettings()
    p.add_argument("--rate-per-replica", type=float, default=study.rate_per_replica, help="requests/s per replica")
    p.add_argument("--duration", type=float, default=study.duration_s, help="seconds over which sessions start")
    p.add_argument("--warmup", type=float, default=study.warmup_s, help="seconds of requests left out of the metrics")
    p.add_argument("--min-requests", type=int, default=study.min_requests)
    p.add_argument("--router-overhead-us", type=float, default=study.router_overhead_us)
    p.add_argument("--system-prompts", type=int, default=trace.num_system_prompts)
    p.add_argument("--zipf", type=float, default=trace.zipf)
    p.add_argument("--max-turns", type=int, default=trace.max_turns)
    p.add_argument("--max-total-len", type=int, default=trace.max_total_len)
    p.add_argument("--think-time", type=float, default=trace.think_time_s, help="mean seconds between turns")
    p.add_argument("--imbalance-bound", type=int, default=router.imbalance_bound)
    p.add_argument("--route-blocks", type=int, default=router.route_blocks)
    p.add_argument("--new-prefix", choices=("home", "least-loaded"), default=router.new_prefix,
                   help="prefix-aware: where a prefix never routed before goes")
    p.add_argument("--validate", action="append", metavar="RECORD[:REPLICAS[:POLICY]]",
                   help="a measured record (a path, or a name in benchmarks/results/) to replay on REPLICAS simulated "
                        "replicas (repeatable; default: the serving, prefix-cache and replica records there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_allow_dirty_arg(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = RunProvenance.begin(args.out, args.allow_dirty)
    started = time.perf_counter()
    if args.measure:
        record = measure_step_costs(args.measure_rounds, args.threads, not args.no_progress)
        _write(args.out, "step_costs", provenance, {"rounds": args.measure_rounds, "threads": args.threads}, record, None)
        _print_costs(record)
        print(f"took {time.perf_counter() - started:.0f} s; wrote {args.out}")
        return 0
    record = run_simulation(args, provenance, started)
    print(f"took {record['elapsed_s']:.0f} s; wrote {args.out}")
    return 0


def run_simulation(args: argparse.Namespace, provenance: RunProvenance, started: float) -> dict:
    from effinfer.bench.provenance import RESULTS_DIR
    from effinfer.loader.catalog import DEFAULT_MODEL
    from effinfer.loader.source import load_tokenizer

    cost_record = json.loads(Path(args.costs).read_text())
    costs, config = StepCostModel.from_dict(cost_record["model"]), ReplicaConfig(**cost_record["replica"])
    trace = TraceSettings(args.system_prompts, args.zipf, TraceSettings().system_len, args.max_turns,
                          args.max_total_len, args.think_time)
    study = StudySettings(tuple(int(x) for x in args.replicas.split(",")), tuple(args.policies.split(",")),
                          args.rate_per_replica, args.duration, args.warmup, args.min_requests,
                          args.router_overhead_us, args.seed)
    router = RouterSettings(args.imbalance_bound, args.route_blocks, new_prefix=args.new_prefix,
                            block_size=config.block_size)
    for policy in study.policies:
        Router(policy, 1)                          # an unknown name fails now, not after minutes
    show = not args.no_progress
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    validation = run_validation(args.validate or list(DEFAULT_VALIDATION), RESULTS_DIR, costs, config, tokenizer)
    _print_validation(validation)
    conversations = load_conversations(tokenizer, trace.max_turns, show_progress=show)
    rows = run_study(conversations, costs, config, trace, study, router, show)
    saturation = router_saturation(rows, study.rate_per_replica)
    _print_study(rows, saturation)
    plots = plot_study(rows, saturation, study.rate_per_replica, Path(args.plots_dir))
    metrics = {"step_costs": {key: cost_record.get(key) for key in ("model", "replica", "threads", "fit", "held_out",
                                                                     "commit", "dirty", "command")},
               "trace": {"conversations": len(conversations), **asdict(trace)}, "runs": rows,
               "router_saturation": saturation, "validation": validation, "plots": [str(p) for p in plots],
               "elapsed_s": time.perf_counter() - started}
    config_out = {"study": asdict(study), "router": asdict(router), "replica": asdict(config)}
    return _write(args.out, "simulate_routing", provenance, config_out, metrics, {"costs": args.costs})


def run_validation(specs: list[str], results: Path, costs: StepCostModel, config: ReplicaConfig, tokenizer
                   ) -> list[dict]:
    rows = []
    for spec in specs:
        path, _, rest = spec.partition(":")
        replicas, _, policy = rest.partition(":")
        file = Path(path) if Path(path).is_file() else results / path
        if not file.is_file():
            print(f"validation: no record {file}; skipped")
            continue
        rows += validate(json.loads(file.read_text()), file.name, costs, config, int(replicas or 1),
                         policy or "least-loaded", tokenizer)
    return rows


def _write(path: str, kind: str, provenance: RunProvenance, config: dict, metrics: dict, inputs: dict | None) -> dict:
    from effinfer.bench.report import write_record

    return write_record(path, kind, config, metrics, provenance, seed=config.get("study", {}).get("seed"), inputs=inputs)


def _print_costs(record: dict) -> None:
    model = record["model"]
    print("step-cost model: " + ", ".join(f"{n} {c:.3g}" for n, c in zip(model["names"], model["coefficients"])))
    print(f"fit over {sum(p['kind'] != 'mixed' for p in record['points'])} steps: max |error| "
          f"{record['fit']['max_abs_rel_error']:.1%}, rms {record['fit']['rms_rel_error']:.1%}")
    for row in record["held_out"]:
        print(f"held-out mixed step {row['shape']}: measured {row['measured_s'] * 1000:.1f} ms, predicted "
              f"{row['predicted_s'] * 1000:.1f} ms ({row['rel_error']:+.1%})")


def _print_validation(rows: list[dict]) -> None:
    print(f"\n{'record':<34}{'configuration':<46}{'metric':<20}{'measured':>11}{'simulated':>11}{'error':>9}")
    for row in rows:
        for metric, m in row["metrics"].items():
            error = "-" if m["rel_error"] is None else f"{m['rel_error']:+.0%}"
            print(f"{row['record']:<34}{row['configuration'][:45]:<46}{metric:<20}{m['measured']:>11.3g}"
                  f"{m['simulated']:>11.3g}{error:>9}")


def _print_study(rows: list[dict], saturation: dict) -> None:
    print(f"\n{'policy':<14}{'replicas':>9}{'hit rate':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'tok/s/rep':>11}"
          f"{'route us':>10}{'router util':>12}")
    for r in rows:
        print(f"{r['policy']:<14}{r['replicas']:>9}{r['hit_rate']:>10.2f}{r['p50_ttft_ms']:>10.0f}{r['p99_ttft_ms']:>10.0f}"
              f"{r['output_tok_s_per_replica']:>11.1f}{r['route_cost_us']:>10.1f}{r['router_utilisation']:>12.2e}")
    for policy, s in saturation.items():
        print(f"{policy}: routing cost {s['cost_us_intercept']:.1f} + {s['cost_us_per_replica']:.4f} x replicas us; "
              f"one router saturates at {s['saturation_replicas']:,.0f} replicas")


if __name__ == "__main__":
    sys.exit(main())
