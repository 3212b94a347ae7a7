"""`effinfer quantize` and `effinfer prune`: calibrated checkpoints (GPTQ and AWQ 4-bit, SmoothQuant W8A8)
and pruned ones, made by driving an engine on calibration text and saved to a folder that loads as a model.

The folder's format and its reader are in `effinfer/loader/checkpoint.py`; the math (GPTQ, AWQ, group
search, SmoothQuant scales) in `effinfer/compression/quant/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from effinfer.compression.quant.awq import awq_quantize
from effinfer.compression.quant.calibrate import LayerStats, calibration_windows, collect_stats, decoder_linears
from effinfer.compression.quant.gptq import GPTQOptions, gptq_quantize, reconstruction_error
from effinfer.compression.quant.weight_only import Int4Blocks, Int4WeightOnly
from effinfer.engine.offline import prepared_prompt
from effinfer.llm import LLM
from effinfer.loader.checkpoint import CONFIG_FILE, LOAD_AS
from effinfer.utils import progress

METHODS = tuple(LOAD_AS)


def quantize_calibrated(model: str, method: str, out_dir: str | Path, text: str, num_tokens: int = 8192,
                        window: int = 512, group_size: int = 32, gptq: GPTQOptions = GPTQOptions(),
                        cache_dir: str | None = None, show_progress: bool = True) -> dict:
    """Calibrate `model` on `text` and save the checkpoint to `out_dir` (GPTQ's settings in `gptq`)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibrated method {method!r}; choose from {', '.join(METHODS)}")
    start = time.perf_counter()
    llm = LLM(model, dtype="float32", quantization=None, cache_dir=cache_dir, show_progress=show_progress,
              kv_cache_memory_gb=0.25, max_num_batched_tokens=max(512, window))
    windows = calibration_windows(llm.tokenizer, text, num_tokens, window)
    config = {"quant_method": method, "load_as": LOAD_AS[method], "bits": 4, "group_size": group_size,
              "base_model": str(llm.engine.loaded.path), "calibration": {"windows": len(windows), "window": window},
              **({"gptq": asdict(gptq)} if method == "gptq" else {})}
    if method == "gptq" and gptq.sequential:
        tensors, errors = _gptq_layer_by_layer(llm, windows, group_size, gptq, show_progress)
        return _finish(out_dir, tensors, config, errors, start)
    stats = collect_stats(llm.engine.model, windows, llm.score, keep_hessian=method == "gptq",
                          show_progress=show_progress)
    net = llm.engine.model
    linears = decoder_linears(net)
    tensors: dict[str, torch.Tensor] = {}
    errors = {"rtn": 0.0, method: 0.0}
    if method == "smoothquant":
        return _save_smoothquant(llm, net, linears, stats, out_dir, windows, window, start, show_progress)
    if method == "awq":
        tensors.update(_apply_awq_scales(net, linears, stats, group_size, show_progress))
    rtn = Int4WeightOnly(group_size)
    for name, linear in progress(list(linears.items()), method, show_progress, unit="layer"):
        w, x = linear.weight.detach().float(), stats[name].sample_rows
        errors["rtn"] += reconstruction_error(w, rtn.quantize(w), x)
        if method == "gptq":
            blocks = gptq_quantize(w, stats[name].hessian, group_size, gptq.act_order, gptq.damp, gptq.groups)
        else:
            # the layer computes Q(W s) (x / s), with the 1/s already folded into its input's producer
            scale = getattr(linear, "input_scale", None)
            scale = torch.ones(w.shape[1]) if scale is None else scale
            blocks = awq_quantize(w, scale, group_size, stats[name].sq_sum)
            w, x = w * scale[None, :], x / scale
        errors[method] += reconstruction_error(w, blocks, x)
        tensors.update(_shard_tensors(net, name, blocks))
    return _finish(out_dir, tensors, config, errors, start)


def _finish(out_dir, tensors: dict, config: dict, errors: dict, start: float) -> dict:
    return {**_write_checkpoint(out_dir, tensors, {**config, "output_mse_sum": errors}),
            "seconds": time.perf_counter() - start}


def _gptq_layer_by_layer(llm, windows, group_size: int, gptq: GPTQOptions, show_progress: bool):
    """GPTQ in sequential order; returns the checkpoint tensors and the summed output errors (GPTQ and
    round-to-nearest, each layer scored on the inputs it gets in the quantized model)."""
    net, rtn = llm.engine.model, Int4WeightOnly(group_size)
    tensors: dict[str, torch.Tensor] = {}
    errors = {"rtn": 0.0, "gptq": 0.0}

    def quantize(name, linear, stats):
        w, x = linear.weight.detach().float(), stats.sample_rows
        blocks = gptq_quantize(w, stats.hessian, group_size, gptq.act_order, gptq.damp, gptq.groups)
        errors["rtn"] += reconstruction_error(w, rtn.quantize(w), x)
        errors["gptq"] += reconstruction_error(w, blocks, x)
        tensors.update(_shard_tensors(net, name, blocks))
        return blocks.dequantize()

    quantize_layer_by_layer(llm, windows, quantize, show_progress)
    return tensors, errors


QuantizeLinear = Callable[[str, nn.Linear, LayerStats], torch.Tensor]


@torch.no_grad()
def quantize_layer_by_layer(llm, windows: list[list[int]], quantize: QuantizeLinear,
                            show_progress: bool = True) -> None:
    """Quantize every decoder linear of `llm` (an unquantized engine) in GPTQ's sequential order.

    Layers in order, and inside a layer its linears in the order it calls them (q/k/v, o, gate/up,
    down): each linear's statistics (Hessian and sample rows) are gathered on inputs that passed through
    every linear quantized before it, then `quantize(name, linear, stats)` returns the quantized
    weight (as float values), which replaces it. Each window's hidden state is kept between layers, so the cost
    is about (linears per layer + 1) passes of the model, not one pass per layer."""
    if len({len(ids) for ids in windows}) != 1:
        raise ValueError("layer-by-layer calibration needs windows of one length")
    net = llm.engine.model
    # every window runs on the same blocks in turn: one set of positions, metadata and rotary tables
    with prepared_prompt(llm.engine, windows[0]) as (input_ids, positions, meta):
        hidden = [net.embed(torch.tensor(ids, dtype=torch.long, device=input_ids.device)) for ids in windows]
        ropes = net.rope_for_layer(positions, hidden[0].dtype)
        layers = list(enumerate(zip(net.model.layers, ropes)))
        for index, (layer, rope) in progress(layers, "quantize", show_progress, unit="layer"):
            for name, linear in _call_order(layer, lambda: layer(hidden[0], rope, meta)):
                stats = LayerStats(linear.in_features)
                hook = linear.register_forward_hook(lambda mod, args, out: stats.add(args[0], keep_hessian=True))
                try:
                    for h in hidden:
                        layer(h, rope, meta)
                finally:
                    hook.remove()
                linear.weight.copy_(quantize(f"model.layers.{index}.{name}", linear, stats))
            hidden = [layer(h, rope, meta) for h in hidden]


def _call_order(layer: nn.Module, run) -> list[tuple[str, nn.Linear]]:
    """The layer's linears in the order one forward pass (`run()`) calls them."""
    order = []
    linears = [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(lambda mod, args, item=(name, m): order.append(item)) for name, m in linears]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def _save_smoothquant(llm, net, linears, stats, out_dir, windows, window, start, show_progress) -> dict:
    """Fold SmoothQuant's scales into producers and weights; save the changed float tensors (bf16)."""
    from effinfer.compression.quant.w8a8 import smooth_scales

    tensors = _fold_input_scales(net, linears, lambda name, w: smooth_scales(stats[name].abs_max, w), show_progress)
    for name, linear in linears.items():
        if getattr(linear, "input_scale", None) is not None:
            linear.weight.data *= linear.input_scale[None, :].to(linear.weight.dtype)
    for name, linear in linears.items():    # every linear: some were changed as producers of another's input
        tensors.update(_shard_float(net, name, linear.weight.data))
    config = {"quant_method": "smoothquant", "load_as": "w8a8", "bits": 8, "group_size": 32, "alpha": 0.5,
              "base_model": str(llm.engine.loaded.path), "calibration": {"windows": len(windows), "window": window},
              "output_mse_sum": {}}
    return {**_write_checkpoint(out_dir, _bf16(tensors), config), "seconds": time.perf_counter() - start}


def _shard_rows(net, module_name: str):
    """(HF weight name, row slice) of each checkpoint tensor a (fused) linear layer holds."""
    row = 0
    for hf_name, rows in net.checkpoint_shards(module_name):
        yield hf_name, slice(row, row + rows)
        row += rows


def _shard_float(net, module_name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {hf_name: weight[rows] for hf_name, rows in _shard_rows(net, module_name)}


def _bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in tensors.items()}


def _write_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> dict:
    """model.safetensors + effinfer_quant.json in `out_dir`; returns the config with the folder's path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = {**config, "made_by": made_by(out / "model.safetensors")}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return {**config, "path": str(out)}


def made_by(weights: Path) -> dict:
    """What made a checkpoint, kept in it: a record that measures the checkpoint can name how to make it again."""
    from datetime import datetime, timezone

    from effinfer.bench.provenance import command_line, file_sha256, git_state, versions

    return {"command": command_line(), **git_state().to_dict(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "weights_sha256": file_sha256(weights)}


def _apply_awq_scales(net, linears: dict, stats: dict, group_size: int, show_progress: bool) -> dict:
    """Search each layer's input scale and fold its inverse into the producer; returns changed tensors."""
    from effinfer.compression.quant.awq import search_scale

    def scale_of(name, w):
        return search_scale(w, stats[name].mean_abs, stats[name].sample_rows, group_size)[0]

    return _fold_input_scales(net, linears, scale_of, show_progress)


def _fold_input_scales(net, linears: dict, scale_of, show_progress: bool) -> dict:
    """For each layer whose input's producer can absorb it, s = scale_of(name, W): divide the producer's
    output by s (a norm's weight, or rows of the previous linear) and record s as `input_scale`; the
    caller multiplies W by s. Returns the float tensors changed (norms)."""
    changed = {}
    cfg = net.config
    for name, linear in progress(list(linears.items()), "input scales", show_progress, unit="layer"):
        producer = _producer(net, name, cfg)
        if producer is None:
            continue
        s = scale_of(name, linear.weight.detach().float())
        kind, module, rows = producer
        if kind == "norm":
            gemma = type(module).__name__.startswith("Gemma")
            new = (1 + module.weight.float()) / s - 1 if gemma else module.weight.float() / s
            module.weight.data.copy_(new)
            changed[f"{_module_name(net, module)}.weight"] = new
        else:   # rows of the previous linear (up rows for down_proj, v rows for o_proj)
            module.weight.data[rows] /= s[:, None].to(module.weight.dtype)
        linear.input_scale = s
    return changed


def _producer(net, name: str, cfg):
    """What makes this layer's input: ("norm", norm module, None) or ("rows", linear, row slice)."""
    layer = net.model.layers[int(name.split(".")[2])]
    if name.endswith("qkv_proj"):
        return "norm", layer.input_layernorm, None
    if name.endswith("gate_up_proj"):
        return "norm", getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm), None
    if name.endswith("down_proj"):
        inter = cfg.intermediate_size
        return "rows", layer.mlp.gate_up_proj, slice(inter, 2 * inter)
    if name.endswith("o_proj") and cfg.num_heads == cfg.num_kv_heads and not hasattr(layer.self_attn, "q_norm"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return "rows", layer.self_attn.qkv_proj, slice(q + kv, q + 2 * kv)
    return None


def _module_name(net, module) -> str:
    return next(n for n, m in net.named_modules() if m is module)


def _shard_tensors(net, module_name: str, blocks: Int4Blocks) -> dict[str, torch.Tensor]:
    out = {}
    for hf_name, rows in _shard_rows(net, module_name):
        part = blocks.map_rows(lambda t: t[rows])
        base = hf_name.removesuffix(".weight")
        out.update({f"{base}.qvalues": part.q, f"{base}.scale": part.scale, f"{base}.minimum": part.minimum})
    return out


def save_pruned(llm, out_dir: str | Path, report: dict) -> dict:
    """A pruned model (unstructured methods: same shapes) saved as a checkpoint of its changed linears."""
    net = llm.engine.model
    tensors = {}
    for name, linear in decoder_linears(net).items():
        tensors.update(_shard_float(net, name, linear.weight.data))
    config = {"quant_method": "pruned", "load_as": "none", "group_size": 32, "prune": report,
              "base_model": str(llm.engine.loaded.path)}
    return _write_checkpoint(out_dir, _bf16(tensors), config)
