"""The language-model side of the caption + LLM OK-VQA pipeline: prompts as constants, chat messages, answer clean-up.

Source of every string here: EricLangezaal/Blip2-GPT3-Fusion at commit 04eb53a, `src/extensions/gpt_utils.py`
(`context_gpt`, `noun_gpt`, `prompt_chat_gpt`, `summarized_gpt`, `get_single_answer`) and
`src/extensions/configs/gpt_unknown_answers.txt` (shared/reference/protocols.md §6). The prompts are the published
protocol, so they are kept character for character, odd spacing and punctuation included: a changed prompt
changes the numbers. tests/test_okvqa_llm_prompts.py snapshots them.
"""
from __future__ import annotations

import re

# --- "GPT-3 answers from a photo description" (context_gpt) -----------------------------------------------------
CAPTION_SYSTEM = "Give a single answer to the question in one or two words by using the context"
# Three fixed in-context examples, sent as user/assistant turns. The user turns are "Context: ... Question: {q}."
# with the example question's own "?" kept, hence "?."; the third one's stray quote is in the original too.
CAPTION_EXAMPLES = (
    ("Context: A photo of a zebra. Question: What is the name of the famous dreamworks animated film where this "
     "animal was voiced by chris rock?.", "madagascar"),
    ("Context: a photo of a man standing next to a bike in front of a building with a golden gate. Question: What "
     "is the name of the bridge in the background?.", "golden gate"),
    ("Context: 'a photo of a group of boys playing soccer on a field. Question: What are the most popular countries "
     "for this sport?.", "brazil"),
)
CAPTION_QUERY = "Context: {context}. Question: {question}"
CAPTION_PARAMS = {"temperature": 0, "max_tokens": 10}

# --- the salient-noun ablation (noun_gpt; flan_t5_gpt3_noun_caption.py) ------------------------------------------
NOUN_SYSTEM = "Pick the most important noun that needs to be described to answer the question"
NOUN_EXAMPLES = (("Is this a room for a boy or girl?", "room"),
                 ("In what year was this desert first introduced?", "desert"),
                 ("what could this gentleman be carrying in that red bag?", "bag"),
                 ("who leaves a toilet like this?", "toilet"))
NOUN_PARAMS = {"temperature": 0, "max_tokens": 7}
NOUN_PROMPT = "the {noun} can be described as"  # BLIP-2 continues it like a caption

# --- the "GPT-3 picks three questions" ablation (prompt_chat_gpt, summarized_gpt) --------------------------------
QUESTIONS_SYSTEM = ("You are a helpful assistant that generates open-ended questions that extract visual "
                    "information")
# The runs of 10 and 13 spaces come from backslash line continuations inside the original f-string.
QUESTIONS_USER = ("Someone asked you '{question}'. List the three best distinct open-ended questions you would like "
                  "to be answered" + " " * 10 + "by a visual information retrieval system, such that you can best "
                  "answer '{question}'. Only list open-ended questions that can be answered" + " " * 13 +
                  "without modifying the image. I want only the distinct questions, don't say anything else.")
QUESTIONS_PARAMS = {"temperature": 0.7, "max_tokens": 150}
N_QUESTIONS = 3
SUMMARY_SYSTEM = ("You are truthful assistant that answers the main question in one or two words. You can utilise "
                  "the information from multiple partial questions that have been answered.")
SUMMARY_MAIN = ("The main question is '{question}'. The original answer from the visual question answering model "
                "was '{answer}'")
SUMMARY_ASKED = "We asked: {question}"
SUMMARY_ANSWER = "The answer: {answer}"
SUMMARY_FINAL = ("Please answer the main question in one or two words: '{question}'. You can either repeat the "
                 "original answer '{answer}', or improve it if necessary, still using only one or two words.")
SUMMARY_PARAMS = {"temperature": 0.2, "max_tokens": 10}

# --- answers that mean "I don't know": BLIP-2's own answer is used instead (gpt_unknown_answers.txt) ------------
# Matched as substrings of the lowercased answer, as published: "answer", "context", "?" and "none" included.
UNKNOWN_ANSWERS = (
    "unknown", "sorry", "valid", "certain", "difficult", "specific", "perspective", "personal", "preference",
    "description", "can not", "applicable", "n/a", "n / a", "mention", "apologies", "question", "not a question",
    "not possible", "impossible", "none", "?", "information", "not specific", "no specific", "enough", "unclear",
    "context", "answer", "provided", "not clear", "not known", "unspecified", "undetermined", "specified",
    "determine",
)
SPLIT_AT = (" or ", " and ", "/", ",", " - ", "(")  # get_single_answer: keep what comes before the first of each
_ALPHA_SPAN = re.compile(r"[a-zA-Z].*[a-zA-Z]")


