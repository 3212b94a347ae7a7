"""`effinfer bench report`: the docs' tables rendered from the records in `benchmarks/results/` (and the option
reference, `docs/configuration.md`, from the config dataclasses that the flags come from).

A table in a Markdown file is a marked region,

    <!-- table: serve_default -->
    (generated: do not edit)
    <!-- /table -->

whose body `effinfer bench report` rewrites from the record(s) its renderer names, with a line that says
which record, made at which commit, by which command. A renderer that takes a record's name is written
`<!-- table: compare:native_peer_smollm2 -->` (any `bench compare` record) or `tune:tune_smollm2_latency`.
`--check` rewrites nothing and fails when a region differs from what its records give (a test runs it), so a
number in the docs is the number in its record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from effinfer.bench.provenance import REPO_ROOT, RESULTS_DIR

DOCS = ("README.md", "benchmarks/README.md", "docs/techniques.md", "docs/configuration.md", "docs/scaling.md")
"""The files whose marked regions `bench report` renders (relative to the repository root)."""

REGION = re.compile(r"^(<!-- table: (?P<name>[\w-]+)(?::(?P<record>[\w.-]+))? -->\r?\n)"
                    r"(?P<body>(?:(?!^<!-- table:).)*?)(^<!-- /table -->)", re.S | re.M)
"""Markers open a line. A region's body never runs into the next region: a missing closing marker is an error,
not lost prose."""

TABLES: dict[str, Callable[..., str]] = {}
"""name -> render(results folder[, record name]) -> Markdown."""


def table(name: str):
    def register(render: Callable[[Path], str]):
        TABLES[name] = render
        return render
    return register


def render_text(text: str, results: Path = RESULTS_DIR) -> str:
    """`text` with every marked region's body rendered afresh from the records in `results`."""
    opening = len(re.findall(r"^<!-- table:", text, re.M))      # markers open a line; prose may quote them
    closing = len(re.findall(r"^<!-- /table -->", text, re.M))
    matched = len(REGION.findall(text))
    if not opening == closing == matched:
        raise ValueError(f"table markers do not pair up ({opening} opening, {closing} closing, {matched} well-formed "
                         "regions): each `<!-- table: NAME -->` line needs its own `<!-- /table -->`")

    def body(match: re.Match) -> str:
        name, record = match["name"], match["record"]
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r} (known: {', '.join(sorted(TABLES))})")
        body = TABLES[name](results, record) if record else TABLES[name](results)
        return match[1] + body.rstrip("\n") + "\n<!-- /table -->"
    return REGION.sub(body, text)


def report(paths: list[Path], results: Path = RESULTS_DIR, check: bool = False) -> list[str]:
    """Render (or, with `check`, compare) each file's regions; returns the files that differ(ed)."""
    differing = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        rendered = render_text(text, results)
        if rendered != text:
            differing.append(str(path))
            if not check:
                path.write_text(rendered, encoding="utf-8")
    return differing


def doc_paths() -> list[Path]:
    return [REPO_ROOT / name for name in DOCS if (REPO_ROOT / name).is_file()]


def load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise FileNotFoundError(f"the table's record {path} is missing")
    return json.loads(path.read_text())


def source(name: str, record: dict) -> str:
    """The line under a table: its record, the commit it measured and the command that made it."""
    commit = str(record.get("commit", "unknown"))[:10]
    dirty = " (uncommitted changes)" if record.get("dirty") else ""
    date = str(record.get("date", ""))[:10]
    command = record.get("command")
    made = f", made by `{command}`" if command else ""
    return f"\n_Record: `results/{name}` at {commit}{dirty}, {date}{made}._\n"


