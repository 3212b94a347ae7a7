"""Prometheus metrics of the server: queue and cache state per step, latencies per finished request.

Names follow vLLM's (`vllm:` becomes `effinfer:`) so existing dashboards need only a prefix change.
Each app has its own registry, so several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from effinfer.outputs import EngineStats, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str, spec_method: str | None = None, exit_layers: list[int] = (),
                 settings: dict[str, str] | None = None):
        """`spec_method`: the engine's proposer, a label of the speculative-decoding series; `exit_layers`:
        the layers that have exit heads (early exit), one series each; `settings`: what the engine runs
        (`effinfer:engine_info`)."""
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc, **extra):
            return Gauge(f"effinfer:{name}", doc, labels + list(extra), registry=r).labels(model_name, *extra.values())

        def counter(name, doc, **extra):
            return Counter(f"effinfer:{name}", doc, labels + list(extra), registry=r).labels(model_name, *extra.values())

        def histogram(name, doc, buckets):
            return Histogram(f"effinfer:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        engine_info = Info("effinfer:engine", "What the engine runs: the resolved configuration choices.", labels,
                           registry=r)
        engine_info.labels(model_name).info(dict(settings or {}))
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Prompt tokens served by the prefix cache / queried.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.preemptions = counter("num_preemptions", "Requests preempted for lack of KV blocks.")
        self.finished = counter("request_success", "Finished requests.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token after the first.",
                              TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduling.", LATENCY_BUCKETS)
        self.step_time = histogram("engine_step_seconds", "Wall time of one engine step.", TOKEN_BUCKETS)
        self.compiled = gauge("decode_steps_compiled", "1 once decode steps run compiled (0: eager or compiling).")
        # speculative decoding (vLLM's spec_decode_* names), labelled by proposer
        method = {"method": spec_method or "none"}
        self.spec_drafts = counter("spec_decode_num_draft_tokens", "Draft tokens proposed for verification.", **method)
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", **method)
        self.spec_steps = counter("spec_decode_num_drafts", "Request-steps that verified drafts.", **method)
        self.spec_acceptance = gauge("spec_decode_draft_acceptance_rate", "Accepted / proposed draft tokens.", **method)
        self.spec_mean_accepted = gauge("spec_decode_mean_accepted_length",
                                        "Accepted drafts per verifying request-step.", **method)
        # early exit: decode tokens that could exit, and those that did, per exit layer
        self.exit_candidates = counter("early_exit_candidate_tokens", "Decode tokens tested for early exit.")
        exits = Counter("effinfer:early_exit_tokens", "Decode tokens that exited after this layer.",
                        labels + ["layer"], registry=r)
        self.exit_tokens = {layer: exits.labels(model_name, str(layer)) for layer in exit_layers}
        self._seen_hits = self._seen_queries = self._seen_preemptions = 0
        self._seen_spec = {"draft_tokens": 0, "accepted_tokens": 0, "verify_steps": 0}
        self._seen_exit = {"candidates": 0, "by_layer": {layer: 0 for layer in exit_layers}}

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput], step_time: float | None) -> None:
        """Called after every engine step, with the engine's counters after it (`LLMEngine.stats()`), and
        with `step_time` None for an idle engine's report (no step to time)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.compiled.set(stats.decode_steps == "compiled")
        if step_time is not None:
            self.step_time.observe(step_time)
        self.prefix_hits.inc(_growth(stats.prefix_hit_tokens, self._seen_hits))
        self.prefix_queries.inc(_growth(stats.prefix_queried_tokens, self._seen_queries))
        self.preemptions.inc(_growth(stats.num_preemptions, self._seen_preemptions))
        self._seen_hits, self._seen_queries = stats.prefix_hit_tokens, stats.prefix_queried_tokens
        self._seen_preemptions = stats.num_preemptions
        if stats.prefix_queried_tokens:
            self.prefix_hit_rate.set(stats.prefix_hit_tokens / stats.prefix_queried_tokens)
        self._observe_spec(stats.spec)
        if self.exit_tokens:
            self._observe_exits(stats.exit_candidates, stats.exits_by_layer)
        for out in outputs:
            self.generation_tokens.inc(len(out.new_token_ids))
            if out.finished:
                self._observe_finished(out)

    def _observe_spec(self, stats: dict) -> None:
        for key, metric in (("draft_tokens", self.spec_drafts), ("accepted_tokens", self.spec_accepted),
                            ("verify_steps", self.spec_steps)):
            metric.inc(_growth(stats[key], self._seen_spec[key]))
        self._seen_spec = dict(stats)
        if stats["draft_tokens"]:
            self.spec_acceptance.set(stats["accepted_tokens"] / stats["draft_tokens"])
            self.spec_mean_accepted.set(stats["accepted_tokens"] / stats["verify_steps"])

    def _observe_exits(self, candidates: int, by_layer: dict[int, int]) -> None:
        self.exit_candidates.inc(_growth(candidates, self._seen_exit["candidates"]))
        for layer, metric in self.exit_tokens.items():
            metric.inc(_growth(by_layer[layer], self._seen_exit["by_layer"][layer]))
        self._seen_exit = {"candidates": candidates, "by_layer": dict(by_layer)}

    def _observe_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        self.finished.inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if len(out.token_ids) > 1 and m.finished_time is not None:
                self.tpot.observe((m.finished_time - m.first_token_time) / (len(out.token_ids) - 1))
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _growth(count: int, seen: int) -> int:
    """What an engine counter grew by since last seen; a restarted engine counts from zero again."""
    return count - seen if count >= seen else count
