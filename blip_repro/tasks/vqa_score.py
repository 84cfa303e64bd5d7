"""Scoring of a VQA run: VQA accuracy (VQAv2, OK-VQA) or GQA exact match through blip_repro.metrics, per answer type
and per question type, the majority-answer-per-question-type control on shapes, and the official server's result
file for the VQAv2 test splits (protocols.md §1.5, §2.2, §3)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from blip_repro import metrics
from blip_repro.data import readers
from blip_repro.errors import UserError
from blip_repro.fileio import atomic_write_json

SERVER = ("the VQA Challenge evaluation server on EvalAI (https://eval.ai, linked from "
          "https://visualqa.org/challenge.html): phase test-dev for split test-dev; split test (all of test2015) "
          "gives test-dev and test-standard")


def score(records: list[dict], answers: dict, dataset: str, evaluator: str = "vqa2017",
          gqa_rule: str = "lavis2023feb") -> dict:
    """Scores on the papers' 0..100 scale: VQA accuracy with per answer and question type, or GQA exact match
    with per question type (and per structural type on the real GQA)."""
    if readers.vqa_benchmark(dataset) == "gqa":
        return gqa_scores(records, answers, gqa_rule)
    # every VQAv2 and OK-VQA question has 10 answer slots (OK-VQA: 5 answers, each twice), §3
    return metrics.vqa_score(answers, records, evaluator=evaluator, n_answers=10)


def gqa_scores(records: list[dict], answers: dict, rule: str = "lavis2023feb") -> dict:
    out = metrics.gqa_score(answers, records, rule=rule)  # checks ids, types; the overall number
    for field, name in (("question_type", "per_question_type"), ("structural_type", "per_structural_type")):
        groups: dict[str, list[int]] = {}
        for r in records:
            if r.get(field) is not None:
                groups.setdefault(r[field], []).append(int(metrics.gqa_match(answers[r["question_id"]], r["answer"],
                                                                             rule)))
        if groups:
            out[name] = {k: round(100 * sum(v) / len(v), 2) for k, v in groups.items()}
    return out


def _majority(r: dict) -> str:
    if r.get("answer") is not None:  # GQA: one answer
        return r["answer"]
    return r.get("multiple_choice_answer") or Counter(r["answers"]).most_common(1)[0][0]


def majority_by_type(train: list[dict]) -> tuple[dict, str]:
    """The most frequent answer of each question type in the training split, and over all questions (ties: the
    answer seen first)."""
    by_type: dict[str, Counter] = {}
    for r in train:
        by_type.setdefault(r.get("question_type"), Counter())[_majority(r)] += 1
    overall = Counter(_majority(r) for r in train).most_common(1)[0][0]
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}, overall


def majority_control(records: list[dict], dataset: str, evaluator: str, gqa_rule: str = "lavis2023feb") -> dict:
    """The blind control of the shapes tables: answer every question with its type's majority training answer."""
    from blip_repro.tasks.vqa import read

    table, overall = majority_by_type(read(dataset, "train"))
    answers = {r["question_id"]: table.get(r.get("question_type"), overall) for r in records}
    return score(records, answers, dataset, evaluator, gqa_rule)


def server_file(cfg, answers: dict) -> Path:
    """The official result file: [{"question_id": int, "answer": str}] named as the VQA evaluation page asks."""
    subset = {"test-dev": "test-dev2015", "test": "test2015"}[cfg.split]
    name = f"vqa_OpenEnded_mscoco_{subset}_{Path(cfg.model).name}_results.json"
    return atomic_write_json(cfg.run_dir / name, [{"question_id": int(q), "answer": a} for q, a in answers.items()])


def score_run(recs: list[dict], preds: dict, cfg, family: str) -> dict:
    from blip_repro.tasks import vqa

    answers = {k: p["answer"] for k, p in preds.items()}
    bench = readers.vqa_benchmark(cfg.dataset)
    lemma = vqa.lemmatizes(cfg)
    common = {"lemmatize": lemma, "lemmatizer": vqa.lemmatizer_name() if lemma else None,
              "protocol": vqa.protocol_record(cfg, family), "n_questions": len(recs)}
    if bench != "gqa" and not any(r["answers"] for r in recs):
        if bench != "vqav2" or cfg.split not in ("test-dev", "test"):
            raise UserError(f"{cfg.dataset}/{cfg.split}: the questions have no annotations to score against")
        path = server_file(cfg, answers)
        note = f"scored by the official server: upload {path} to {SERVER}"
        return {"vqa_acc": None, "vqa_acc_note": note, "server_file": str(path), **common}
    out = score(recs, answers, cfg.dataset, cfg.evaluator, cfg.gqa_rule)
    if cfg.dataset.startswith("shapes-"):  # the blind control beside the score (DESIGN.md §4)
        control = majority_control(recs, cfg.dataset, cfg.evaluator, cfg.gqa_rule)
        out["control_majority_by_type"] = control
        out["control_majority_acc"] = control.get("vqa_acc", control.get("gqa_acc"))
    return {**out, **common}
