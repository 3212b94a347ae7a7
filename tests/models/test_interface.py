"""Every registered architecture builds a model that has the declared interface (models/interface.py), and
the one decoder loop runs a layer subset or stops where `after_layer` says, as documented."""

from __future__ import annotations

import pytest
import torch

from effinfer.engine.kv_cache import allocate_kv_cache
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.loader.arch_config import FULL_ATTENTION, SLIDING_ATTENTION, ArchConfig
from effinfer.models import registry
from effinfer.models.interface import CausalLM, DecoderLayer, DecoderStack

BLOCK = 4
LAYER_TYPES = [SLIDING_ATTENTION, FULL_ATTENTION, SLIDING_ATTENTION]


def tiny_model(architecture: str) -> torch.nn.Module:
    """A random-weight 3-layer model of `architecture`, fp32 on the CPU, with its KV cache bound."""
    cfg = ArchConfig(architecture=architecture, vocab_size=256, hidden_size=64, intermediate_size=96,
                     num_layers=len(LAYER_TYPES), num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     rope_theta=10000.0, max_position_embeddings=512, sliding_window=8, layer_types=LAYER_TYPES,
                     rope_local_theta=1000.0)
    torch.manual_seed(0)
    model = registry.get_model_class(architecture)(cfg).eval()
    allocate_kv_cache(model, 16, BLOCK, torch.float32, "cpu")
    return model


@pytest.fixture(scope="module", params=registry.supported_architectures())
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def step(model):
    """A packed step: a 9-token prompt and a 3-token one."""
    seqs = [ScheduledSeq(list(range(10, 19)), 0, [0, 1, 2]), ScheduledSeq([40, 41, 42], 0, [5])]
    input_ids, positions, meta, _ = ModelRunner(model, BLOCK, "cpu").prepare(seqs)
    return input_ids, positions, meta


def test_model_has_the_declared_interface(model):
    assert isinstance(model, CausalLM)
    assert isinstance(model.model, DecoderStack)
    assert len(model.model.layers) == model.config.num_layers
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer), type(layer).__name__


@torch.no_grad()
def test_all_layers_is_the_default(model, step):
    full = model(*step)
    assert full.shape == (step[0].shape[0], model.config.hidden_size)
    torch.testing.assert_close(model(*step, layer_ids=range(model.config.num_layers)), full, rtol=0, atol=0)
    torch.testing.assert_close(model(*step, after_layer=lambda i, h, r: False), full, rtol=0, atol=0)


@torch.no_grad()
def test_layer_ids_run_only_those_layers_in_order(model, step):
    seen = []
    subset = model(*step, layer_ids=[0, 2], after_layer=lambda i, h, r: seen.append(i))
    assert seen == [0, 2]
    input_ids, positions, meta = step
    hidden = model.embed(input_ids)
    ropes = model.rope_for_layer(positions, hidden.dtype)
    for index in (0, 2):
        hidden = model.model.layers[index](hidden, ropes[index], meta)
    torch.testing.assert_close(subset, model.model.norm(hidden), rtol=0, atol=0)


@torch.no_grad()
def test_after_layer_returning_true_stops_there(model, step):
    seen = []

    def stop_at_first(index, hidden, ropes):
        seen.append(index)
        assert len(ropes) == model.config.num_layers and hidden.shape[0] == step[0].shape[0]
        return True

    stopped = model(*step, after_layer=stop_at_first)
    assert seen == [0]
    torch.testing.assert_close(stopped, model(*step, layer_ids=[0]), rtol=0, atol=0)
    assert not torch.equal(stopped, model(*step))
