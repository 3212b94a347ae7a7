"""Tier 3: offline pipelines that drive an engine through the facade (`LLM`) and write what they make to disk:
`quantize` (GPTQ / AWQ / SmoothQuant checkpoints, pruned checkpoints), `distill` (draft students, early-exit heads).
Their math lives with the run-time plug-in it feeds (compression/quant/gptq.py, awq.py, ...)."""
