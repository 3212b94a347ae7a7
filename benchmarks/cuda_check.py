"""The CUDA path, checked and timed on a GPU machine (no model files needed: random weights).

1. Correctness: tiny random Llama / Qwen2 / Gemma 3 folders; effinfer on the device against effinfer on
   the CPU (greedy tokens of a batch of prompts, both attention backends) and against transformers'
   logits on the device; int8 and int4 weights (dequantize-then-matmul off the CPU) against the CPU's
   packed kernels.
2. Speed: a SmolLM2-135M-shaped model with random weights, bf16 / int8 / int4: single-stream decode
   tokens/s and batched decode (64 requests x 128 tokens) output tokens/s.

    python benchmarks/cuda_check.py --out results/cuda_check.json [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from effinfer import LLM, SamplingParams  # noqa: E402
from effinfer.bench.provenance import RunProvenance, add_allow_dirty_arg  # noqa: E402
from tiny_models import save_tiny_folder  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 9], [100, 3, 3, 41, 77, 12, 8, 1, 9, 200, 31], [7], list(range(20, 60))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="cuda_check.json")
    add_allow_dirty_arg(p)
    args = p.parse_args()
    provenance = RunProvenance.begin(args.out, args.allow_dirty)
    record = {"benchmark": "cuda_check", **provenance.environment(), "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "correctness": {}, "speed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "qwen2", "gemma3"):
            folder = Path(tmp) / family
            folder.mkdir()
            hf = save_tiny_folder(family, folder)
            record["correctness"][family] = check_family(folder, hf, args.device)
            print(family, record["correctness"][family], flush=True)
        folder = Path(tmp) / "smollm2_shaped"
        make_smollm2_shaped(folder)
        for quant in (None, "int8", "int4"):
            record["speed"][quant or "bf16"] = measure_speed(folder, args.device, quant)
            print(quant or "bf16", record["speed"][quant or "bf16"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    ok = all(v is True for fam in record["correctness"].values() for k, v in fam.items() if k.endswith("_equal"))
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


def greedy(llm, n=12):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)]


def check_family(folder: Path, hf, device: str) -> dict:
    common = dict(dtype="float32", num_blocks=64, block_size=4, show_progress=False)
    cpu = greedy(LLM(str(folder), device="cpu", **common))
    out = {}
    for backend in ("torch_sdpa", "torch_ref"):
        out[f"tokens_{backend}_equal"] = greedy(LLM(str(folder), device=device, attention_backend=backend, **common)) == cpu
    llm = LLM(str(folder), device=device, **common)
    ids = PROMPTS[3]
    ours = llm.score(ids).float().cpu()
    with torch.no_grad():
        theirs = torch.log_softmax(hf.to(device)(torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()
    out["max_logprob_diff_vs_transformers"] = float((ours - theirs).abs().max())
    out["logprobs_vs_transformers_equal"] = out["max_logprob_diff_vs_transformers"] < 2e-3
    for quant in ("int8", "int4"):
        kw = dict(common, quantization=quant, group_size=32)
        a = LLM(str(folder), device="cpu", **kw).score(ids)
        b = LLM(str(folder), device=device, **kw).score(ids).cpu()
        out[f"{quant}_max_logprob_diff_cpu_vs_device"] = float((a - b).abs().max())
        out[f"{quant}_logprobs_equal"] = out[f"{quant}_max_logprob_diff_cpu_vs_device"] < 1e-2
    return out


def make_smollm2_shaped(folder: Path) -> None:
    import transformers
    from tiny_models import tiny_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   max_position_embeddings=2048, rope_theta=100000.0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))


def measure_speed(folder: Path, device: str, quant: str | None) -> dict:
    kw = {"quantization": quant} if quant else {}
    llm = LLM(str(folder), device=device, dtype="bfloat16", kv_cache_memory_gb=2.0, max_num_batched_tokens=2048,
              show_progress=False, **kw)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    list(llm.stream(list(range(1, 17)), params))      # warm-up
    times = []
    for out in llm.stream(list(range(1, 17)), params):
        sync()
        times.append(time.perf_counter())
    single = (len(times) - 1) / (times[-1] - times[0])
    prompts = [[(i * 7 + j) % 49000 + 1 for j in range(16)] for i in range(64)]
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    sync()
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    sync()
    batched = sum(len(r.token_ids) for r in results) / (time.perf_counter() - start)
    return {"single_stream_tok_s": single, "batched_64x128_out_tok_s": batched}


if __name__ == "__main__":
    main()