def markdown_table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """`align`: one character per column, l or r."""
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def number(value: float | None, digits: int = 1) -> str:
    """1,052 / 94.5 / 0.958: thousands separated; `digits` after the point below 1,000."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.{digits}f}"


@table("serve_default")
def serve_default_table(results: Path) -> str:
    record = load(results, "serve_default.json")
    labels = {"default": "default: engine process, `quantization=auto` (the file's Q4_1 blocks), compiled in the background",
              "default, cold compile cache": "the same, first start (empty compile cache)",
              "eager (--no-compile)": "`--no-compile` (eager decode steps)",
              "bf16 (--quantization none)": "`--quantization none` (bf16), compiled in the background",
              "default, engine on a thread (--no-engine-process)":
                  "default, engine on a thread of the HTTP process (`--no-engine-process`)"}
    rows = []
    for name, m in record["median"].items():
        latency = record["in_process_latency"].get(name)
        rows.append([
            labels.get(name, name), f"{number(m['start_to_first_answer_s'])} s",
            f"{number(m['start_to_compiled_s'])} s" if "start_to_compiled_s" in m else "-",
            number(m["output_tok_s"]), f"{number(m['mean_tpot_ms'])} ms",
            f"{m['resident_mb']:,.0f} / {m['proportional_mb']:,.0f} MB",
            f"{number(latency['pp512_tok_s'])} / {number(latency['tg128_tok_s'])}" if latency else "-"])
    header = ["configuration", "start to first answer", "start to compiled", "served output tok/s", "TPOT",
              "RSS / PSS", "in-process pp512 / tg128 tok/s"]
    return markdown_table(header, "lrrrrrr", rows) + source("serve_default.json", record)


@table("paged_attention")
def paged_attention_table(results: Path) -> str:
    record = load(results, "paged_attention.json")
    ways = ["in place", "compiled gather", "eager gather"]
    rows = []
    for row in record["rows"]:
        times = [row[f"{w}_us"] for w in ways]
        best = min(times)
        cells = [f"**{number(t, 0)}**" if t == best else number(t, 0) for t in times]
        rows.append([f"{row['context']} x {row['batch']}", *cells])
    return (markdown_table(["context x sequences", *ways], "lrrr", rows)
            + source("paged_attention.json", record))


@table("structured_output")
def structured_output_table(results: Path) -> str:
    record = load(results, "structured_output.json")
    rows = [[str(r["concurrency"]),
             f"{number(r['unconstrained_output_tok_s'])} ({number(r['unconstrained_tpot_ms'])} ms)",
             f"{number(r['json_schema_output_tok_s'])} ({number(r['json_schema_tpot_ms'])} ms)",
             f"{r['ratio_output_tok_s']:.3f}x"] for r in record["rows"]]
    header = ["concurrent", "unconstrained tok/s (TPOT)", "JSON schema tok/s (TPOT)", "constrained / unconstrained"]
    return markdown_table(header, "rrrr", rows) + source("structured_output.json", record)


@table("embeddings")
def embeddings_table(results: Path) -> str:
    record = load(results, "embeddings.json")
    rows = [[f"{record['mean_prompt_tokens']:.0f}", str(record["config"]["batch"]), number(record["embeddings_per_s"]),
             number(record["prompt_tokens_per_s"])]]
    header = ["mean prompt tokens", "batch", "embeddings/s", "prompt tokens/s"]
    return markdown_table(header, "rrrr", rows) + source("embeddings.json", record)


@table("configuration")
def configuration_table(results: Path) -> str:
    """Every engine and server option: its flag, default, choices and meaning (the flags' --help says the same)."""
    import dataclasses

    from effinfer.config import SUB_CONFIGS, EngineConfig, field_docs, option_choices
    from effinfer.serving.api_server import ServerConfig

    choices = option_choices()
    groups = {**{f"engine: {name}": cls for name, cls in SUB_CONFIGS.items()}, "engine": EngineConfig,
              "server (`effinfer serve`)": ServerConfig}
    parts = []
    for title, cls in groups.items():
        docs, rows = field_docs(cls), []
        for f in dataclasses.fields(cls):
            if cls is EngineConfig and f.name in SUB_CONFIGS:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flag = "--api-key" if f.name == "api_keys" else "--" + f.name.replace("_", "-")
            names = choices.get(f.name)
            meaning = " ".join(docs.get(f.name, "").split()).replace("|", "\\|")
            rows.append([f"`{flag}`", f"`{default!r}`" if default not in (None, []) else "-",
                         ", ".join(names) if names else "", meaning])
        parts.append(f"### {title}\n\n" + markdown_table(["flag", "default", "choices", "meaning"], "llll", rows))
    return "\n".join(parts)


@table("records")
def records_table(results: Path) -> str:
    """Every record in the folder and what it pins: the records to trust, and the ones to make again."""
    rows = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if "benchmark" not in record and "commit" not in record:
            continue                          # not a record (a tuned configuration file)
        commit = str(record.get("commit") or "-")
        pinned = len(commit) == 40 and record.get("dirty") is False and bool(record.get("command"))
        rows.append([f"`{path.name}`", str(record.get("benchmark", "-")), commit[:10],
                     "yes" if pinned else "no: " + ", ".join(
                         what for what, missing in (("full commit", len(commit) != 40),
                                                     ("clean-tree flag", record.get("dirty") is not False),
                                                     ("command", not record.get("command"))) if missing)])
    pinned = sum(r[3] == "yes" for r in rows)
    return (markdown_table(["record", "benchmark", "commit", "pins what ran"], "llll", rows)
            + f"\n{pinned} of {len(rows)} records pin what ran (full commit, clean tree, the command).\n")


@table("prefix_cache")
def prefix_cache_table(results: Path) -> str:
    record = load(results, "prefix_cache.json")
    rows = [[mode, f"{m['mean_ttft_s']:.2f} s", f"{m['median_ttft_s']:.2f} s", f"{m['total_s']:.1f} s",
             f"{m['hit_rate']:.0%}"] for mode, m in ((k, record["summary"][k]) for k in ("off", "on"))]
    ci = record.get("ttft_speedup_ci95")
    note = (f"\nMean TTFT {record['ttft_speedup']:.1f}x shorter with the cache"
            + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "") + f" ({len(record['rounds']['on'])} rounds).\n")
    return (markdown_table(["prefix cache", "mean TTFT", "median TTFT", "total", "prompt tokens from cache"], "lrrrr", rows)
            + note + source("prefix_cache.json", record))


