"""Pruning: masks with the promised structure, Wanda better than magnitude at 50%, structured removal
that really shrinks the model and still runs."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from effinfer import LLM, SamplingParams
from effinfer.bench import quality
from effinfer.compression.prune import PRUNE_METHODS
from effinfer.compression.prune.ops import row_mask, two_four_mask
from helpers import make_engine
from tiny_models import VOCAB, save_tiny_folder

TEXT = " ".join(
    f"In the year {1800 + i} the town of Elm built a {['mill', 'bridge', 'school', 'church'][i % 4]} by the river, "
    f"and {i + 3} families moved there to work in the fields and trade wool at the market every week."
    for i in range(80))


def test_masks():
    score = torch.rand(6, 16)
    mask = row_mask(score, 0.25)
    assert (mask.sum(1) == 12).all()
    for row in range(6):
        assert score[row][~mask[row]].max() <= score[row][mask[row]].min()
    two_four = two_four_mask(score)
    assert (two_four.view(6, 4, 4).sum(-1) == 2).all()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


def _engine(loaded, **prune) -> LLM:
    """An engine on a copy of the loaded fp32 model (pruning changes the weights in place), its KV cache
    sized from memory as `LLM(path, ...)` would."""
    model = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    return LLM.from_engine(make_engine(model, num_blocks=None, kv_cache_memory_gb=0.05, **prune))


def _ppl(llm, text):
    wins = quality.windows(llm.tokenizer.encode(text), 256, 256)
    return quality.perplexity(llm, wins)["perplexity"]


def test_wanda_beats_magnitude_at_half_sparsity(smollm2_fp32, calib_file):
    eval_text = " ".join(f"On day {i} the ship sailed north past {i + 4} islands, where fishermen sold cod "
                         f"and the captain wrote letters home about the weather." for i in range(40))
    magnitude = _engine(smollm2_fp32, prune="magnitude", sparsity=0.5)
    wanda = _engine(smollm2_fp32, prune="wanda", sparsity=0.5, prune_calibration_text=str(calib_file))
    assert magnitude.prune_report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert wanda.prune_report["sparsity"] == pytest.approx(0.5, abs=0.01)
    w = wanda.engine.model.model.layers[3].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert _ppl(wanda, eval_text) < _ppl(magnitude, eval_text)


def test_layer_removal_shrinks_the_model_and_runs(smollm2_fp32, calib_file):
    full = _engine(smollm2_fp32)
    pruned = _engine(smollm2_fp32, prune="layers", sparsity=0.2, prune_calibration_text=str(calib_file))
    report = pruned.prune_report
    assert len(report["removed_layers"]) == 6 and len(pruned.engine.model.model.layers) == 24
    assert 0 not in report["removed_layers"]            # the first layer transforms most: never the least influential
    # the same KV memory now holds more blocks (fewer layers per block)
    assert pruned.engine.block_manager.num_blocks > full.engine.block_manager.num_blocks * 1.2
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = pruned.generate(["The capital of France is"], params, use_tqdm=False)
    assert len(out[0].token_ids) == 6


def test_mlp_channel_removal_shrinks_matrices(smollm2_fp32, calib_file):
    pruned = _engine(smollm2_fp32, prune="mlp_channels", sparsity=0.25, prune_calibration_text=str(calib_file))
    mlp = pruned.engine.model.model.layers[5].mlp
    assert mlp.down_proj.weight.shape == (576, 1152) and mlp.gate_up_proj.weight.shape == (2304, 576)
    assert _ppl(pruned, TEXT) < 200


def test_bad_pruning_settings_are_named(smollm2_path):
    with pytest.raises(ValueError, match="needs prune_calibration_text"):
        LLM(str(smollm2_path), prune="wanda")
    with pytest.raises(ValueError, match="sparsity=1.5"):
        LLM(str(smollm2_path), prune="magnitude", sparsity=1.5)
    with pytest.raises(ValueError, match="unquantized model"):
        LLM(str(smollm2_path), prune="magnitude", quantization="int8", show_progress=False)


def test_prune_command_saves_a_checkpoint_that_loads(smollm2_path, calib_file, tmp_path):
    from effinfer.cli import main

    assert main(["prune", str(smollm2_path), "--method", "wanda", "--sparsity", "0.5", "--calib-text",
                 str(calib_file), "--out", str(tmp_path / "pruned")]) == 0
    llm = LLM(str(tmp_path / "pruned"), dtype="float32", show_progress=False, kv_cache_memory_gb=0.05)
    w = llm.engine.model.model.layers[4].self_attn.qkv_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", sorted(PRUNE_METHODS))
def test_every_registered_method_prunes_and_still_generates(name, tmp_path):
    """Any method in the table, on a tiny model: an unstructured one zeroes half the decoder's weights, a
    structured one leaves fewer parameters; the pruned model still generates."""
    save_tiny_folder("llama", tmp_path, num_layers=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{(i * 7) % VOCAB}" for i in range(2048)))
    options = {"prune_calibration_text": str(calib)} if PRUNE_METHODS[name].needs_calibration else {}
    plain = LLM(str(tmp_path), dtype="float32", show_progress=False, kv_cache_memory_gb=0.01)
    llm = LLM(str(tmp_path), dtype="float32", show_progress=False, kv_cache_memory_gb=0.01, prune=name,
              sparsity=0.5, prune_calibration_tokens=512, **options)
    assert llm.prune_report["method"] == name
    weights = [m.weight for m in llm.engine.model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    size = lambda x: sum(p.numel() for p in x.engine.model.parameters())  # noqa: E731
    if PRUNE_METHODS[name].structured:
        assert size(llm) < size(plain)
    else:
        assert zeros == pytest.approx(0.5, abs=0.01)
    out = llm.generate("w1 w2 w3", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
