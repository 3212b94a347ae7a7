"""Records that pin what ran, and figures with their uncertainty: provenance, intervals, calibration."""

from __future__ import annotations

import hashlib
import math
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from effinfer.bench import compare, provenance, quality
from effinfer.bench.stats import bootstrap_interval, mean_interval, proportion_se, ratio_interval, t_quantile


def test_mean_interval_is_students_t():
    i = mean_interval([1.0, 2.0, 3.0])
    assert i.value == 2.0 and i.std == 1.0 and i.n == 3
    assert i.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert mean_interval([5.0]).bounds() is None          # one observation: no interval, not a zero-width one
    assert t_quantile(100) == pytest.approx(1.984, abs=0.002) and t_quantile(1) == 12.706
    with pytest.raises(ValueError):
        mean_interval([])


def test_ratio_interval_pairs_the_rounds():
    base = [100.0, 50.0, 80.0, 120.0]            # a machine whose speed drifts a lot between rounds
    exact = ratio_interval([2 * b for b in base], base)
    assert exact.value == 2.0 and exact.bounds() == pytest.approx([2.0, 2.0])   # the drift cancels in pairs
    noisy = ratio_interval([2.1 * base[0], 1.9 * base[1], 2.05 * base[2], 1.95 * base[3]], base)
    assert noisy.low < 2.0 < noisy.high and noisy.relative_half_width() < 0.1
    unpaired = mean_interval([2 * b for b in base])
    assert unpaired.relative_half_width() > 0.3               # the same series unpaired: a wide interval
    with pytest.raises(ValueError):
        ratio_interval([1.0], [1.0, 2.0])


def test_bootstrap_interval_and_proportions():
    values = list(range(1, 101))
    median = bootstrap_interval(values, statistic=np.median)
    assert median.low < median.value == 50.5 < median.high
    assert proportion_se(50, 100) == pytest.approx(0.05) and proportion_se(0, 0) == 0.0


