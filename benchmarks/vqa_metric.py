"""Speed of blip_repro.metrics.vqa_score on a VQAv2-val-sized synthetic set, against a plain per-question oracle.

    python benchmarks/vqa_metric.py            # 214,354 questions (VQAv2 val), both evaluators
    python benchmarks/vqa_metric.py --n 20000

The oracle below is a plain transcription of the official evaluator loop (vqaEval.py, protocols.md §3): every
question normalizes its prediction and ground truth from scratch and runs the leave-one-annotator-out loop over
positions. It shares only the data tables with the library. tests/test_metrics_vqa.py imports it too.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip_repro import metrics_vqa  # noqa: E402
from blip_repro.metrics_vqa import ARTICLES, CONTRACTIONS, NUMBER_WORDS, PUNCTUATION, vqa_score  # noqa: E402

VQAV2_VAL_QUESTIONS = 214_354


# ---------------------------------------------------------------- plain oracle (one question at a time)
def reference_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in PUNCTUATION:
        if (p + " " in in_text or " " + p in in_text) or (re.search(r"(\d)(,)(\d)", in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out_text, 32)


def reference_digit_article(in_text: str) -> str:
    out = []
    for word in in_text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            out.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in out)


def reference_accuracy(prediction: str, answers: list[str], evaluator: str) -> float:
    def clean(s):
        return s.replace("\n", " ").replace("\t", " ").strip()

    gts = list(answers)
    pred = clean(prediction)
    if evaluator == "vqa2017":
        pred = reference_digit_article(reference_punctuation(pred))
        if len(set(gts)) > 1:
            gts = [reference_punctuation(g) for g in gts]
    else:
        gts = [clean(g) for g in gts]
        if len(set(gts)) > 1:
            gts = [reference_digit_article(reference_punctuation(g)) for g in gts]
            pred = reference_digit_article(reference_punctuation(pred))
    accs = []
    for i in range(len(gts)):
        others = [g for j, g in enumerate(gts) if j != i]
        accs.append(min(1, float(len([g for g in others if g == pred])) / 3))
    return float(sum(accs)) / len(accs)


def reference_vqa_score(predictions: dict, annotations: list[dict], evaluator: str = "vqa2017") -> dict:
    per_q, by_a, by_q = [], {}, {}
    for ann in annotations:
        acc = reference_accuracy(predictions[ann["question_id"]], ann["answers"], evaluator)
        per_q.append(acc)
        by_a.setdefault(ann["answer_type"], []).append(acc)
        by_q.setdefault(ann["question_type"], []).append(acc)

    def pct(v):
        return round(100 * float(sum(v)) / len(v), 2)

    return {"vqa_acc": pct(per_q), "per_answer_type": {k: pct(v) for k, v in by_a.items()},
            "per_question_type": {k: pct(v) for k, v in by_q.items()}, "n_questions": len(per_q),
            "evaluator": evaluator}


# ---------------------------------------------------------------- synthetic VQAv2-like data
_COLORS = "red blue green white black yellow orange brown gray pink purple silver".split()
_THINGS = ("dog cat man woman frisbee pizza umbrella t-shirt skateboard tennis racket surfboard kite bus train "
           "clock giraffe zebra elephant laptop phone table chair bench bicycle motorcycle horse cow sheep").split()
_NUMBER_WORDS = list(NUMBER_WORDS)
_QUESTION_TYPES = {"yes/no": ["is the", "are there", "does the", "is this"],
                   "number": ["how many", "how many people are", "what number is"],
                   "other": ["what color is the", "what is the", "what is", "where is the", "what sport is"]}


def _true_answer(rng: random.Random, answer_type: str) -> str:
    if answer_type == "yes/no":
        return rng.choice(["yes", "no"])
    if answer_type == "number":
        return str(rng.choice([0, 1, 2, 2, 3, 4, 5, 6, 10, 12, 20, 100, 2000]))
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(_COLORS)
    if kind < 0.8:
        return rng.choice(_THINGS)
    return f"{rng.choice(_COLORS)} and {rng.choice(_COLORS)}"


def _variant(rng: random.Random, answer: str) -> str:
    """A messy way of writing the same answer: what annotators and models do."""
    r = rng.random()
    if r < 0.45:
        return answer
    if answer.isdigit():
        n = int(answer)
        options = [f"{n:,}", f"{n}.", f"{n}.0", f"about {n}", f"{n} "]
        if n <= 10:
            options += [_NUMBER_WORDS[n + 1] if n > 0 else "zero", f"{_NUMBER_WORDS[n + 1]}." if n > 0 else "none"]
        return rng.choice(options)
    return rng.choice([answer.capitalize(), f"{answer}.", f"the {answer}", f"a {answer}", f"{answer}!",
                       f"{answer}?", f'"{answer}"', f"({answer})", f" {answer} ", answer.replace(" ", "-"),
                       f"{answer}\n", f"{answer}s", f"{answer} , {answer}", "dont know", "isnt", "whats that",
                       f"{answer}; maybe", "3.5", "3.5.", f"{answer}/{answer}"])


def synthetic_vqa(n: int = VQAV2_VAL_QUESTIONS, seed: int = 0) -> tuple[dict, list[dict]]:
    """(predictions, annotations) with VQAv2's shape: 10 answers, ~38% yes/no, ~12% number, disagreements."""
    rng = random.Random(seed)
    predictions, annotations = {}, []
    for qid in range(n):
        answer_type = rng.choices(["yes/no", "number", "other"], weights=[38, 12, 50])[0]
        truth = _true_answer(rng, answer_type)
        agreement = rng.random()
        answers = []
        for _ in range(10):
            if agreement < 0.35:
                answers.append(truth)  # all annotators agree, written identically
            elif rng.random() < agreement:
                answers.append(_variant(rng, truth))
            else:
                answers.append(_variant(rng, _true_answer(rng, answer_type)))
        guess = truth if rng.random() < 0.6 else _true_answer(rng, answer_type)
        predictions[qid * 10 + 7] = _variant(rng, guess)
        annotations.append({"question_id": qid * 10 + 7, "answers": answers, "answer_type": answer_type,
                            "question_type": rng.choice(_QUESTION_TYPES[answer_type])})
    return predictions, annotations


def _clear_caches() -> None:
    for fn in (metrics_vqa.normalize_answer, metrics_vqa._punctuation_cached, metrics_vqa._clean_cached,
               metrics_vqa._leave_one_out):
        fn.cache_clear()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=VQAV2_VAL_QUESTIONS, help="number of synthetic questions")
    args = parser.parse_args(argv)
    predictions, annotations = synthetic_vqa(args.n)
    print(f"{args.n} synthetic questions, "
          f"{len({a for ann in annotations for a in ann['answers']})} distinct GT strings")
    for evaluator in ("vqa2017", "vqa2021"):
        _clear_caches()
        t0 = time.perf_counter()
        fast = vqa_score(predictions, annotations, evaluator=evaluator)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = reference_vqa_score(predictions, annotations, evaluator=evaluator)
        t_plain = time.perf_counter() - t0
        assert fast == plain, (fast, plain)
        print(f"{evaluator}: vqa_acc {fast['vqa_acc']:.2f} {fast['per_answer_type']} | "
              f"vqa_score {t_fast:.2f} s, plain oracle {t_plain:.2f} s, speed-up {t_plain / t_fast:.1f}x, "
              "identical scores")


if __name__ == "__main__":
    main()
