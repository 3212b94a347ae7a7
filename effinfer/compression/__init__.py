"""Model-level compression: weight quantization (`quant/`) and pruning (`prune/`), as registered plug-ins."""
