"""Reading the checkpoints that `effinfer quantize` and `effinfer prune` write (effinfer/tools/quantize.py).

A checkpoint is a folder: `effinfer_quant.json` (method, bits, group size, the base model it was made
from, calibration settings) and `model.safetensors` holding, per HF weight name, the 4-bit values
(`<name>.qvalues`, one per byte), `<name>.scale` and `<name>.minimum` per group, plus any float
tensor the method changed (AWQ's and SmoothQuant's norms; SmoothQuant's smoothed weights, which the
W8A8 layers quantize per channel at load). Loading reads the base model's other tensors, its config
and tokenizer, and feeds the 4-bit values to the int4 layers unchanged (no rounding on the way).
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "effinfer_quant.json"
LOAD_AS = {"gptq": "int4", "awq": "int4", "smoothquant": "w8a8"}
"""Calibrated method -> the quantization method its layers load as (`load_as` in the config file)."""


def is_quantized_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_config(path: Path) -> dict:
    return json.loads((path / CONFIG_FILE).read_text())


def iter_checkpoint_weights(path: Path, base_weights, group_size: int):
    """The base model's tensors with the checkpoint's 4-bit layers and changed tensors in their place."""
    from safetensors import safe_open

    from effinfer.compression.quant.weight_only import Int4Blocks   # here: reading the config needs no torch

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, tensor in base_weights:
            base = name.removesuffix(".weight")
            if f"{base}.qvalues" in keys:
                yield name, Int4Blocks(f.get_tensor(f"{base}.qvalues"), f.get_tensor(f"{base}.scale"),
                                       f.get_tensor(f"{base}.minimum"), group_size)
            elif name in keys:
                yield name, f.get_tensor(name)
            else:
                yield name, tensor
