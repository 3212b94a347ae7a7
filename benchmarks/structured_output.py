"""What structured output costs: JSON-schema-constrained decoding against unconstrained decoding of the same
prompts, the same number of tokens, in one process, at 1 and at 32 concurrent requests.

Each request asks for a list of people; the constrained one must write a JSON array of person objects (a schema
with required keys, an enum and bounded integers) whose minimum length it cannot reach within `--max-tokens`, so
both kinds generate exactly `--max-tokens` tokens. Rounds alternate which kind goes first; the record keeps the
median output tokens/s (prefill included) and the median time per output token after the first (TPOT) of each
kind, and their ratio (constrained / unconstrained: 1.0 costs nothing).

    .venv/bin/python benchmarks/structured_output.py --result-file benchmarks/results/structured_output.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "job"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string"}, "job": {"enum": ["engineer", "teacher", "doctor", "artist"]}}}
PEOPLE = {"type": "array", "items": PERSON, "minItems": 1000}


def run(llm, concurrency: int, max_tokens: int, constrained: bool) -> dict:
    from effinfer import SamplingParams
    from effinfer.sampling_params import StructuredOutputParams

    structured = StructuredOutputParams(json=json.dumps(PEOPLE)) if constrained else None
    prompts = [[{"role": "user", "content": f"List {i + 5} people as JSON with name, age, city and job."}]
               for i in range(concurrency)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, ignore_eos=True, structured=structured)
              for i in range(concurrency)]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    outputs = [r.outputs[0] for r in results]
    tokens = sum(len(o.token_ids) for o in outputs)
    if tokens != concurrency * max_tokens:
        sys.exit(f"expected {concurrency * max_tokens} tokens, got {tokens}: the comparison would not be like for like")
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.token_ids) - 1) for o in outputs]
    return {"output_tok_s": tokens / elapsed, "tpot_ms": statistics.median(tpot) * 1e3}


def main() -> int:
    from effinfer.bench.provenance import add_allow_dirty_arg

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled default model")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="compiled decode steps (default: LLM's default)")
    p.add_argument("--result-file", default=None)
    add_allow_dirty_arg(p)
    args = p.parse_args()
    from effinfer import LLM
    from effinfer.bench.provenance import RunProvenance
    from effinfer.bench.report import keep_record
    from effinfer.loader import catalog

    provenance = RunProvenance.begin(args.result_file, args.allow_dirty)
    model = args.model or str(catalog.pull(catalog.DEFAULT_MODEL))
    llm = LLM(model, **({"compile": True} if args.compile else {}))
    rows = []
    for concurrency in map(int, args.concurrency.split(",")):
        run(llm, concurrency, 8, False), run(llm, concurrency, 8, True)   # warm-up: both paths, the grammar cache
        samples = {False: [], True: []}
        for r in range(args.rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                samples[constrained].append(run(llm, concurrency, args.max_tokens, constrained))
        row = {"concurrency": concurrency}
        for constrained, name in ((False, "unconstrained"), (True, "json_schema")):
            for key in ("output_tok_s", "tpot_ms"):
                row[f"{name}_{key}"] = statistics.median(s[key] for s in samples[constrained])
        row["ratio_output_tok_s"] = row["json_schema_output_tok_s"] / row["unconstrained_output_tok_s"]
        row["ratio_tpot"] = row["unconstrained_tpot_ms"] / row["json_schema_tpot_ms"]
        rows.append(row)
        print(f"{concurrency:>3} concurrent: unconstrained {row['unconstrained_output_tok_s']:7.1f} tok/s "
              f"(TPOT {row['unconstrained_tpot_ms']:.1f} ms), JSON schema {row['json_schema_output_tok_s']:7.1f} tok/s "
              f"(TPOT {row['json_schema_tpot_ms']:.1f} ms): {row['ratio_output_tok_s']:.3f}x", flush=True)
    keep_record(args.result_file, "structured_output", {**vars(args), "model": model, "engine": llm.engine.summary},
                {"rows": rows}, provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
