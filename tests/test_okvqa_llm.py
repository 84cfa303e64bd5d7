"""The caption + LLM OK-VQA pipeline (tasks/okvqa_llm.py) on injected BLIP-2 callables, with the real `openai`
client talking to a loopback fake server: answers, fallbacks, faults, the cache and its offline replay."""
import sqlite3

import pytest
from PIL import Image

from blip_repro import runs
from blip_repro.errors import UserError
from blip_repro.llm import make_llm
from blip_repro.tasks import okvqa_llm
from blip_repro.tasks import okvqa_llm_prompts as P
from blip_repro.tasks.okvqa_llm_table import paper_row, variant_configs
from fake_openai import FakeOpenAI

FAST = dict(timeout=0.5, backoff_base=0.001, backoff_max=0.01, max_total_wait=20, max_retries=6)
FRUIT = {"red": "apple", "yellow": "banana", "blue": "blueberry"}


def items(n=3):
    colours = list(FRUIT)
    return [{"question_id": i, "image": Image.new("RGB", (8, 8), colours[i % 3]),
             "question": "which fruit has the color of the circle?"} for i in range(n)]


class FakeVision:
    """BLIP-2 stand-in: the image's colour names everything; records what it was asked."""

    def __init__(self):
        self.calls = []

    def colour(self, image):
        rgb = image.getpixel((0, 0))
        return {(255, 0, 0): "red", (255, 255, 0): "yellow", (0, 0, 255): "blue"}[rgb]

    def vision(self):
        def answer(images, questions):
            self.calls.append(("answer", questions))
            return [self.colour(im) for im in images]  # BLIP-2 alone names the colour, not the fruit

        def describe(images, prompts):
            self.calls.append(("describe", prompts))
            return [f"a {self.colour(im)} circle" for im in images]

        def ask(images, questions):
            self.calls.append(("ask", questions))
            return [self.colour(im) for im in images]

        return okvqa_llm.Vision(answer, describe, ask)


def knows_fruit(body):
    """The fake LLM: knows which fruit has which colour, proposes questions, picks nouns."""
    last = body["messages"][-1]["content"]
    system = body["messages"][0]["content"]
    if system == P.QUESTIONS_SYSTEM:
        return "1. What color is the circle?\n2. Is there a circle?\n3. How many shapes are there?"
    if system == P.NOUN_SYSTEM:
        return "Circle."
    for colour, fruit in FRUIT.items():
        if colour in (last if system == P.CAPTION_SYSTEM else " ".join(m["content"] for m in body["messages"][2:-1])):
            return f"{fruit.capitalize()}."
    return "Sorry, I don't know."


@pytest.fixture
def server():
    with FakeOpenAI(answer=knows_fruit) as fake:
        yield fake


def llm(server, tmp_path, **kw):
    return make_llm("openai-compatible:fake-gpt", base_url=server.url, cache_path=tmp_path / "cache.sqlite",
                    **{**FAST, **kw})


