"""`effinfer tune`: search the configurations effinfer offers for the fastest one within a quality bound.

Three stages, cheapest first, each pruning what cannot win:

1. quality: every weight format x KV-cache format is scored against the model in bf16 (mean KL divergence of
   the next-token distributions on a text, `bench quality`'s measure); those above `max_kl` are dropped. The
   lossless options (compiled steps, batch limits, speculative decoding) do not change quality, so they are
   not scored;
2. speed, eager: each surviving format is measured once on the workload (one configuration loaded at a time);
3. finalists: the best eager formats, each also with compiled steps (and, for throughput, larger step budgets),
   measured interleaved with the default configuration for several rounds (`bench compare`), so that the
   winner's ratio to the default carries a 95% interval.

The winner is written as a JSON file of engine options that `effinfer serve --config FILE` loads; a report
(every candidate, its quality and speed, which stage dropped it and why) and a Pareto plot (speed against
KL) go beside it. A time budget bounds the search: the final runs at least one round (its compiled variants
only while time remains), and if it cannot run at all the eager ranking decides.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

WEIGHT_FORMATS = ({"quantization": "none"}, {"quantization": "auto"}, {"quantization": "int8"},
                  {"quantization": "w8a8"}, {"quantization": "int4", "group_size": 32},
                  {"quantization": "int4", "group_size": 64})
KV_FORMATS = ({"kv_cache_dtype": "auto"}, {"kv_cache_dtype": "int8"})
STEP_BUDGETS = (1024, 2048)
"""Throughput finalists also try these `max_num_batched_tokens` (prefill chunks per step) beside the default."""
WORKLOADS = ("latency", "throughput")


@dataclass
class TuneSettings:
    model: str
    text: str
    """A UTF-8 text for the quality bound (KL against bf16 is measured on its first `quality_tokens` tokens)."""
    workload: str = "latency"
    """latency: one request of `prompt_len` tokens to `gen_len` (its time, prefill + decode, is minimised);
    throughput: `num_prompts` requests of `input_len` + `output_len` at once (output tokens/s maximised)."""
    max_kl: float = 0.01
    quality_tokens: int = 2048
    prompt_len: int = 512
    gen_len: int = 128
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 128
    finalists: int = 2
    rounds: int = 3
    compile: bool = True
    """Try compiled steps for the finalists (minutes per configuration on a cold compile cache)."""
    time_budget_s: float = 1800.0
    base_options: dict = field(default_factory=dict)
    """Options every candidate shares (threads, cache dir, ...)."""

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {', '.join(WORKLOADS)}")
        if not self.max_kl > 0:
            raise ValueError(f"max_kl must be positive, got {self.max_kl}")
        if not Path(self.text).is_file():
            raise FileNotFoundError(2, "No such file", self.text)


@dataclass
class Candidate:
    options: dict
    kl: float | None = None
    perplexity: float | None = None
    eager: dict = field(default_factory=dict)
    """Stage 2, one measurement: the workload's metrics (latency: request_latency_s, pp/tg; throughput:
    output_throughput), each a list."""
    final: dict = field(default_factory=dict)
    """Stage 3, one measurement per interleaved round (the same metrics)."""
    in_final: bool = False
    dropped: str = ""
    """Why the search left it (quality above the bound, slower than the finalists, out of time, a failure)."""

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options.items()) or "default"

    @property
    def speed(self) -> dict:
        """The interleaved rounds where it ran in the final, else its eager measurement."""
        return self.final or self.eager


class Tuner:
    def __init__(self, settings: TuneSettings, make_system=None, log=None):
        from effinfer.bench.systems import make_system as default_make_system

        self.s, self.log = settings, log or (lambda line: print(line, flush=True))
        self.make_system = make_system or (lambda options: default_make_system(options, {"model": settings.model,
                                                                                         **settings.base_options}))
        self.started = time.perf_counter()
        self.candidates: list[Candidate] = []
        self.model_files: dict = {}

    # -- the search ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        survivors = self.quality_stage()
        finalists = self.eager_stage(survivors)
        group = self.final_stage(finalists)
        admissible = lambda c: c.kl is not None and c.kl <= self.s.max_kl   # noqa: E731
        ranked = sorted((c for c in group if c.final and admissible(c)), key=self.score, reverse=True)
        chosen_on = "interleaved final"
        if not ranked:     # the final could not run (time, failures): the eager ranking decides
            ranked = sorted((c for c in self.candidates if c.eager and admissible(c)), key=self.score, reverse=True)
            chosen_on = "eager measurement (the final did not run)"
        return self.result(ranked, chosen_on)

    def quality_stage(self) -> list[Candidate]:
        from effinfer.bench import quality

        reference_options = {"quantization": "none", "kv_cache_dtype": "auto"}
        reference = self.make_system(reference_options)
        self.model_files = reference.input_files()
        windows = quality.text_windows(reference.tokenizer, self.s.text, 512, 256, self.s.quality_tokens)
        reference_scores = Scores(reference)     # scored once, compared against every candidate
        formats = [{**w, **kv} for w in WEIGHT_FORMATS for kv in KV_FORMATS]
        seen, survivors = {}, []
        for i, options in enumerate(formats):
            candidate = Candidate(options)
            self.candidates.append(candidate)
            if self.out_of_time():
                candidate.dropped = "time budget spent before its quality was measured"
                continue
            try:
                system = reference if options == reference_options else self.make_system(options)
            except (ValueError, RuntimeError) as exc:     # a format this model or machine cannot run
                candidate.dropped = f"does not load: {exc}"
                continue
            built_as = (getattr(system.llm.engine.loaded, "quantization", None), options.get("group_size"),
                        options["kv_cache_dtype"]) if hasattr(system, "llm") else None
            if built_as is not None and built_as in seen:      # auto chose what another entry is
                twin = seen[built_as]
                candidate.kl, candidate.perplexity = twin.kl, twin.perplexity
                candidate.dropped = f"the same build as {twin.name}"
                continue
            seen[built_as] = candidate
            scored = Scores(system)
            candidate.kl = quality.divergence(reference_scores, scored, windows)["kl_divergence"]
            candidate.perplexity = quality.perplexity(scored, windows)["perplexity"]
            self.log(f"[quality {i + 1}/{len(formats)}, {self.elapsed()}] {candidate.name}: KL {candidate.kl:.4f}, "
                     f"perplexity {candidate.perplexity:.2f}")
            if candidate.kl > self.s.max_kl:
                candidate.dropped = f"KL {candidate.kl:.4f} above the bound {self.s.max_kl}"
            else:
                survivors.append(candidate)
            del scored, system       # (the reference stays: its scores are reused)
            gc.collect()
        return survivors

    def eager_stage(self, survivors: list[Candidate]) -> list[Candidate]:
        measured = []
        for i, candidate in enumerate(survivors):
            if self.out_of_time():
                candidate.dropped = "time budget spent before its speed was measured"
                continue
            self.measure(candidate, candidate.eager)
            if candidate.eager:
                measured.append(candidate)
                self.log(f"[speed {i + 1}/{len(survivors)}, {self.elapsed()}] {candidate.name}: "
                         f"{self.describe_speed(candidate)}")
        measured.sort(key=self.score, reverse=True)
        for candidate in measured[self.s.finalists:]:
            candidate.dropped = "slower than the finalists (eager)"
        return measured[:self.s.finalists]

    def final_stage(self, finalists: list[Candidate]) -> list[Candidate]:
        """The default configuration, the finalists and their variants, interleaved round by round (at least one
        round: the variants, which may compile for minutes, are built only while time remains)."""
        if not finalists:
            return []
        variants = []
        for c in finalists:      # lossless variants: their quality is their format's
            extra = [{"compile": True}] if self.s.compile else []
            if self.s.workload == "throughput":
                extra += [{"max_num_batched_tokens": b} for b in STEP_BUDGETS]
            variants += [Candidate({**c.options, **e}, c.kl, c.perplexity) for e in extra]
        same_format = next((c for c in self.candidates if c.options == {"quantization": "auto", "kv_cache_dtype": "auto"}), None)
        default = Candidate({}, same_format and same_format.kl, same_format and same_format.perplexity)
        self.candidates += [*variants, default]
        group = [default, *finalists, *variants]
        systems = {}
        for c in group:
            if c in variants and self.out_of_time():
                c.dropped = "time budget spent before it was built"
                continue
            try:
                systems[c.name] = self.make_system(c.options)
                c.in_final = True
            except (ValueError, RuntimeError) as exc:
                c.dropped = f"does not load: {exc}"
        for r in range(self.s.rounds):
            if r and self.out_of_time():
                break
            for c in group:
                if c.in_final:
                    self.measure(c, c.final, systems[c.name])
            self.log(f"[final round {r + 1}/{self.s.rounds}, {self.elapsed()}] " + "; ".join(
                f"{c.name}: {self.describe_speed(c)}" for c in group if c.final))
        return group

    # -- measuring -----------------------------------------------------------------------------------------
    def measure(self, candidate: Candidate, into: dict, system=None) -> None:
        from effinfer.bench.offline import run_latency, run_throughput
        from effinfer.bench.workloads import random_requests

        own = system is None
        try:
            system = system or self.make_system(candidate.options)
            if self.s.workload == "latency":
                m = run_latency(system, self.s.prompt_len, self.s.gen_len, repetitions=1, measure_machine=False)
                pp, tg = m[f"pp{self.s.prompt_len}_tok_s"], m[f"tg{self.s.gen_len}_tok_s"]
                row = {"request_latency_s": self.s.prompt_len / pp + self.s.gen_len / tg,
                       f"pp{self.s.prompt_len}_tok_s": pp, f"tg{self.s.gen_len}_tok_s": tg}
            else:
                requests = random_requests(system.tokenizer, self.s.num_prompts, self.s.input_len, self.s.output_len,
                                           seed=0, as_text=False)
                row = {"output_throughput": run_throughput(system, requests)["output_throughput"]}
        except (ValueError, RuntimeError) as exc:
            candidate.dropped = f"failed to run: {exc}"
            return
        finally:
            if own:
                system = None
                gc.collect()
        for key, value in row.items():
            into.setdefault(key, []).append(value)

    def score(self, candidate: Candidate) -> float:
        """Higher is better: output tokens/s, or requests per second for one request at a time."""
        if self.s.workload == "latency":
            return 1.0 / statistics.mean(candidate.speed["request_latency_s"])
        return statistics.mean(candidate.speed["output_throughput"])

    def describe_speed(self, candidate: Candidate) -> str:
        """The latest measurement."""
        speed = candidate.speed
        if self.s.workload == "latency":
            return (f"{speed['request_latency_s'][-1]:.2f} s per request (pp {speed[f'pp{self.s.prompt_len}_tok_s'][-1]:.0f}, "
                    f"tg {speed[f'tg{self.s.gen_len}_tok_s'][-1]:.1f} tok/s)")
        return f"{speed['output_throughput'][-1]:.1f} output tok/s"

    def elapsed(self) -> str:
        return f"{(time.perf_counter() - self.started) / 60:.1f} min"

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.s.time_budget_s

    # -- the outcome ---------------------------------------------------------------------------------------
    def speedup(self, candidate: Candidate, reference: Candidate):
        """candidate's speed over reference's across their paired final rounds (latency: reference's time over
        candidate's), with its 95% interval."""
        from effinfer.bench.stats import ratio_interval

        key = self._key()
        mine, theirs = candidate.final[key], reference.final[key]
        return ratio_interval(theirs, mine) if self.s.workload == "latency" else ratio_interval(mine, theirs)

    def result(self, ranked: list[Candidate], chosen_on: str) -> dict:
        from effinfer.bench.stats import mean_interval

        best = ranked[0] if ranked else None
        default = next((c for c in self.candidates if c.options == {} and c.final), None)
        rows = []
        for c in self.candidates:
            speeds = {k: mean_interval(v) for k, v in c.speed.items()}
            row = {"name": c.name, "options": c.options, "kl": c.kl, "perplexity": c.perplexity,
                   "stage": "final" if c.final else "eager" if c.eager else "quality",
                   "speed": {k: {"mean": i.value, "ci95": i.bounds(), "rounds": i.n} for k, i in speeds.items()},
                   "dropped": c.dropped}
            if default and c.final and c is not default and len(c.final[self._key()]) == len(default.final[self._key()]):
                ratio = self.speedup(c, default)
                row["speedup_vs_default"] = {"ratio": ratio.value, "ci95": ratio.bounds()}
            rows.append(row)
        out = {"workload": self.s.workload, "max_kl": self.s.max_kl, "best": best.name if best else None,
               "best_options": self._runnable(best.options) if best else {}, "chosen_on": chosen_on,
               "elapsed_s": time.perf_counter() - self.started, "candidates": rows}
        if best is not None and len(ranked) > 1 and best.final and ranked[1].final:
            ratio = self.speedup(best, ranked[1])
            tie = ratio.low is not None and ratio.low <= 1.0 <= ratio.high
            out["best_vs_runner_up"] = {"runner_up": ranked[1].name, "ratio": ratio.value, "ci95": ratio.bounds(),
                                        "tie": tie}
        return out

    def _key(self) -> str:
        return "request_latency_s" if self.s.workload == "latency" else "output_throughput"

    def _runnable(self, options: dict) -> dict:
        """The winner's options with the model and the thread count it was measured with: a file that
        `effinfer serve --config` runs as measured."""
        shared = {k: v for k, v in self.s.base_options.items() if k == "num_threads"}
        return {"model": self.s.model, **shared, **options}


class Scores:
    """A system's log-probabilities per window, computed once (KL and perplexity read the same ones)."""

    def __init__(self, system):
        self.system, self.memo = system, {}

    def score(self, token_ids: list[int]):
        key = tuple(token_ids)
        if key not in self.memo:
            self.memo[key] = self.system.score(token_ids)
        return self.memo[key]


def pareto_plot(result: dict, path: str | Path) -> Path:
    """Speed against KL divergence for every candidate measured; the Pareto front joined, the winner marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "request_latency_s" if result["workload"] == "latency" else "output_throughput"
    points = []
    for row in result["candidates"]:
        if key in row["speed"] and row["kl"] is not None:
            value = row["speed"][key]["mean"]
            points.append((max(row["kl"], 1e-6), 1 / value if key == "request_latency_s" else value, row["name"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    front, best_speed = [], -math.inf
    for kl, speed, name in sorted(points):
        ax.scatter(kl, speed, color="tab:blue" if name != result["best"] else "tab:red", zorder=3)
        ax.annotate(name, (kl, speed), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if speed > best_speed:
            front.append((kl, speed))
            best_speed = speed
    if front:
        ax.plot(*zip(*front), color="tab:red", linestyle="--", label="Pareto front")
    ax.axvline(result["max_kl"], color="gray", linestyle=":", label=f"bound: KL {result['max_kl']}")
    ax.set_xscale("log")
    ax.set_xlabel("KL divergence vs bf16 (lower is closer)")
    ax.set_ylabel("requests/s (one at a time)" if key == "request_latency_s" else "output tokens/s")
    ax.set_title(f"effinfer tune: {result['workload']} (winner in red)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_config(options: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(options, indent=2) + "\n")
    return path