def _turns(examples) -> list[dict]:
    out = []
    for user, assistant in examples:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


def caption_messages(context: str, question: str, shots: int) -> list[dict]:
    """System prompt, `shots` in-context examples (0..3) and the question with its context."""
    if not 0 <= shots <= len(CAPTION_EXAMPLES):
        raise ValueError(f"shots must be 0..{len(CAPTION_EXAMPLES)}, got {shots}")
    return ([{"role": "system", "content": CAPTION_SYSTEM}] + _turns(CAPTION_EXAMPLES[:shots])
            + [{"role": "user", "content": CAPTION_QUERY.format(context=context, question=question)}])


def noun_messages(question: str) -> list[dict]:
    return ([{"role": "system", "content": NOUN_SYSTEM}] + _turns(NOUN_EXAMPLES)
            + [{"role": "user", "content": question}])


def questions_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": QUESTIONS_SYSTEM},
            {"role": "user", "content": QUESTIONS_USER.format(question=question)}]


def summary_messages(question: str, answer: str, asked: list[str], answers: list[str]) -> list[dict]:
    """The main question, BLIP-2's answer, each proposed question and BLIP-2's answer to it, all as user turns."""
    out = [{"role": "system", "content": SUMMARY_SYSTEM},
           {"role": "user", "content": SUMMARY_MAIN.format(question=question, answer=answer)}]
    for q, a in zip(asked, answers):
        out += [{"role": "user", "content": SUMMARY_ASKED.format(question=q)},
                {"role": "user", "content": SUMMARY_ANSWER.format(answer=a)}]
    return out + [{"role": "user", "content": SUMMARY_FINAL.format(question=question, answer=answer)}]


def alpha_span(text: str) -> str:
    """From the first to the last letter (drops quotes, full stops, list numbers); the text if it has < 2 letters."""
    text = text.strip()
    m = _ALPHA_SPAN.search(text)
    return m.group() if m else text


def single_answer(text: str) -> str:
    """get_single_answer: cut at " or ", " and ", "/", ",", " - ", "(", then take a quoted span if there is one."""
    for sep in SPLIT_AT:
        text = text.split(sep)[0]
    if text.count('"') == 2:
        text = re.findall(r'"(.*?)"', text)[0]
    return text


def is_unknown(answer: str) -> bool:
    return any(phrase in answer for phrase in UNKNOWN_ANSWERS)


def clean_caption_answer(raw: str, fallback: str) -> tuple[str, str]:
    """(answer, source) from the LLM's raw reply, as context_gpt: letters span, lowercase, an unknown-answer phrase
    -> BLIP-2's answer, else the single answer. An empty reply or an empty result also falls back to BLIP-2
    (published code would score ""; see DEVIATIONS in okvqa_llm.py)."""
    if not raw.strip():
        return fallback, "fallback_empty"
    answer = alpha_span(raw).lower()
    if is_unknown(answer):
        return fallback, "fallback_unknown"
    answer = single_answer(answer).strip()
    return (answer, "llm") if answer else (fallback, "fallback_empty")


def clean_summary_answer(raw: str, fallback: str) -> tuple[str, str]:
    """summarized_gpt keeps the letters span only: no lowercasing, no unknown-phrase check, no cutting."""
    answer = alpha_span(raw)
    return (answer, "llm") if answer else (fallback, "fallback_empty")


def parse_questions(raw: str, n: int = N_QUESTIONS) -> list[str]:
    """The proposed questions, one per line, as published: the lines themselves (list numbers and all: the
    published parser computed stripped lines but passed the raw ones on); blank lines dropped, at most n."""
    return [line.strip() for line in raw.split("\n") if line.strip()][:n]


def prompt_texts() -> list[str]:
    """Every fixed text the pipeline sends (for the tiny language model's vocabulary)."""
    texts = [CAPTION_SYSTEM, CAPTION_QUERY, NOUN_SYSTEM, NOUN_PROMPT, QUESTIONS_SYSTEM, QUESTIONS_USER,
             SUMMARY_SYSTEM, SUMMARY_MAIN, SUMMARY_ASKED, SUMMARY_ANSWER, SUMMARY_FINAL, "a photo of"]
    texts += [t for pair in CAPTION_EXAMPLES + NOUN_EXAMPLES for t in pair]
    return texts + list(UNKNOWN_ANSWERS)
