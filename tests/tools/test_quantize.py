"""GPTQ and AWQ on real weights: lower layer output error than round-to-nearest, and a checkpoint that
saves, loads back unchanged and runs."""

from __future__ import annotations

import json

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.bench.provenance import file_sha256, git_state
from effinfer.compression.quant.awq import search_scale
from effinfer.compression.quant.calibrate import calibration_windows, collect_stats, decoder_linears
from effinfer.compression.quant.gptq import GPTQOptions, gptq_quantize, reconstruction_error
from effinfer.compression.quant.group_search import group_params, mixed_params, quantize_groups
from effinfer.compression.quant.weight_only import Int4Blocks, Int4WeightOnly, min_max_params
from effinfer.layers.linear import QuantLinear
from effinfer.tools.quantize import quantize_calibrated, quantize_layer_by_layer
from tiny_models import VOCAB, save_tiny_folder

TEXT = " ".join(
    f"Section {i}. The committee met on day {i * 3} to discuss the harbour, the railway and the new school; "
    f"members argued that taxes of {i * 7} percent would pay for {i + 2} bridges, while others wanted parks."
    for i in range(60))
GROUP = 64      # SmolLM2's file is Q4_1 (groups of 32), so 32-wide round-to-nearest is already near exact


@pytest.fixture(scope="module")
def calibrated(smollm2_path):
    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1)
    windows = calibration_windows(llm.tokenizer, TEXT, 1024, 256)
    return llm, collect_stats(llm.engine.model, windows, llm.score, keep_hessian=True, show_progress=False)


@pytest.mark.parametrize("layer", ["model.layers.2.self_attn.qkv_proj", "model.layers.20.mlp.down_proj"])
@pytest.mark.parametrize("act_order,groups", [(False, "mixed"), (True, "mixed"), (True, "minmax"), (False, "search")])
def test_gptq_beats_round_to_nearest_on_layer_outputs(calibrated, layer, act_order, groups):
    llm, stats = calibrated
    w = decoder_linears(llm.engine.model)[layer].weight.float()
    x = stats[layer].sample_rows
    gptq = gptq_quantize(w, stats[layer].hessian, GROUP, act_order, groups=groups)
    rtn = Int4WeightOnly(GROUP).quantize(w)
    assert gptq.q.max() <= 15 and gptq.scale.shape == rtn.scale.shape
    assert reconstruction_error(w, gptq, x) < 0.8 * reconstruction_error(w, rtn, x)
    if act_order and groups == "minmax":        # static groups: each group's range in the original weight
        torch.testing.assert_close((gptq.scale, gptq.minimum), (rtn.scale, rtn.minimum))


def test_gptq_options_name_bad_settings():
    with pytest.raises(ValueError, match="groups must be one of mixed, minmax, search"):
        GPTQOptions(groups="median")
    with pytest.raises(ValueError, match="damp"):
        GPTQOptions(damp=0)


def test_group_search_never_loses_to_min_max_and_follows_importance():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256))          # heavy tails: outliers set min..max
    importance = torch.rand(256) ** 4
    rtn, searched = Int4WeightOnly(64).quantize(w), quantize_groups(w, 64, importance)
    assert searched.q.dtype == torch.uint8 and searched.q.max() <= 15

    def group_errors(blocks, weight):
        return (weight * (w - blocks.dequantize()) ** 2).view(64, -1, 64).sum(-1)

    assert torch.all(group_errors(searched, importance) <= group_errors(rtn, importance) * (1 + 1e-5) + 1e-9)
    assert group_errors(searched, importance).sum() < 0.7 * group_errors(rtn, importance).sum()
    salient = torch.full((256,), 0.01)
    salient[::64] = 1.0                                                   # one column per group matters
    column_error = (w - quantize_groups(w, 64, salient).dequantize())[:, ::64].pow(2).mean()
    assert column_error < 0.5 * (w - quantize_groups(w, 64).dequantize())[:, ::64].pow(2).mean()


