"""effinfer against Hugging Face transformers `generate()` on the same GGUF model, in one run.

Measures, for each dtype: prefill tokens/s on a 512-token prompt, single-stream decode tokens/s over
128 tokens, batched decode throughput (64 short prompts x 128 tokens), and offline throughput for 64
requests with mixed prompt lengths (ShareGPT-like, seeded) x 128 output tokens. transformers runs the
batches as static left-padded batches. Warm-up runs are excluded. Also reports the memory bandwidth
achieved by single-stream decode (bytes of weights + KV read per token x tokens/s) and the ceiling set
by PyTorch's own matmuls over the model's weight shapes (the per-token overhead is the gap).

    python benchmarks/engine_vs_transformers.py --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from effinfer import LLM, SamplingParams
from effinfer.bench.offline import measure_bandwidth
from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-valid.tokens.txt"


def main() -> None:
    args = parse_args()
    provenance = RunProvenance.begin(args.out, args.allow_dirty)
    torch.set_num_threads(args.threads)
    record = {"benchmark": "engine_vs_transformers", **provenance.environment(args.seed), "model": args.model,
              "transformers": transformers_version(), "results": {},
              "machine_bandwidth_gb_s": measure_bandwidth()}
    for dtype in args.dtypes.split(","):
        # prefix caching off: every run computes its whole prompt, as transformers does
        llm = LLM(args.model, dtype=dtype, max_num_seqs=64, max_num_batched_tokens=2048,
                  enable_prefix_caching=False, show_progress=False)
        workload = make_workload(llm.tokenizer, args)
        ours = measure_effinfer(llm, workload, args)
        ours["resolved_config"] = llm.config.to_dict()
        theirs = measure_transformers(llm.engine.loaded.path, dtype, workload, args) if not args.skip_hf else {}
        record["results"][dtype] = {"effinfer": ours, "transformers": theirs,
                                    "ratios": {k: ours[k] / theirs[k] for k in theirs if k in ours and theirs[k]}}
        del llm
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print_table(record)
    print(f"\nJSON record: {out}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default="benchmarks/results/engine_vs_transformers.json")
    add_allow_dirty_arg(p)
    return p.parse_args()


def make_workload(tokenizer, args) -> dict:
    ids = tokenizer.encode(TEXT.read_text()[:400_000], add_special_tokens=False)
    rng = random.Random(args.seed)
    # ShareGPT-like prompt lengths: log-normal with median ~100 tokens, clipped to [8, 512]
    lengths = [min(512, max(8, int(rng.lognormvariate(4.6, 0.8)))) for _ in range(args.num_requests)]
    starts = [rng.randrange(0, len(ids) - 1100) for _ in lengths]
    return {
        "prefill": [ids[1000 + r: 1000 + r + args.prefill_len] for r in range(args.repeats + 1)],
        "single": ids[50_000:50_016],
        "short": [ids[s:s + 16] for s in starts],
        "mixed": [ids[s:s + n] for s, n in zip(starts, lengths)],
        "mixed_prompt_tokens": sum(lengths),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_effinfer(llm, w, args) -> dict:
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    run = lambda prompts, n: llm.generate(prompts, greedy(n), use_tqdm=False)  # noqa: E731
    run([w["prefill"][0]], 1)                                  # warm-up
    prefill = [args.prefill_len / timed(lambda p=p: run([p], 1)) for p in w["prefill"][1:]]
    decode = [(args.output_len - 1) / decode_time(llm, w["single"], args.output_len) for _ in range(args.repeats)]
    batched = args.num_requests * args.output_len / timed(lambda: run(w["short"], args.output_len))
    mixed_time = timed(lambda: run(w["mixed"], args.output_len))
    cfg = llm.engine.loaded.config
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=llm.engine.dtype).element_size()
    mean_context = len(w["single"]) + args.output_len / 2
    decode_mean = statistics.mean(decode)
    return {
        "prefill_tok_s": statistics.mean(prefill), "prefill_tok_s_std": statistics.pstdev(prefill),
        "decode_tok_s": decode_mean, "decode_tok_s_std": statistics.pstdev(decode),
        "batched_decode_tok_s": batched,
        "offline_output_tok_s": args.num_requests * args.output_len / mixed_time,
        "offline_total_tok_s": (args.num_requests * args.output_len + w["mixed_prompt_tokens"]) / mixed_time,
        "offline_req_s": args.num_requests / mixed_time,
        "decode_bandwidth_gb_s": (weight_bytes + kv_bytes_per_token * mean_context) * decode_mean / 1e9,
        "matmul_ceiling_tok_s": matmul_ceiling(llm.engine.model),
    }


def decode_time(llm, prompt, n) -> float:
    """Time from the first output token to the last, i.e. decode only (prefill excluded)."""
    first = last = None
    for _ in llm.stream(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
        last = time.perf_counter()
        first = first or last
    return last - first


def matmul_ceiling(model) -> float:
    """Tokens/s if a decode step were only its `F.linear` calls at batch 1 (weights read once each)."""
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in linears]
    chain = lambda: [torch.nn.functional.linear(x, w) for x, w in zip(inputs, linears)]  # noqa: E731
    chain()
    return 5 / timed(lambda: [chain() for _ in range(5)])


def measure_transformers(path: Path, dtype: str, w, args) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    gen = lambda ids, mask, n: model.generate(  # noqa: E731
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        gen(*left_pad([w["prefill"][0]]), 1)
        prefill = [args.prefill_len / timed(lambda p=p: gen(*left_pad([p]), 1)) for p in w["prefill"][1:]]
        single = left_pad([w["single"]])
        decode = []
        for _ in range(args.repeats):
            t_first = timed(lambda: gen(*single, 1))
            decode.append((args.output_len - 1) / (timed(lambda: gen(*single, args.output_len)) - t_first))
        batched = args.num_requests * args.output_len / timed(lambda: gen(*left_pad(w["short"]), args.output_len))
        mixed_time = timed(lambda: gen(*left_pad(w["mixed"]), args.output_len))
    return {
        "prefill_tok_s": statistics.mean(prefill), "decode_tok_s": statistics.mean(decode),
        "batched_decode_tok_s": batched, "offline_output_tok_s": args.num_requests * args.output_len / mixed_time,
        "offline_total_tok_s": (args.num_requests * args.output_len + w["mixed_prompt_tokens"]) / mixed_time,
    }


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def print_table(record: dict) -> None:
    keys = ["prefill_tok_s", "decode_tok_s", "batched_decode_tok_s", "offline_output_tok_s", "offline_total_tok_s"]
    print(f"\n{'dtype':<9} {'metric':<22} {'effinfer':>10} {'transformers':>13} {'ratio':>7}")
    for dtype, r in record["results"].items():
        for k in keys:
            theirs = r["transformers"].get(k)
            ratio = r["ratios"].get(k)
            print(f"{dtype:<9} {k:<22} {r['effinfer'][k]:>10.1f} {theirs or float('nan'):>13.1f} "
                  f"{ratio or float('nan'):>6.2f}x")
        e = r["effinfer"]
        print(f"{dtype:<9} decode bandwidth {e['decode_bandwidth_gb_s']:.1f} GB/s (machine, measured in this run: "
              f"{record['machine_bandwidth_gb_s']:.1f} GB/s); "
              f"matmul-only ceiling {e['matmul_ceiling_tok_s']:.0f} tok/s")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
