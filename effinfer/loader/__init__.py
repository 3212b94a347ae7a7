"""Checkpoints in: catalog pulls, GGUF and safetensors readers, tokenizers. Builds no model itself."""
