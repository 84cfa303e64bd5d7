"""VQA accuracy (VQAv2, OK-VQA) and GQA exact match, computed as the official evaluators do (protocols.md §3).

Two VQA evaluator versions exist and disagree on a few percent of questions:
- "vqa2017": GT-Vision-Lab vqaEval.py before 2021 (= LAVIS `vqa_eval.py`), which produced every BLIP / BLIP-2 number.
- "vqa2021": GT-Vision-Lab master a013f00 ("Fixed processing answers bug", 2021).
Every distinct string is normalized once (LRU caches) and each question's score is a count plus a cached lookup,
so scoring VQAv2 val (214k questions) takes about a second (benchmarks/vqa_metric.py).
"""
from __future__ import annotations

import re
from functools import lru_cache

from blip_repro.errors import UserError

VQA_EVALUATORS = ("vqa2017", "vqa2021")

# The official contraction table, kept verbatim with its quirks: keys with capitals ("Im", "Ive", "Id've") can never
# match (words are lowercased first), "let's"/"she's" map to themselves and "somebody'd" maps to "somebodyd".
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Apostrophes, colons and periods are not in the list (periods have their own rule).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# "(?!<=\d)" was meant as a look-behind but is a look-ahead for the two characters "<" "=": inert. Net effect:
# remove every period not followed by a digit ("3.5" keeps its period, "3." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official passes re.UNICODE positionally as sub()'s *count*: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_CACHE_SIZE = 1 << 18


def process_punctuation(text: str) -> str:
    """Official processPunctuation: each listed mark is deleted if it touches a space anywhere in the original
    text (or if the text has a comma between digits anywhere), else replaced by a space; then the period rule."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if p in text:  # replacing a mark the text lacks changes nothing, so skip the checks
            touches_space = (p + " ") in text or (" " + p) in text
            out = out.replace(p, "" if touches_space or delete_all else " ")
    if "." in out:
        out = _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)
    return out


def process_digit_article(text: str) -> str:
    """Official processDigitArticle: lowercase, number words -> digits, drop articles, expand contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=_CACHE_SIZE)
def normalize_answer(text: str) -> str:
    """The official normalization of a predicted answer: newline/tab -> space, strip, punctuation, digits/articles."""
    return process_digit_article(process_punctuation(_clean(text)))


_punctuation_cached = lru_cache(maxsize=_CACHE_SIZE)(process_punctuation)
_clean_cached = lru_cache(maxsize=_CACHE_SIZE)(_clean)


@lru_cache(maxsize=4096)
def _leave_one_out(n_slots: int, matching_slots: tuple[int, ...]) -> float:
    """Mean over the n annotators of min(1, #other annotators giving the answer / 3), summed in slot order as the
    official loop does (the float sum depends on the order in its last bit)."""
    m = len(matching_slots)
    total = 0
    for slot in range(n_slots):
        total += min(1, float(m - 1 if slot in matching_slots else m) / 3)
    return float(total) / n_slots


def _ground_truth(answers: tuple[str, ...], evaluator: str) -> tuple[bool, list[str] | tuple[str, ...]]:
    """(is the prediction normalized?, the answers as the prediction is compared with them) for one question."""
    if evaluator == "vqa2017":
        # GT: punctuation only, and only when the annotators disagree; identical GT is compared raw (not stripped).
        if len(set(answers)) <= 1:
            return True, answers
        return True, list(map(_punctuation_cached, answers))
    stripped = list(map(_clean_cached, answers))
    if len(set(stripped)) > 1:  # a013f00: both sides fully normalized only when the GT answers differ
        return True, list(map(normalize_answer, answers))
    return False, stripped


def _accuracy(prediction: str, answers: tuple[str, ...], evaluator: str) -> float:
    normalize_prediction, gts = _ground_truth(answers, evaluator)
    key = normalize_answer(prediction) if normalize_prediction else _clean_cached(prediction)
    m = gts.count(key)
    if m == 0:
        return 0.0
    # Only with 2 or 3 matches do the per-annotator terms take two different non-zero values, so that the order
    # of the official sum (and so the last bit) depends on where the matches sit; otherwise any slots will do.
    slots = tuple(i for i, gt in enumerate(gts) if gt == key) if m in (2, 3) else tuple(range(m))
    return _leave_one_out(len(gts), slots)


def _check_choice(value: str, choices, name: str) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not known; use one of {', '.join(map(repr, choices))}")


def vqa_accuracy(prediction: str, answers: list[str], evaluator: str = "vqa2017") -> float:
    """Accuracy (0..1) of one predicted answer against the annotators' answers (10 for VQAv2 and OK-VQA)."""
    _check_choice(evaluator, VQA_EVALUATORS, "evaluator")
    if not isinstance(prediction, str):
        raise UserError(f"prediction {prediction!r} is not a string")
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"answers must be a non-empty list of strings (the annotators' answers), got {answers!r}")
    return _accuracy(prediction, tuple(answers), evaluator)


def _percent(values: list[float]) -> float:
    # Summed left to right and rounded to 2 decimals, exactly like the official setAccuracy.
    return round(100 * float(sum(values)) / len(values), 2)


def _prediction_map(predictions) -> dict:
    """{question_id: answer} from a dict or from a list of {"question_id", "answer"} records."""
    if isinstance(predictions, dict):
        pairs = predictions.items()
    else:
        pairs = []
        for record in predictions:
            if not isinstance(record, dict) or "question_id" not in record or "answer" not in record:
                raise UserError(f"prediction {record!r} is not a {{'question_id': ..., 'answer': ...}} record")
            pairs.append((record["question_id"], record["answer"]))
    out = {}
    for qid, answer in pairs:
        if qid in out:
            raise UserError(f"question_id {qid!r} is predicted twice; keep one answer per question")
        if not isinstance(answer, str):
            raise UserError(f"the prediction for question_id {qid!r} is {answer!r}, not a string")
        out[qid] = answer
    return out