def test_git_state_hashes_the_uncommitted_change(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = provenance.git_state(tmp_path)
    assert clean.dirty is False and len(clean.commit) == 40 and "diff_sha256" not in clean.to_dict()
    (tmp_path / "a.py").write_text("x = 2\n")
    first = provenance.git_state(tmp_path)
    assert first.dirty and first.changed == ["a.py"] and first.commit == clean.commit
    assert provenance.git_state(tmp_path).diff_sha256 == first.diff_sha256     # the same edit, the same hash
    (tmp_path / "new.py").write_text("y = 3\n")                                  # an untracked file counts
    assert provenance.git_state(tmp_path).diff_sha256 != first.diff_sha256
    (tmp_path / "new.py").unlink()
    git("mv", "a.py", "b c.py")                   # a rename, to a name git would quote without -z
    renamed = provenance.git_state(tmp_path)
    assert renamed.dirty and renamed.changed == ["b c.py"]


def test_a_tree_git_cannot_read_counts_as_not_clean(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda root, *args, strip=True: "f" * 40 if args[0] == "rev-parse" else None)
    state = provenance.git_state()
    assert state.commit == "f" * 40 and state.dirty is None
    monkeypatch.setattr(provenance, "git_state", lambda root=None: state)
    with pytest.raises(provenance.DirtyTreeError, match="cannot say"):
        provenance.RunProvenance.begin(provenance.RESULTS_DIR / "x.json")


def test_a_dirty_tree_writes_no_record_into_the_results_unless_allowed(monkeypatch, tmp_path):
    dirty = provenance.GitState("f" * 40, True, "abc", ["effinfer/x.py"])
    monkeypatch.setattr(provenance, "git_state", lambda root=None: dirty)
    with pytest.raises(provenance.DirtyTreeError, match="effinfer/x.py"):
        provenance.RunProvenance.begin(provenance.RESULTS_DIR / "some.json")
    provenance.RunProvenance.begin(tmp_path / "elsewhere.json")              # scratch records anywhere else
    run = provenance.RunProvenance.begin(provenance.RESULTS_DIR / "some.json", allow_dirty=True)
    env = run.environment(seed=7, inputs={"text": tmp_path / "missing.txt"})
    assert env["dirty"] is True and env["diff_sha256"] == "abc" and env["seed"] == 7 and "inputs" not in env
    assert env["versions"]["torch"] == torch.__version__ and isinstance(env["cpu_flags"], list)


def test_command_line_and_file_digests(tmp_path):
    assert provenance.command_line(["/x/.venv/bin/effinfer", "bench", "a b"]) == "effinfer bench 'a b'"
    script = provenance.REPO_ROOT / "benchmarks" / "embeddings.py"
    assert provenance.command_line([str(script), "--rounds", "2"]) == "python benchmarks/embeddings.py --rounds 2"
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights" * 1000)
    assert provenance.file_sha256(f) == hashlib.sha256(b"weights" * 1000).hexdigest()
    folder_digest = provenance.file_sha256(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert provenance.file_sha256(tmp_path) != folder_digest
    assert provenance.describe_inputs({"model": f, "none": None})["model"]["sha256"] == provenance.file_sha256(f)


class UniformScorer:
    """Log-probabilities of a uniform next-token distribution over `vocab` tokens, for any text."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def score(self, token_ids):
        return torch.full((len(token_ids), self.vocab), -math.log(self.vocab))


def test_perplexity_with_interval_entropy_and_calibration():
    wins = quality.windows([1 + i % 49 for i in range(200)], window=64, stride=32)
    m = quality.perplexity(UniformScorer(50), wins)
    assert m["perplexity"] == pytest.approx(50) and m["perplexity_ci95"] == pytest.approx([50, 50])
    assert m["mean_entropy_nats"] == pytest.approx(math.log(50))
    # the top token (0, by argmax's tie-break) is never the target here: confidence 1/50, accuracy 0
    assert m["top1_accuracy"] == 0.0 and m["expected_calibration_error"] == pytest.approx(1 / 50)


def test_expected_calibration_error():
    confidence = torch.tensor([0.8] * 10 + [0.3] * 10)
    correct = torch.tensor([1.0] * 8 + [0.0] * 2 + [1.0] * 3 + [0.0] * 7)
    assert quality.calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-6)   # calibrated
    assert quality.calibration_error(torch.ones(4), torch.zeros(4)) == pytest.approx(1.0)  # sure and wrong


def test_compare_adds_rounds_until_the_target_interval(monkeypatch):
    noise = iter([1.00, 1.30, 0.80, 1.10, 0.95, 1.20, 0.90, 1.05] * 10)

    memory = {"peak": 100.0}      # resident MB: flat at 100, and the high-water mark each round reaches

    def measure(system, workload, args):
        speed = 100.0 * (2.0 if system.name == "b" else 1.0)
        if system.name == "b" and system.noisy:
            speed *= next(noise)
        memory["peak"] = 110.0 if system.name == "b" else 101.0
        return {"output_tok_s": speed}

    def reset():
        memory["peak"] = 100.0
        return True

    monkeypatch.setattr(compare, "_measure", measure)
    monkeypatch.setattr(compare, "current_rss_mb", lambda: 100.0)
    monkeypatch.setattr(compare, "reset_peak_rss", reset)
    monkeypatch.setattr(compare, "peak_rss_mb", lambda: memory["peak"])

    def run(noisy, target, max_rounds=6):
        systems = lambda o: SimpleNamespace(name="b" if o else "a", noisy=noisy, weight_bytes=lambda: 0,  # noqa: E731
                                            describe=dict, input_files=dict)
        configs = [compare.NamedConfig("a", {}), compare.NamedConfig("b", {"k": 1})]
        return compare.run_compare(configs, systems, ["throughput"], 2, SimpleNamespace(), target, max_rounds)

    steady = run(noisy=False, target=0.05)
    assert steady["rounds"] == 2 and steady["ratio_ci95"]["b"]["output_tok_s"] == pytest.approx([2.0, 2.0])
    noisy = run(noisy=True, target=0.01)
    assert noisy["rounds"] == 6                          # never that narrow: stops at max_rounds
    low, high = noisy["ratio_ci95"]["b"]["output_tok_s"]
    assert low < noisy["ratios"]["b"]["output_tok_s"] < high
    assert noisy["metrics"]["b"]["output_tok_s_ci95"][0] < noisy["metrics"]["b"]["output_tok_s"]
    # each configuration's peak: the process before any was built plus its own rise while measured
    assert noisy["metrics"]["a"]["peak_rss_mb"] == 101.0 and noisy["metrics"]["b"]["peak_rss_mb"] == 110.0
