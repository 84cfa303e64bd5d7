"""VQA accuracy and GQA exact match against hand-computed cases of every rule of the official evaluators
(protocols.md §3), and against the plain per-question oracle of benchmarks/vqa_metric.py on synthetic data."""
import importlib.util
from pathlib import Path

import pytest

from blip_repro.errors import UserError
from blip_repro.metrics import (
    GQA_RULES,
    VQA_EVALUATORS,
    gqa_match,
    gqa_score,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)
from blip_repro.metrics_vqa import CONTRACTIONS


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vqa_metric.py"
    spec = importlib.util.spec_from_file_location("vqa_metric_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, expected", [
    ("hello?", "hello "),             # a mark not touching a space becomes a space
    ("yes !", "yes "),                # a mark touching a space is deleted
    ("t-shirt", "t shirt"),
    ("t-shirt, red", "t shirt red"),  # ", " touches a space: deleted; "-" does not: space
    ("left/right", "left right"),
    ("(red)", " red "),
    ('"red"', " red "),
    ("a\\b", "a b"),
    ("a=b+c", "a b c"),
    ("what?!", "what  "),
    ("2,000", "2000"),                # comma between digits ...
    ("1,000 t-shirts", "1000 tshirts"),  # ... deletes every mark in the string, not just the comma
    ("3.5", "3.5"),                   # a period before a digit stays
    ("3.5.", "3.5"),
    ("yes.", "yes"),
    ("a.b", "ab"),
    ("." * 40, "." * 8),              # re.UNICODE passed as count: at most 32 periods go
    ("don't", "don't"),               # apostrophes and colons are not punctuation here
    ("12:30", "12:30"),
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("none", "0"), ("zero", "0"), ("ten", "10"), ("eleven", "eleven"),
    ("the dog", "dog"), ("A Man", "man"), ("a an the", ""), ("an apple", "apple"),
    ("dont", "don't"), ("isnt", "isn't"), ("whats", "what's"), ("youre", "you're"), ("wont", "won't"),
    ("somebody'd", "somebodyd"),       # the table's quirky entry
    ("Im", "im"),                      # capitalised keys never match after lowercasing
    ("  red   car ", "red car"),
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and CONTRACTIONS["twas"] == "'twas"


@pytest.mark.parametrize("text, expected", [
    ("Two\n", "2"), ("\tThe dog.", "dog"), ("It's 3.5!", "it's 3.5"), ("  Yes. ", "yes"),
    ("two, three", "2 3"), ("the 2,000 t-shirts", "2000 tshirts"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _official_sum(terms):
    return float(sum(terms)) / len(terms)


@pytest.mark.parametrize("k, approx", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_leave_one_annotator_out(k, approx):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    exact = _official_sum([min(1, (k - 1) / 3)] * k + [min(1, k / 3)] * (10 - k))
    assert vqa_accuracy("cat", answers) == exact
    assert exact == pytest.approx(approx, abs=1e-12)


def test_leave_one_out_sums_in_slot_order():
    # With 2 matches the ten terms are 1/3 and 2/3; where the matches sit changes the float sum's last bit.
    values = set()
    for answers in (["cat", "cat"] + ["dog"] * 8, ["dog"] * 8 + ["cat", "cat"], ["dog", "cat"] * 2 + ["dog"] * 6):
        exact = _official_sum([1 / 3 if a == "cat" else 2 / 3 for a in answers])
        assert vqa_accuracy("cat", answers) == exact
        values.add(exact)
    assert len(values) > 1


def test_okvqa_doubled_answers():
    answers = [a for a in ("paris", "london", "rome", "berlin", "madrid") for _ in range(2)]
    assert vqa_accuracy("rome", answers) == pytest.approx(0.6)
    answers[4:6] = ["paris", "paris"]  # two annotators said paris: 4 slots
    assert vqa_accuracy("paris", answers) == 1.0


def test_identical_gt_is_compared_raw_in_2017_only():
    assert VQA_EVALUATORS == ("vqa2017", "vqa2021")
    assert vqa_accuracy("two", ["two"] * 10, "vqa2017") == 0.0  # prediction -> "2", GT stays "two"
    assert vqa_accuracy("two", ["two"] * 10, "vqa2021") == 1.0
    assert vqa_accuracy("yes", [" yes"] * 10, "vqa2017") == 0.0  # identical GT is not even stripped
    assert vqa_accuracy("yes", [" yes"] * 10, "vqa2021") == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, "vqa2017") == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10, "vqa2021") == 0.0  # 2021: identical GT -> nothing normalized


def test_differing_gt_gets_punctuation_only_in_2017():
    answers = ["two"] * 9 + ["three"]
    assert vqa_accuracy("two", answers, "vqa2017") == 0.0  # GT keeps "two", prediction becomes "2"
    assert vqa_accuracy("two", answers, "vqa2021") == 1.0
    answers = ["red."] * 3 + ["blue"] * 7
    assert vqa_accuracy("red", answers, "vqa2017") == pytest.approx(0.9)
    assert vqa_accuracy("the red", answers, "vqa2021") == pytest.approx(0.9)


def test_vqa_accuracy_rejects_unknown_evaluator():
    with pytest.raises(UserError, match="vqa2017"):
        vqa_accuracy("a", ["a"] * 10, evaluator="vqa2019")
    with pytest.raises(UserError, match="non-empty list of strings"):
        vqa_accuracy("a", "a" * 10)
    with pytest.raises(UserError, match="not a string"):
        vqa_accuracy(2, ["2"] * 10)


def _ann(qid, answers, answer_type="other", question_type="what is"):
    return {"question_id": qid, "answers": answers, "answer_type": answer_type, "question_type": question_type}


ANNOTATIONS = [
    _ann(1, ["yes"] * 10, "yes/no", "is the"),
    _ann(2, ["2"] + ["3"] * 9, "number", "how many"),
    _ann(3, ["red"] * 10, "other", "what color is the"),
]


def test_vqa_score_aggregates_like_the_official():
    out = vqa_score({1: "Yes", 2: "two", 3: "blue"}, ANNOTATIONS)
    assert out == {
        "vqa_acc": 43.33,
        "per_answer_type": {"yes/no": 100.0, "number": 30.0, "other": 0.0},
        "per_question_type": {"is the": 100.0, "how many": 30.0, "what color is the": 0.0},
        "n_questions": 3,
        "evaluator": "vqa2017",
    }
    as_list = [{"question_id": q, "answer": a} for q, a in {3: "blue", 1: "Yes", 2: "two"}.items()]
    assert vqa_score(as_list, ANNOTATIONS) == out


@pytest.mark.parametrize("predictions, annotations, message", [
    ({1: "yes", 2: "2"}, ANNOTATIONS, "no prediction for question_id 3"),
    ({1: "yes", 2: "2", 3: "red", 4: "x"}, ANNOTATIONS, "question_id 4, which is not in the annotations"),
    ([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}], ANNOTATIONS[:1], "1 is predicted twice"),
    ({1: 2}, ANNOTATIONS[:1], "question_id 1 is 2, not a string"),
    ({1: "yes"}, [_ann(1, ["yes"] * 9 + [None])], "has the answer None, not a string"),
    ({1: "yes"}, [_ann(1, ["yes"] * 9)], "has 9 answers, expected n_answers=10"),
    ({"1": "yes"}, [_ann(1, ["yes"] * 10)], "differ only in type"),
    ({1: "yes"}, [_ann(1, ["yes"] * 10), _ann(1, ["yes"] * 10)], "appears twice in the annotations"),
    ({}, [], "annotations is empty"),
])
def test_vqa_score_rejects_bad_input(predictions, annotations, message):
    with pytest.raises(UserError, match=message):
        vqa_score(predictions, annotations)


def test_vqa_score_n_answers_none_allows_any_count():
    assert vqa_score({1: "yes"}, [_ann(1, ["yes"] * 5)], n_answers=None)["vqa_acc"] == 100.0


@pytest.mark.parametrize("evaluator", VQA_EVALUATORS)
def test_vqa_score_equals_plain_oracle_on_synthetic_data(evaluator):
    bench = _benchmark()
    predictions, annotations = bench.synthetic_vqa(4000, seed=1)
    assert vqa_score(predictions, annotations, evaluator) == bench.reference_vqa_score(
        predictions, annotations, evaluator)
    for ann in annotations[:500]:
        pred = predictions[ann["question_id"]]
        assert vqa_accuracy(pred, ann["answers"], evaluator) == bench.reference_accuracy(
            pred, ann["answers"], evaluator)


def test_gqa_rules():
    assert set(GQA_RULES) == {"lavis2023feb", "lavis2023dec", "raw"}
    assert all(isinstance(d, str) and d for d in GQA_RULES.values())
    assert gqa_match("Two", "2") and gqa_match("the table.", "table")
    assert not gqa_match("table", "the table", "lavis2023feb")  # GT raw in the paper-era rule
    assert gqa_match("table", "the table", "lavis2023dec")
    assert gqa_match("table", "table", "raw") and not gqa_match("Table", "table", "raw")
    assert not gqa_match("two", "two")  # prediction -> "2", raw GT "two"
    with pytest.raises(UserError, match="lavis2023feb"):
        gqa_match("a", "a", rule="lavis")


def test_gqa_score():
    annotations = [{"question_id": "a1", "answer": "table"}, {"question_id": "a2", "answer": "2"},
                   {"question_id": "a3", "answer": "the cup"}]
    predictions = {"a1": "The table", "a2": "two", "a3": "the cup"}
    assert gqa_score(predictions, annotations) == {"gqa_acc": 2 / 3 * 100, "n_questions": 3,
                                                   "rule": "lavis2023feb"}
    assert gqa_score(predictions, annotations, "lavis2023dec")["gqa_acc"] == 100.0
    assert gqa_score(predictions, annotations, "raw")["gqa_acc"] == 1 / 3 * 100
    with pytest.raises(UserError, match="no prediction for question_id 'a3'"):
        gqa_score({"a1": "x", "a2": "y"}, annotations)