def rows(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def test_caption_variant_answers_from_the_caption_with_three_examples(server, tmp_path):
    fake = FakeVision()
    out = okvqa_llm.predict("caption", 3, items(), fake.vision(), llm(server, tmp_path))
    assert [o["answer"] for o in out] == ["apple", "banana", "blueberry"]
    assert [o["blip2_answer"] for o in out] == ["red", "yellow", "blue"]
    assert [o["context"] for o in out] == ["a photo of a red circle", "a photo of a yellow circle",
                                           "a photo of a blue circle"]
    assert ("describe", ["a photo of"] * 3) in fake.calls
    body = server.requests[0]["body"]
    assert body["messages"] == P.caption_messages("a photo of a red circle", items()[0]["question"], 3)
    assert (body["temperature"], body["max_tokens"]) == (0, 10)
    assert all(o["source"] == "llm" and o["llm_usage"]["requests"] == 1 for o in out)


def test_zero_shot_sends_no_examples(server, tmp_path):
    okvqa_llm.predict("caption", 0, items(1), FakeVision().vision(), llm(server, tmp_path))
    assert [m["role"] for m in server.requests[0]["body"]["messages"]] == ["system", "user"]


def test_unknown_and_empty_answers_fall_back_to_blip2_and_empty_is_not_cached(server, tmp_path):
    server.answer = lambda body: "I'm sorry, the context does not say." if "red" in str(body) else "Banana"
    server.fail("empty")  # the first request (the red image) gets an empty answer
    lm = llm(server, tmp_path)
    out = okvqa_llm.predict("caption", 3, items(2), FakeVision().vision(), lm)
    assert [(o["answer"], o["source"]) for o in out] == [("red", "fallback_empty"), ("banana", "llm")]
    assert rows(tmp_path / "cache.sqlite") == 1  # the empty answer was not stored
    again = okvqa_llm.predict("caption", 3, items(2), FakeVision().vision(), lm)
    assert [(o["answer"], o["source"]) for o in again] == [("red", "fallback_unknown"), ("banana", "llm")]


def test_faults_are_retried_and_nothing_failed_is_cached(server, tmp_path):
    server.fail("429", retry_after=0).fail("500").fail("delay", seconds=2).fail("malformed")
    lm = llm(server, tmp_path, timeout=0.3)
    out = okvqa_llm.predict("caption", 3, items(1), FakeVision().vision(), lm)
    assert out[0]["answer"] == "apple" and out[0]["llm_usage"]["retries"] == 4
    assert rows(tmp_path / "cache.sqlite") == 1


def test_a_server_that_keeps_failing_stops_the_run_with_one_clear_line(server, tmp_path):
    server.fail("500", times=100)
    with pytest.raises(UserError, match=r"kept failing: 500 x3 .*max_retries=2") as err:
        okvqa_llm.predict("caption", 3, items(1), FakeVision().vision(), llm(server, tmp_path, max_retries=2))
    assert "\n" not in str(err.value)
    assert rows(tmp_path / "cache.sqlite") == 0


def test_a_second_run_replays_from_the_cache_and_offline(server, tmp_path):
    first = okvqa_llm.predict("caption", 3, items(), FakeVision().vision(), llm(server, tmp_path))
    n = len(server.requests)
    lm = llm(server, tmp_path)
    assert okvqa_llm.predict("caption", 3, items(), FakeVision().vision(), lm) == \
        [dict(o, llm_usage={**o["llm_usage"], "requests": 0, "cache_hits": 1, "prompt_tokens": 0,
                            "completion_tokens": 0}) for o in first]
    assert len(server.requests) == n and lm.stats["requests"] == 0 and lm.stats["cache_hits"] == 3
    server.stop()  # a shared cache file replays with no server at all
    replay = make_llm("openai-compatible:fake-gpt@http://127.0.0.1:9/v1", cache_path=tmp_path / "cache.sqlite",
                      replay_only=True)
    assert [o["answer"] for o in okvqa_llm.predict("caption", 3, items(), FakeVision().vision(), replay)] == \
        ["apple", "banana", "blueberry"]


def test_questions_variant_asks_blip2_the_llms_questions(server, tmp_path):
    fake = FakeVision()
    out = okvqa_llm.predict("questions", 0, items(2), fake.vision(), llm(server, tmp_path))
    asked = ["1. What color is the circle?", "2. Is there a circle?", "3. How many shapes are there?"]
    assert ("ask", asked * 2) in fake.calls
    assert out[0]["asked"] == asked and out[0]["asked_answers"] == ["red"] * 3
    assert [o["answer"] for o in out] == ["Apple", "Banana"]  # the summary answer keeps its case, as published
    proposal, summary = server.requests[0]["body"], server.requests[1]["body"]
    assert (proposal["temperature"], proposal["max_tokens"]) == (0.7, 150)
    assert (summary["temperature"], summary["max_tokens"]) == (0.2, 10)
    assert summary["messages"] == P.summary_messages(items()[0]["question"], "red", asked, ["red"] * 3)


def test_noun_variant_adds_blip2s_description_of_the_noun(server, tmp_path):
    fake = FakeVision()
    out = okvqa_llm.predict("noun", 3, items(1), fake.vision(), llm(server, tmp_path))
    assert out[0]["noun"] == "Circle"
    assert ("describe", ["the Circle can be described as"]) in fake.calls
    assert out[0]["context"] == "a photo of a red circle. the Circle can be described as a red circle"
    assert out[0]["answer"] == "apple" and out[0]["llm_usage"]["requests"] == 2


def test_lemmatizer_applies_to_the_final_answers():
    class Echo:
        backend, stats = "fake", {}

        def complete(self, messages, **params):
            return "Apples"

    out = okvqa_llm.predict("caption", 0, items(1), FakeVision().vision(), Echo(),
                            lemmatize=lambda xs: [x.rstrip("s") for x in xs])
    assert out[0]["answer"] == "apple" and out[0]["blip2_answer"] == "red"


def cfg(**kw):
    return runs.eval_config("okvqa_llm", **{"model": "tiny-blip2-t5", "dataset": "shapes-okvqa",
                                            "llm": "openai:gpt-3.5-turbo", **kw})


@pytest.mark.parametrize("bad", ["openai-compatible:m@http://user:sk-secretsecret@host/v1",
                                 "openai-compatible:m@http://user:pw@host/v1", "openai:sk-abcdefghijkl"])
def test_credentials_in_parameters_are_refused(bad):
    with pytest.raises(UserError, match="OPENAI_API_KEY only"):
        okvqa_llm.check_config(cfg(llm=bad))


def test_variants_shots_and_run_ids():
    assert okvqa_llm.check_config(cfg()) == ("caption", 3)
    assert okvqa_llm.check_config(cfg(llm_variant="questions")) == ("questions", 0)
    with pytest.raises(UserError, match="zero-shot"):
        okvqa_llm.check_config(cfg(llm_variant="questions", shots=3))
    with pytest.raises(UserError, match="caption, noun, questions"):
        okvqa_llm.check_config(cfg(llm_variant="nouns"))
    with pytest.raises(UserError, match="needs the parameter 'llm'"):
        okvqa_llm.check_config(cfg(llm=None))
    # where the answers are cached and whether to replay never change a number: same run
    assert cfg().run_id == cfg(llm_cache="/elsewhere/c.sqlite", llm_replay_only=True).run_id
    assert cfg().run_id != cfg(shots=0).run_id != cfg(llm="openai:gpt-4o").run_id
    configs = variant_configs("openai:gpt-3.5-turbo", "caption, questions", "3,0", model="flant5xl",
                              dataset="okvqa")
    assert [(c.llm_variant, c.shots) for c in configs] == [("caption", 3), ("caption", 0), ("questions", 0)]
    assert [paper_row(c.to_dict()) for c in configs] == ["blip23-flant5xl-caption-3shot",
                                                         "blip23-flant5xl-caption-0shot",
                                                         "blip23-flant5xl-questions-0shot"]


def test_tiny_lm_trains_on_prompts_exactly_as_the_local_backend_renders_them():
    import random
    from types import SimpleNamespace

    import torch

    from blip_repro import tiny
    from blip_repro.llm import LocalBackend, render_plain
    from blip_repro.tasks import okvqa_llm_train as T

    tok = tiny.processor("shapes-lm")
    backend = LocalBackend("unused", "chat")
    backend.tokenizer = tok
    captions, okvqa, facts = T._read_train()
    encode, rng = T._Encoder(tok), random.Random(0)
    for kind in T.KINDS:
        for q in okvqa[:10]:
            messages, answer = T._example(kind, q, captions[q["image_id"]], facts, rng)
            prompt, templated = backend.render(messages)
            assert not templated and prompt == render_plain(messages)
            assert encode.messages(messages) == tok(prompt).input_ids
            assert tok.unk_token_id not in tok(prompt + " " + answer).input_ids
    groups = T.train_examples(SimpleNamespace(dataset="shapes", seed=0, limit=60), tok)
    assert groups and all(len(g["prompt_ids"]) == T.GROUP for g in groups)
    batch = T.train_batch_for(tok, groups[:1], None, "lm")
    answers = [a for a in groups[0]["answer_ids"]]
    assert [row[row != -100].tolist() for row in batch["labels"]] == answers  # the answer and </s>, nothing else
    model, _ = tiny.build("tiny-okvqa-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) < 200_000
    assert torch.isfinite(T.train_loss(model, batch, None))