def test_mixed_groups_search_only_where_it_pays():
    """Smooth groups keep their min..max; groups where one column matters take the searched parameters."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    importance = torch.ones(256)
    importance[128::64] = 1000.0                                          # groups 2 and 3: one salient column
    scale, minimum = mixed_params(w, 64, importance)
    range_scale, range_min = min_max_params(w.view(64, -1, 64))
    searched_scale, _ = group_params(w, 64, importance)
    assert torch.equal(scale[:, :2], range_scale[:, :2]) and torch.equal(minimum[:, :2], range_min[:, :2])
    assert (scale[:, 2:] == searched_scale[:, 2:]).float().mean() > 0.75
    mixed = Int4Blocks(torch.round((w.view(64, -1, 64) - minimum[..., None]) / scale[..., None]).clamp(0, 15)
                       .view(64, 256).to(torch.uint8), scale, minimum, 64)
    salient_error = (w - mixed.dequantize())[:, 128::64].pow(2).mean()
    assert salient_error < 0.5 * (w - Int4WeightOnly(64).quantize(w).dequantize())[:, 128::64].pow(2).mean()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layer_by_layer_statistics_come_through_the_quantized_layers(tmp_path, family):
    """Each linear's Hessian in the walk must be what the finished (quantized) model feeds it: equal to
    a plain pass over the quantized model, and no longer the float model's after the first linear."""
    save_tiny_folder(family, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", show_progress=False, kv_cache_memory_gb=0.02)
    windows = [[(7 * i + 13 * j) % VOCAB for j in range(40)] for i in range(3)]
    before = collect_stats(llm.engine.model, windows, llm.score, keep_hessian=True, show_progress=False)
    walked = {}

    def round_to_nearest(name, linear, stats):
        walked[name] = stats.hessian
        return Int4WeightOnly(32).quantize(linear.weight.float()).dequantize()

    free_blocks = llm.engine.block_manager.num_free_blocks
    quantize_layer_by_layer(llm, windows, round_to_nearest, show_progress=False)
    assert llm.engine.block_manager.num_free_blocks == free_blocks        # the window's blocks went back
    after = collect_stats(llm.engine.model, windows, llm.score, keep_hessian=True, show_progress=False)
    assert list(walked) == [f"model.layers.{i}.{part}" for i in range(len(llm.engine.model.model.layers))
                            for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    for name, hessian in walked.items():
        torch.testing.assert_close(hessian, after[name].hessian, rtol=1e-4, atol=1e-4)
    first, *rest = walked
    torch.testing.assert_close(walked[first], before[first].hessian, rtol=1e-4, atol=1e-4)
    assert all(not torch.allclose(walked[name], before[name].hessian, rtol=1e-3, atol=1e-3) for name in rest)
    with pytest.raises(ValueError, match="one length"):
        quantize_layer_by_layer(llm, [windows[0], windows[1][:20]], round_to_nearest, show_progress=False)
    with pytest.raises(ValueError, match="1 to"):
        quantize_layer_by_layer(llm, [windows[0] * 1000], round_to_nearest, show_progress=False)
    assert llm.engine.block_manager.num_free_blocks == free_blocks


def test_awq_scales_beat_round_to_nearest_on_layer_outputs(calibrated):
    llm, stats = calibrated
    better = 0
    for layer in ("model.layers.2.self_attn.qkv_proj", "model.layers.10.mlp.gate_up_proj", "model.layers.20.mlp.down_proj"):
        w, s_ = decoder_linears(llm.engine.model)[layer].weight.float(), stats[layer]
        scale, alpha = search_scale(w, s_.mean_abs, s_.sample_rows, GROUP)
        awq = Int4WeightOnly(GROUP).quantize(w * scale[None, :])
        err_awq = float(((s_.sample_rows @ w.t() - (s_.sample_rows / scale) @ awq.dequantize().t()) ** 2).mean())
        err_rtn = reconstruction_error(w, Int4WeightOnly(GROUP).quantize(w), s_.sample_rows)
        assert err_awq <= err_rtn
        better += alpha > 0 and err_awq < 0.95 * err_rtn
    assert better >= 2


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_saves_and_loads_back(smollm2_path, tmp_path, method):
    # act-order: static groups, one group search per layer (without it, one per group: 3x the time here)
    report = quantize_calibrated(str(smollm2_path), method, tmp_path / method, TEXT, num_tokens=512, window=256,
                                 group_size=GROUP, gptq=GPTQOptions(act_order=True), show_progress=False)
    errors = report["output_mse_sum"]
    assert errors[method] < errors["rtn"]
    made_by = json.loads((tmp_path / method / "effinfer_quant.json").read_text())["made_by"]
    assert made_by["weights_sha256"] == file_sha256(tmp_path / method / "model.safetensors")
    assert made_by["commit"] == git_state().commit and made_by["command"] and made_by["versions"]["torch"]
    llm = LLM(str(tmp_path / method), dtype="float32", show_progress=False, kv_cache_memory_gb=0.1)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 30 * 4 + 1 and all(m.method.group_size == GROUP for m in layers[:-1])
    from safetensors import safe_open

    with safe_open(str(tmp_path / method / "model.safetensors"), framework="pt") as f:   # loaded as saved
        q = f.get_tensor("model.layers.0.self_attn.k_proj.qvalues")
        scale, minimum = f.get_tensor("model.layers.0.self_attn.k_proj.scale"), f.get_tensor("model.layers.0.self_attn.k_proj.minimum")
    saved = (q.float().view(q.shape[0], -1, GROUP) * scale[..., None] + minimum[..., None]).view(q.shape)
    qkv = llm.engine.model.model.layers[0].self_attn.qkv_proj
    loaded = qkv.method.dequantize(qkv)[576:576 + 192]
    # exact on PyTorch's int4 layout; effinfer's kernel keeps scale and minimum in fp16 (half an ulp each)
    fp16_rounding = ((15 * scale.abs() + minimum.abs()) * 2 ** -11 + 1e-6).repeat_interleave(GROUP, dim=1)
    assert torch.all((loaded - saved).abs() <= fp16_rounding)
    text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0].text
    assert "Paris" in text
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(tmp_path / method), quantization="int8", show_progress=False)


def test_smoothquant_checkpoint_runs_w8a8(smollm2_path, tmp_path):
    from effinfer.bench import quality
    from effinfer.compression.quant.w8a8 import W8A8

    quantize_calibrated(str(smollm2_path), "smoothquant", tmp_path / "sq", TEXT, num_tokens=512, window=256,
                        show_progress=False)
    sq = LLM(str(tmp_path / "sq"), dtype="float32", show_progress=False, kv_cache_memory_gb=0.1)
    assert isinstance(sq.engine.model.model.layers[0].mlp.down_proj.method, W8A8)
    base = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.1)
    wins = quality.windows(base.tokenizer.encode(TEXT), 256, 256)      # 256-token chunks: the int8 GEMM path
    assert quality.perplexity(sq, wins)["perplexity"] < 1.1 * quality.perplexity(base, wins)["perplexity"]
