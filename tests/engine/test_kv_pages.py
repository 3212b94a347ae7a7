"""The KV pool's memory: CPU pages are resident only once blocks are used."""

from __future__ import annotations


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
