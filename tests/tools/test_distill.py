"""Knowledge distillation: a shallow student of a tiny teacher learns its distributions, saves as a folder
that loads, and drafts losslessly for the teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest

from effinfer import LLM, SamplingParams
from effinfer.tools.distill import DistillConfig, distill, student_layers
from effinfer.loader.arch_config import ArchConfig, to_hf_config
from tests.tiny_models import save_tiny_folder


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_hf_config_round_trips(tmp_path, family):
    save_tiny_folder(family, tmp_path)
    cfg = ArchConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert ArchConfig.from_hf_config(to_hf_config(cfg)) == cfg


def test_student_layers_spread_over_the_teacher():
    assert student_layers(30, DistillConfig(num_layers=6)) == [0, 6, 12, 17, 23, 29]
    assert student_layers(30, DistillConfig(layers="0,29,3")) == [0, 3, 29]
    with pytest.raises(ValueError):
        student_layers(4, DistillConfig(num_layers=4))
    with pytest.raises(ValueError):
        student_layers(4, DistillConfig(layers="0,4"))
    with pytest.raises(ValueError, match="layer indices"):
        DistillConfig(layers="0,x")


def test_distilled_student_learns_loads_and_drafts(tmp_path):
    teacher = tmp_path / "teacher"
    save_tiny_folder("llama", teacher)
    words = np.random.default_rng(0).integers(1, 256, 3000)
    text = " ".join(f"w{i}" for i in words)
    cfg = DistillConfig(num_layers=1, steps=40, batch_size=4, seq_len=32, lr=3e-3, save_every=20, eval_windows=4)
    report = distill(str(teacher), text, tmp_path / "student", cfg, show_progress=False)
    before, after = report["held_out_before"], report["held_out_after"]
    assert after["kl"] < 0.7 * before["kl"]                    # it learned the teacher, on held-out text
    assert report["loss_first_last"][1] < report["loss_first_last"][0]
    common = dict(dtype="float32", show_progress=False, kv_cache_memory_gb=0.05)
    student = LLM(report["path"], **common)
    assert student.engine.loaded.config.num_layers == 1
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    plain = [r.token_ids for r in LLM(str(teacher), **common).generate(prompts, params, use_tqdm=False)]
    spec = LLM(str(teacher), speculative_method="draft_model", speculative_model=report["path"], **common)
    assert [r.token_ids for r in spec.generate(prompts, params, use_tqdm=False)] == plain
    assert spec.engine.spec_stats["draft_tokens"] > 0
