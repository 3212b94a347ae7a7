"""Tiny random-weight HF models of each supported family, and a word-level tokenizer to go with them."""

from __future__ import annotations

import torch
import transformers

VOCAB = 256


def tiny_hf_config(family: str, num_layers: int | None = None):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=512)
    if family == "llama":
        return transformers.LlamaConfig(num_hidden_layers=num_layers or 2, num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_theta=10000.0, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=num_layers or 2, num_key_value_heads=2, **common)
    if family == "gemma3":
        types = ["sliding_attention", "sliding_attention", "full_attention"] if num_layers is None else None
        return transformers.Gemma3TextConfig(
            num_hidden_layers=num_layers or 3, num_key_value_heads=1, head_dim=32, sliding_window=8,
            query_pre_attn_scalar=32, layer_types=types, **common)
    raise ValueError(family)


def tiny_hf_model(family: str, seed: int = 0, num_layers: int | None = None):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, num_layers)).eval().float()
    with torch.no_grad():  # random norms and biases so that every weight matters in the comparison
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny_folder(family: str, folder, num_layers: int | None = None) -> transformers.PreTrainedModel:
    """A complete HF folder: config.json, model.safetensors, tokenizer.json."""
    model = tiny_hf_model(family, num_layers=num_layers)
    model.save_pretrained(folder)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok
