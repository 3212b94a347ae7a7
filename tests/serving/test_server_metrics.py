"""The Prometheus metrics the server renders from an engine's counters."""

from __future__ import annotations


def test_server_metrics_report_acceptance():
    from effinfer.outputs import EngineStats
    from effinfer.serving.metrics import ServerMetrics

    metrics = ServerMetrics("m", "ngram")
    metrics.on_step(EngineStats(kv_cache_usage=0.1, spec={"draft_tokens": 10, "accepted_tokens": 6, "verify_steps": 4}),
                    [], 0.01)
    metrics.on_step(EngineStats(kv_cache_usage=0.1, spec={"draft_tokens": 14, "accepted_tokens": 7, "verify_steps": 5}),
                    [], 0.01)
    text = metrics.render().decode()
    assert 'effinfer:spec_decode_num_draft_tokens_total{method="ngram",model_name="m"} 14.0' in text
    assert 'effinfer:spec_decode_num_accepted_tokens_total{method="ngram",model_name="m"} 7.0' in text
    assert 'effinfer:spec_decode_draft_acceptance_rate{method="ngram",model_name="m"} 0.5' in text
    assert 'effinfer:spec_decode_mean_accepted_length{method="ngram",model_name="m"} 1.4' in text


def test_an_idle_report_updates_the_gauges_but_times_no_step():
    from effinfer.outputs import EngineStats
    from effinfer.serving.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.on_step(EngineStats(decode_steps="compiling"), [], 0.02)
    metrics.on_step(EngineStats(decode_steps="compiled"), [], None)     # the compile finished while idle
    text = metrics.render().decode()
    assert 'effinfer:decode_steps_compiled{model_name="m"} 1.0' in text
    assert 'effinfer:engine_step_seconds_count{model_name="m"} 1.0' in text


def test_engine_info_names_what_runs(live):
    """`effinfer:engine_info` carries the engine's resolved choices (what quantization=auto chose, compile, ...)."""
    import httpx

    text = httpx.get(live.base_url + "/metrics", timeout=30).text
    line = next(line for line in text.splitlines() if line.startswith("effinfer:engine_info{"))
    assert 'quantization="none"' in line and 'compile="off"' in line and line.endswith(" 1.0")
