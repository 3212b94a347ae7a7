"""Serving-benchmark arithmetic, with the names and definitions of `vllm bench serve`.

Per request: TTFT (arrival to first token), E2EL (arrival to last token), TPOT = (E2EL - TTFT) /
(output tokens - 1), the request's mean time per token after the first; ITL = the gaps between
successive streamed chunks, pooled over all requests (a chunk carrying k tokens is one gap).
Goodput counts the requests per second that meet every given SLO (ms thresholds on ttft/tpot/e2el).
Failed requests are counted, never dropped silently, and are excluded from the latency statistics.
The mean and median TTFT, TPOT and E2EL carry 95% bootstrap intervals over the requests (`..._ms_ci95`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from effinfer.bench.stats import bootstrap_interval

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    success: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    """Seconds from sending the request to the first token."""
    latency: float = 0.0
    """Seconds from sending the request to the last token (E2EL)."""
    itl: list[float] = field(default_factory=list)
    """Seconds between successive streamed chunks after the first."""
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def summarize(results: list[RequestResult], duration: float, slos_ms: dict[str, float] | None = None) -> dict:
    """The metrics of one run, as `vllm bench serve` names them (times in milliseconds)."""
    ok = [r for r in results if r.success]
    out = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:10],
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(r.output_len for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": sum(r.output_len for r in ok) / duration,
        "total_token_throughput": sum(r.prompt_len + r.output_len for r in ok) / duration,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, values in series.items():
        out.update(_stats(name, values))
        if name != "itl" and len(values) > 1:     # per request: bootstrap over the requests
            for stat, fn in (("mean", np.mean), ("median", np.median)):
                out[f"{stat}_{name}_ms_ci95"] = bootstrap_interval(np.asarray(values) * 1000.0, fn).bounds()
    if slos_ms:
        out["goodput"] = sum(_meets(r, slos_ms) for r in ok) / duration
    return out


def _stats(name: str, seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=float) * 1000.0
    if ms.size == 0:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"std_{name}_ms": 0.0,
                **{f"p{p}_{name}_ms": 0.0 for p in PERCENTILES}}
    stats = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
             f"std_{name}_ms": float(ms.std())}
    stats.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return stats


def _meets(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    unknown = set(slos_ms) - set(values)
    if unknown:
        raise ValueError(f"unknown SLO metric(s) {sorted(unknown)}; use ttft, tpot or e2el")
    return all(values[k] * 1000.0 <= limit for k, limit in slos_ms.items())