@table("tensor_parallel")
def tensor_parallel_table(results: Path) -> str:
    """One rank with all the threads against the split model with a share each: rates and paired ratios."""
    record = load(results, "tensor_parallel_qwen05.json")
    names = list(record["summary"])
    split = names[-1]
    labels = {"decode_tok_s": "single-stream decode tok/s", "prefill_tok_s": f"prefill tok/s ({record['prompt_len']} tokens)",
              "batch_output_tok_s": f"{record['batch']} requests x {record['gen_len']} output tok/s"}
    rows = []
    for key, label in labels.items():
        ratio = record["ratio_vs_tp1"][key]
        bounds = f" [{ratio['low']:.2f}, {ratio['high']:.2f}]" if ratio["low"] is not None else ""
        rows.append([label, *(number(record["summary"][n][key]["value"]) for n in names), f"{ratio['value']:.2f}x{bounds}"])
    header = ["", *(f"{n} ({record['threads'][n]} thread{'s' * (record['threads'][n] > 1)} per rank)" for n in names),
              f"{split} / tp1"]
    same = "the same" if record["same_greedy_tokens"] else "different"
    return (markdown_table(header, "l" + "r" * (len(names) + 1), rows)
            + f"\n{record['model']}; both gave {same} greedy tokens.\n" + source("tensor_parallel_qwen05.json", record))


@table("replicas")
def replicas_table(results: Path) -> str:
    """One replica against two behind round-robin and prefix-aware routing, on the shared-prefix workload."""
    record = load(results, "replicas_smollm2.json")
    rows = []
    for name, s in record["summary"].items():
        p50 = s["ttft_p50_s"]
        bounds = f" [{p50['low']:.2f}, {p50['high']:.2f}]" if p50["low"] is not None else ""
        rows.append([name, f"{s['prefix_hit_rate']:.0%}", f"{p50['value']:.2f} s{bounds}", f"{s['ttft_p99_s']:.2f} s",
                     number(s["output_tok_s"])])
    settings = record["settings"]
    note = (f"\n{record['model']}; {settings['requests']} requests from {settings['concurrency']} concurrent clients, "
            f"{settings['tenants']} system prompts of {settings['system_tokens']} tokens, {settings['output_tokens']} "
            f"output tokens each; each replica's KV pool {settings['kv_cache_memory_gb']} GiB; {settings['threads']} "
            "threads shared out between the replicas.\n")
    return (markdown_table(["", "prompt tokens from cache", "TTFT p50 [95% CI]", "TTFT p99", "output tok/s"], "lrrrr",
                           rows) + note + source("replicas_smollm2.json", record))


@table("compare")
def compare_table(results: Path, name: str) -> str:
    """Any `bench compare` record: each throughput/latency metric per configuration, as its mean and its ratio
    to the baseline with the ratio's 95% interval over the paired rounds."""
    record = load(results, f"{name}.json")
    configs = list(record["metrics"])
    keys = [k for k in record["metrics"][configs[0]] if k.endswith(("_tok_s", "_throughput"))]
    rows = []
    for key in keys:
        cells = [key.replace("_", " ")]
        for c in configs:
            value, ratio = record["metrics"][c].get(key), record["ratios"][c].get(key)
            bounds = record.get("ratio_ci95", {}).get(c, {}).get(key)
            text = number(value)
            if c != record["baseline"] and ratio is not None:
                text += f" ({ratio:.2f}x" + (f" [{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else "") + ")"
            cells.append(text)
        rows.append(cells)
    header = ["tokens/s", *[f"{c} (baseline)" if c == record["baseline"] else c for c in configs]]
    note = f"\n{record['rounds']} interleaved rounds; [95% interval of the ratio over the paired rounds].\n"
    return markdown_table(header, "l" + "r" * len(configs), rows) + note + source(f"{name}.json", record)