def _id_hint(qid, other_ids) -> str:
    if str(qid) in {str(i) for i in other_ids}:
        return " (the ids differ only in type, e.g. '1' vs 1: convert one side)"
    return ""


def _check_ids(predictions: dict, question_ids: list) -> None:
    """Predictions and annotations must cover the same questions, as the official loadRes asserts."""
    if not question_ids:
        raise UserError("annotations is empty; there is nothing to score")
    known = set()
    for qid in question_ids:
        if qid in known:
            raise UserError(f"question_id {qid!r} appears twice in the annotations")
        known.add(qid)
    for qid in question_ids:
        if qid not in predictions:
            hint = _id_hint(qid, predictions)
            raise UserError(f"no prediction for question_id {qid!r} ({len(predictions)} predictions for "
                            f"{len(question_ids)} questions){hint}")
    for qid in predictions:
        if qid not in known:
            hint = _id_hint(qid, known)
            raise UserError(f"prediction for question_id {qid!r}, which is not in the annotations{hint}")


def _question_id(record) -> object:
    if not isinstance(record, dict) or "question_id" not in record:
        raise UserError(f"annotation {str(record)[:200]} has no 'question_id'")
    return record["question_id"]


def _answers(record: dict, n_answers: int | None) -> tuple[str, ...]:
    answers = record.get("answers")
    qid = record["question_id"]
    if not isinstance(answers, (list, tuple)) or not answers:
        raise UserError(f"annotation of question_id {qid!r} needs 'answers', a non-empty list of strings")
    if n_answers is not None and len(answers) != n_answers:
        raise UserError(f"annotation of question_id {qid!r} has {len(answers)} answers, expected n_answers="
                        f"{n_answers} (OK-VQA stores its 5 answers twice; pass n_answers=None to allow any)")
    try:
        "".join(answers)  # a C-speed check that every answer is a string
    except TypeError:
        bad = next(a for a in answers if not isinstance(a, str))
        raise UserError(f"annotation of question_id {qid!r} has the answer {bad!r}, not a string") from None
    return tuple(answers)


def vqa_score(predictions, annotations: list[dict], evaluator: str = "vqa2017", n_answers: int | None = 10) -> dict:
    """VQA accuracy of predictions ({question_id: answer} or [{"question_id", "answer"}]) against annotations
    [{"question_id", "answers": [str] * n_answers, "answer_type", "question_type"}] (the types are optional).

    Returns percentages rounded to 2 decimals like the official evaluator: vqa_acc, per_answer_type,
    per_question_type, and n_questions and evaluator."""
    _check_choice(evaluator, VQA_EVALUATORS, "evaluator")
    predicted = _prediction_map(predictions)
    _check_ids(predicted, [_question_id(record) for record in annotations])
    overall: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for record in annotations:  # annotation order = the official question order, so the float sums agree
        acc = _accuracy(predicted[record["question_id"]], _answers(record, n_answers), evaluator)
        overall.append(acc)
        if record.get("answer_type") is not None:
            by_answer_type.setdefault(record["answer_type"], []).append(acc)
        if record.get("question_type") is not None:
            by_question_type.setdefault(record["question_type"], []).append(acc)
    return {
        "vqa_acc": _percent(overall),
        "per_answer_type": {k: _percent(v) for k, v in by_answer_type.items()},
        "per_question_type": {k: _percent(v) for k, v in by_question_type.items()},
        "n_questions": len(overall),
        "evaluator": evaluator,
    }


# GQA is exact match, not VQA accuracy; the LAVIS rule changed over time (protocols.md §3), so it is named.
GQA_RULES = {
    "lavis2023feb": "prediction normalized (processPunctuation + processDigitArticle), ground truth raw: LAVIS "
                    "b345799 for generated answers, the BLIP-2 paper setting (b38a7ac, May 2023, is identical)",
    "lavis2023dec": "prediction and ground truth both normalized: LAVIS 71a2da9 (Dec 2023, current HEAD)",
    "raw": "exact string equality, nothing normalized: LAVIS b345799 for ranked (answer-list) predictions",
}


@lru_cache(maxsize=_CACHE_SIZE)
def _gqa_normalize(text: str) -> str:
    # LAVIS applies the two steps to the raw string: no newline/tab replacement and no strip first.
    return process_digit_article(process_punctuation(text))


def gqa_match(prediction: str, answer: str, rule: str = "lavis2023feb") -> bool:
    """GQA exact match of one prediction against the single ground-truth answer, under a named GQA_RULES rule."""
    _check_choice(rule, tuple(GQA_RULES), "rule")
    if rule == "raw":
        return prediction == answer
    if rule == "lavis2023dec":
        answer = _gqa_normalize(answer)
    return _gqa_normalize(prediction) == answer


def gqa_score(predictions, annotations: list[dict], rule: str = "lavis2023feb") -> dict:
    """GQA accuracy (0..100, unrounded like LAVIS) of predictions against [{"question_id", "answer": str}]."""
    _check_choice(rule, tuple(GQA_RULES), "rule")
    predicted = _prediction_map(predictions)
    _check_ids(predicted, [_question_id(record) for record in annotations])
    hits = []
    for record in annotations:
        answer = record.get("answer")
        if not isinstance(answer, str):
            raise UserError(f"annotation of question_id {record['question_id']!r} needs 'answer', a string; "
                            f"got {answer!r}")
        hits.append(1 if gqa_match(predicted[record["question_id"]], answer, rule) else 0)
    return {"gqa_acc": sum(hits) / len(hits) * 100, "n_questions": len(hits), "rule": rule}
