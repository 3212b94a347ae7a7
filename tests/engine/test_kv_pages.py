"""The KV pool's memory: CPU pages are resident only once blocks are used; an unsized pool holds max_num_seqs
sequences of max_model_len tokens within the device's budget."""

from __future__ import annotations

import pytest

from helpers import make_engine


def test_cpu_kv_pages_cost_memory_only_once_used():
    """The KV pool's CPU pages are mapped on first write: a 512 MiB pool costs (almost) nothing until its blocks
    are used, reads as zeros, and a written block holds its values."""
    import os

    import psutil
    import torch

    from effinfer.engine.kv_cache import zeroed_pages

    process = psutil.Process(os.getpid())
    before = process.memory_info().rss
    pool = zeroed_pages((2, 4, 4096, 16, 64), torch.bfloat16, "cpu")   # 512 MiB
    assert process.memory_info().rss - before < 32 * 2**20
    assert pool.shape == (2, 4, 4096, 16, 64) and pool.is_contiguous()
    pool[:, :, 7] = 1.5
    assert float(pool[:, :, 7].sum()) == 1.5 * 2 * 4 * 16 * 64 and float(pool[:, :, :7].abs().sum()) == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (context 512) loaded once."""
    import torch

    from effinfer.models import load_model
    from tiny_models import save_tiny_folder

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_folder("llama", folder)
    return load_model(str(folder), torch.float32, show_progress=False)


def test_an_unsized_pool_holds_max_num_seqs_sequences_of_max_model_len(tiny):
    engine = make_engine(tiny, num_blocks=None, max_num_seqs=3, max_model_len=100, block_size=16)
    assert engine.block_manager.num_blocks == 3 * 7     # 100 tokens take 7 blocks of 16
    assert "sized for max_num_seqs 3 x 100 tokens" in engine.summary


def test_without_max_model_len_the_pool_is_sized_for_the_model_context(tiny):
    engine = make_engine(tiny, num_blocks=None, max_num_seqs=2, block_size=16)
    assert engine.block_manager.num_blocks == 2 * 512 // 16 and engine.max_model_len == 512


def test_on_cpu_the_budget_caps_the_pool_but_leaves_room_for_one_full_sequence(tiny, monkeypatch):
    import torch

    import effinfer.build as build
    from effinfer.engine.kv_cache import bytes_per_block

    block_bytes = bytes_per_block(tiny.model, 16, torch.float32)
    monkeypatch.setattr(build, "CPU_KV_BUDGET_GB", 40 * block_bytes / 2**30)
    engine = make_engine(tiny, num_blocks=None, max_num_seqs=8, max_model_len=256, block_size=16)
    assert engine.block_manager.num_blocks == 40 and "capped at the CPU budget" in engine.summary
    monkeypatch.setattr(build, "CPU_KV_BUDGET_GB", 3 * block_bytes / 2**30)
    engine = make_engine(tiny, num_blocks=None, max_num_seqs=8, max_model_len=256, block_size=16)
    assert engine.block_manager.num_blocks == 256 // 16 and engine.max_model_len == 256


def test_on_a_gpu_the_pool_takes_a_share_of_the_free_memory(tiny, monkeypatch):
    import torch

    import effinfer.build as build
    from effinfer.config import EngineConfig
    from effinfer.engine.kv_cache import bytes_per_block

    block_bytes = bytes_per_block(tiny.model, 16, torch.float32)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * block_bytes, 10**12))
    config = EngineConfig.from_kwargs(model="unused", max_num_seqs=8, max_model_len=256, block_size=16)
    blocks, why = build._num_blocks(config, tiny, torch.float32, torch.device("cuda"))
    assert blocks == int(100 * block_bytes * build.GPU_KV_SHARE) // block_bytes and "of free GPU memory" in why
    config = EngineConfig.from_kwargs(model="unused", max_num_seqs=2, max_model_len=256, block_size=16)
    assert build._num_blocks(config, tiny, torch.float32, torch.device("cuda"))[0] == 2 * 16


def test_a_given_size_wins(tiny):
    assert make_engine(tiny, num_blocks=9).block_manager.num_blocks == 9
    engine = make_engine(tiny, num_blocks=None, kv_cache_memory_gb=0.001, max_model_len=64)
    assert "kv_cache_memory_gb" in engine.summary and engine.block_manager.num_blocks >= 4