@table("tune")
def tune_table(results: Path, name: str) -> str:
    """An `effinfer tune` record: every candidate, its quality, its speed and why the search dropped it."""
    record = load(results, f"{name}.json")
    key = "request_latency_s" if record["workload"] == "latency" else "output_throughput"
    rows = []
    for row in record["candidates"]:
        speed = row["speed"].get(key)
        if speed is None:
            speed_text = "-"
        else:
            ci = speed["ci95"]
            unit = " s" if key == "request_latency_s" else ""
            speed_text = f"{speed['mean']:.3g}{unit}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
        ratio = row.get("speedup_vs_default")
        ratio_text = "-" if not ratio else f"{ratio['ratio']:.2f}x" + (
            f" [{ratio['ci95'][0]:.2f}, {ratio['ci95'][1]:.2f}]" if ratio["ci95"] else "")
        name_text = f"**{row['name']}**" if row["name"] == record["best"] else row["name"]
        outcome = row["dropped"] or ("chosen" if row["name"] == record["best"] else "reference" if row["name"] == "default"
                                     else "finalist" if row.get("stage") == "final" or ratio else "")
        rows.append([name_text, "-" if row["kl"] is None else f"{row['kl']:.4f}",
                     "-" if row["perplexity"] is None else f"{row['perplexity']:.2f}", speed_text,
                     "-" if row["name"] == "default" else ratio_text, outcome])
    what = "seconds per request (prefill + decode)" if key == "request_latency_s" else "output tokens/s"
    header = ["candidate", "KL vs bf16", "perplexity", what, "speed-up vs default", "outcome"]
    note = (f"\nBound: KL <= {record['max_kl']}; search time {record['elapsed_s'] / 60:.1f} min; winner in bold "
            f"(`{json.dumps(record['best_options'])}`).")
    versus = record.get("best_vs_runner_up")
    if versus:
        interval = f" [{versus['ci95'][0]:.2f}, {versus['ci95'][1]:.2f}]" if versus["ci95"] else ""
        note += (f" Against the runner-up ({versus['runner_up']}), paired over the final's rounds: "
                 f"{versus['ratio']:.2f}x{interval}" + (", a tie within the interval." if versus["tie"] else "."))
    note += "\n"
    return markdown_table(header, "lrrrrl", rows) + note + source(f"{name}.json", record)


@table("simulate_routing")
def simulate_routing_table(results: Path) -> str:
    """benchmarks/simulate_routing.py's record: each policy at each replica count, the router's limit, and the
    replica model replayed against measured records."""
    record = load(results, "simulate_routing.json")
    rows = [[f"{r['replicas']:,}", r["policy"], f"{r['hit_rate']:.0%}", f"{number(r['p50_ttft_ms'], 0)} ms",
             f"{number(r['p99_ttft_ms'], 0)} ms", number(r["output_tok_s_per_replica"]), f"{r['router_utilisation']:.1e}"]
            for r in record["runs"]]
    header = ["replicas", "policy", "prompt tokens from cache", "TTFT p50", "TTFT p99", "output tok/s per replica",
              "router utilisation"]
    rate = record["config"]["study"]["rate_per_replica"]
    routers = " ".join(f"{policy}: {s['cost_us_intercept']:.1f} + {s['cost_us_per_replica']:.4f} x replicas us per "
                       f"request, one router saturates at {s['saturation_replicas']:,.0f} replicas "
                       f"({s['saturation_replicas'] * rate:,.0f} requests/s)."
                       for policy, s in record["router_saturation"].items())
    checks = [[f"`{v['record']}` ({str(v.get('commit') or '-')[:10]})", v["configuration"], metric.replace("_", " "),
               _figure(m["measured"]), _figure(m["simulated"]), "-" if m["rel_error"] is None else f"{m['rel_error']:+.0%}"]
              for v in record["validation"] for metric, m in v["metrics"].items()]
    return (markdown_table(header, "rlrrrrr", rows)
            + f"\n{rate:g} requests/s per replica. Routing cost (measured) and the router's limit: {routers}\n\n"
            + markdown_table(["measured record (commit)", "configuration", "metric", "measured", "simulated", "error"],
                             "lllrrr", checks)
            + source("simulate_routing.json", record))


def _figure(value: float) -> str:
    """Three decimals below 10 (hit rates, seconds), one above."""
    return number(value, 3 if abs(value) < 10 else 1)
