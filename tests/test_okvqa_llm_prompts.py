"""Snapshots of the caption + LLM pipeline's prompts and answer clean-up (Blip2-GPT3-Fusion gpt_utils.py @04eb53a,
protocols.md §6): a changed prompt silently changes every number, so each one is pinned here."""
import hashlib

import pytest

from blip_repro.tasks import okvqa_llm_prompts as P


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_caption_prompt_snapshot():
    assert P.CAPTION_SYSTEM == "Give a single answer to the question in one or two words by using the context"
    assert P.CAPTION_QUERY.format(context="a photo of a zebra", question="where is it?") == \
        "Context: a photo of a zebra. Question: where is it?"
    assert [a for _, a in P.CAPTION_EXAMPLES] == ["madagascar", "golden gate", "brazil"]
    assert P.CAPTION_EXAMPLES[0][0] == ("Context: A photo of a zebra. Question: What is the name of the famous "
                                        "dreamworks animated film where this animal was voiced by chris rock?.")
    assert P.CAPTION_EXAMPLES[2][0].startswith("Context: 'a photo of a group of boys")  # the original's stray quote
    assert P.CAPTION_PARAMS == {"temperature": 0, "max_tokens": 10}


def test_questions_and_summary_prompt_snapshot():
    user = P.QUESTIONS_USER.format(question="what fruit is this")
    assert "answered" + " " * 10 + "by a visual" in user and "answered" + " " * 13 + "without" in user
    assert digest(P.QUESTIONS_USER) == "0297757baa0cafb7"
    assert digest(P.QUESTIONS_SYSTEM + P.SUMMARY_SYSTEM + P.SUMMARY_MAIN + P.SUMMARY_FINAL) == "a355b67dd72c9cce"
    assert P.QUESTIONS_PARAMS == {"temperature": 0.7, "max_tokens": 150}
    assert P.SUMMARY_PARAMS == {"temperature": 0.2, "max_tokens": 10}
    assert P.NOUN_PARAMS == {"temperature": 0, "max_tokens": 7} and len(P.NOUN_EXAMPLES) == 4


def test_unknown_phrases_snapshot():
    assert len(P.UNKNOWN_ANSWERS) == 36 and digest("|".join(P.UNKNOWN_ANSWERS)) == "33c26d3f922114fc"


@pytest.mark.parametrize("shots", [0, 3])
def test_caption_messages_are_system_examples_then_question(shots):
    msgs = P.caption_messages("a photo of a red circle", "which fruit has the color of the circle?", shots)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * shots + ["user"]
    assert msgs[-1]["content"] == "Context: a photo of a red circle. Question: which fruit has the color of the circle?"
    with pytest.raises(ValueError):
        P.caption_messages("c", "q", 4)


def test_summary_messages_interleave_the_questions_and_answers_as_user_turns():
    msgs = P.summary_messages("q?", "red", ["what color?", "how many?"], ["blue", "2"])
    assert [m["role"] for m in msgs] == ["system"] + ["user"] * 6
    assert [m["content"] for m in msgs[2:6]] == ["We asked: what color?", "The answer: blue", "We asked: how many?",
                                                  "The answer: 2"]
    assert msgs[1]["content"] == ("The main question is 'q?'. The original answer from the visual question "
                                  "answering model was 'red'")


@pytest.mark.parametrize("raw, expected", [
    ("Apple.", ("apple", "llm")),
    ("  \"Golden Gate\" bridge", ("golden gate\" bridge", "llm")),  # letters span first: the quotes are not a pair
    ("brazil or argentina", ("brazil", "llm")),
    ("salt and pepper", ("salt", "llm")),
    ("cats/dogs", ("cats", "llm")),
    ("red, green", ("red", "llm")),
    ("surf - board", ("surf", "llm")),
    ("apple (fruit)", ("apple", "llm")),
    ('the "giants" team', ("giants", "llm")),
    ("Sorry, I cannot tell.", ("BLIP", "fallback_unknown")),
    ("Unknown", ("BLIP", "fallback_unknown")),
    ("none", ("BLIP", "fallback_unknown")),
    ("The answer is 42", ("BLIP", "fallback_unknown")),  # "answer" is in the published list
    ("", ("BLIP", "fallback_empty")),
    ("   ", ("BLIP", "fallback_empty")),
    ("(x)", ("BLIP", "fallback_empty")),  # cut at "(" leaves nothing
])
def test_caption_answer_clean_up(raw, expected):
    assert P.clean_caption_answer(raw, "BLIP") == expected


def test_summary_clean_up_keeps_case_and_only_trims_to_letters():
    assert P.clean_summary_answer(" 'Banana'.", "x") == ("Banana", "llm")
    assert P.clean_summary_answer("", "x") == ("x", "fallback_empty")


def test_question_lines_keep_the_published_raw_lines():
    raw = "1. What color is the circle?\n\n2. Is there a circle?\n3. How many shapes?\n4. Extra?"
    assert P.parse_questions(raw) == ["1. What color is the circle?", "2. Is there a circle?", "3. How many shapes?"]
