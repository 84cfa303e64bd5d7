"""blip_repro.llm against a loopback OpenAI fake (real `openai` client) and a tiny local transformers model."""
import logging
import multiprocessing
import sqlite3
import traceback

import pytest

from blip_repro.errors import UserError
from blip_repro.llm import make_llm, render_plain
from fake_openai import FakeOpenAI

QUESTION = [{"role": "system", "content": "Give a single answer in one or two words."},
            {"role": "user", "content": "Context: a photo of a zebra. Question: where do they live?"}]
ANSWERS = {QUESTION[-1]["content"]: "africa"}
FAST = dict(timeout=0.5, backoff_base=0.001, backoff_max=0.01, max_total_wait=20)


def ask(text):
    return [{"role": "user", "content": text}]


def rows(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


@pytest.fixture
def server():
    with FakeOpenAI(answer=ANSWERS) as fake:
        yield fake


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def compatible(server, tmp_path, **kw):
    return make_llm("openai-compatible:fake-model", base_url=server.url, cache_path=tmp_path / "c.sqlite",
                    **{**FAST, **kw})


def test_chat_round_trip_sends_messages_and_params(server, tmp_path):
    llm = make_llm(f"openai-compatible:fake-model@{server.url}", cache_path=tmp_path / "c.sqlite", **FAST)
    assert llm.complete(QUESTION, temperature=0, max_tokens=10, stop=["\n"]) == "africa"
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["messages"] == QUESTION and request["body"]["model"] == "fake-model"
    assert (request["body"]["temperature"], request["body"]["max_tokens"], request["body"]["stop"]) == (0, 10, ["\n"])


def test_completions_endpoint_renders_messages_to_one_prompt(server, tmp_path):
    llm = compatible(server, tmp_path, endpoint="completions")
    assert llm.complete(QUESTION, temperature=0) == "africa"
    (request,) = server.requests
    assert request["path"] == "/v1/completions"
    assert request["body"]["prompt"] == render_plain(QUESTION)
    assert request["body"]["prompt"].endswith("user: " + QUESTION[-1]["content"] + "\nassistant:")


def test_retries_429_500_timeout_and_malformed_then_succeeds(server, tmp_path):
    server.fail("429", retry_after=0).fail("500").fail("delay", seconds=2).fail("malformed")
    llm = compatible(server, tmp_path, timeout=0.2)
    assert llm.complete(QUESTION) == "africa"
    assert len(server.requests) == 5
    assert llm.stats["requests"] == 1 and llm.stats["retries"] == 4


def test_total_wait_is_bounded_and_the_error_says_what_kept_failing(server, tmp_path):
    server.fail("500", times=10_000)
    llm = compatible(server, tmp_path, max_retries=10_000, max_total_wait=0.3, backoff_base=0.02, backoff_max=0.05)
    with pytest.raises(UserError, match=r"kept failing: 500 x\d+ .*max_total_wait=0.3") as err:
        llm.complete(QUESTION)
    assert "\n" not in str(err.value) and server.url.rstrip("/") in str(err.value)
    assert rows(tmp_path / "c.sqlite") == 0


def test_max_retries_bounds_the_attempts(server, tmp_path):
    server.fail("500", times=10)
    with pytest.raises(UserError, match=r"500 x3 .*max_retries=2"):
        compatible(server, tmp_path, max_retries=2).complete(QUESTION)
    assert len(server.requests) == 3


def test_retry_after_beyond_the_wait_budget_fails_at_once(server, tmp_path):
    server.fail("429", retry_after=3600)
    with pytest.raises(UserError, match="Retry-After 3600"):
        compatible(server, tmp_path, max_total_wait=5).complete(QUESTION)
    assert len(server.requests) == 1


def test_rejected_key_is_a_clear_error_without_retries(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-0000000000")
    server.api_key = "sk-right-1111111111"
    llm = make_llm("openai:gpt-3.5-turbo", base_url=server.url, cache_path=tmp_path / "c.sqlite", **FAST)
    with pytest.raises(UserError, match=f"OPENAI_API_KEY rejected by {server.url}: 401"):
        llm.complete(QUESTION)
    assert len(server.requests) == 1


def test_openai_backend_needs_the_key_in_the_environment(server, tmp_path):
    with pytest.raises(UserError, match="OPENAI_API_KEY is not set"):
        make_llm("openai:gpt-3.5-turbo", base_url=server.url, cache_path=tmp_path / "c.sqlite")


@pytest.mark.parametrize("spec", ["gpt-3.5-turbo", "anthropic:claude", "openai:", "openai-compatible:m"])
def test_bad_specs_are_user_errors(spec, tmp_path):
    with pytest.raises(UserError, match="openai-compatible"):
        make_llm(spec, cache_path=tmp_path / "c.sqlite")


def test_second_call_is_a_cache_hit_even_with_another_server_and_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-first-key-000000")
    first = make_llm("openai:gpt-3.5-turbo", base_url=server.url, cache_path=tmp_path / "c.sqlite", **FAST)
    assert first.complete(QUESTION, temperature=0) == "africa"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other-key-111111")
    with FakeOpenAI(answer=lambda body: "a different answer") as other:
        again = make_llm("openai:gpt-3.5-turbo", base_url=other.url, cache_path=tmp_path / "c.sqlite", **FAST)
        assert again.complete(QUESTION, temperature=0) == "africa"
        assert other.requests == [] and again.stats["cache_hits"] == 1 and again.stats["requests"] == 0
        assert again.complete(QUESTION, temperature=0.7) == "a different answer"  # other params, other entry


def test_stats_count_tokens_and_cost_of_requests_sent(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-000000000")
    llm = make_llm("openai:gpt-3.5-turbo", base_url=server.url, cache_path=tmp_path / "c.sqlite", **FAST)
    llm.complete(QUESTION)
    llm.complete(QUESTION)
    prompt_words = sum(len(m["content"].split()) for m in QUESTION)  # the fake counts words as tokens
    assert llm.stats["requests"] == 1 and llm.stats["cache_hits"] == 1
    assert (llm.stats["prompt_tokens"], llm.stats["completion_tokens"]) == (prompt_words, 1)
    assert llm.stats["estimated_cost_usd"] == pytest.approx((prompt_words * 0.50 + 1 * 1.50) / 1e6)
    assert compatible(server, tmp_path).stats["estimated_cost_usd"] is None  # no price for unknown models


def test_replay_only_answers_from_the_cache_offline_and_fails_on_a_miss(server, tmp_path):
    compatible(server, tmp_path).complete(QUESTION)
    server.stop()
    replay = make_llm("openai:gpt-3.5-turbo", cache_path=tmp_path / "c.sqlite", replay_only=True)
    with pytest.raises(UserError, match="replay_only"):
        replay.complete(QUESTION)  # cached under another backend: a different request
    replay = make_llm("openai-compatible:fake-model@http://127.0.0.1:9/v1", cache_path=tmp_path / "c.sqlite",
                      replay_only=True)
    assert replay.complete(QUESTION) == "africa"
    with pytest.raises(UserError, match=r"replay_only: no answer in .*c\.sqlite"):
        replay.complete(ask("a question never asked"))
    with pytest.raises(UserError, match="does not exist"):
        make_llm("openai:gpt-3.5-turbo", cache_path=tmp_path / "missing.sqlite", replay_only=True)


def test_empty_answers_and_failures_are_not_cached(server, tmp_path):
    llm = compatible(server, tmp_path, max_retries=1)
    server.fail("empty")
    assert llm.complete(QUESTION) == ""
    assert rows(tmp_path / "c.sqlite") == 0
    server.fail("500", times=2)
    with pytest.raises(UserError):
        llm.complete(QUESTION)
    assert rows(tmp_path / "c.sqlite") == 0
    assert llm.complete(QUESTION) == "africa"  # asked again, answered, now cached
    assert rows(tmp_path / "c.sqlite") == 1 and len(server.requests) == 4


def _worker(url, cache_path, order):
    llm = make_llm("openai-compatible:fake-model", base_url=url, cache_path=cache_path, **FAST)
    return {i: llm.complete(ask(f"question {i}")) for i in order}


def test_two_processes_share_one_cache(server, tmp_path):
    cache = tmp_path / "c.sqlite"
    orders = [list(range(0, 60)), list(range(59, 19, -1))]  # 20..59 asked by both, in opposite orders
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_worker, [(server.url, cache, order) for order in orders])
    for result in results:
        assert all(answer == f"echo: question {i}" for i, answer in result.items())
    assert rows(cache) == 60
    assert _worker("http://127.0.0.1:9/v1", cache, range(60)) == results[0]  # all replayed, server not needed


def test_api_key_never_reaches_errors_logs_or_files(server, tmp_path, monkeypatch, caplog, capfd):
    key = "sk-LEAKTEST-5f3a9c0d7e1b2a4c6e8f0a1b"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    caplog.set_level(logging.DEBUG)  # openai, httpx and our retry warnings, at their most verbose
    server.api_key = key
    llm = make_llm("openai:gpt-3.5-turbo", base_url=server.url, cache_path=tmp_path / "c.sqlite", **FAST,
                   max_retries=2)
    texts = [llm.complete(QUESTION), repr(llm), str(llm.stats), str(vars(llm))]
    server.fail("500", times=3)
    server.fail("401")  # the fake echoes the bearer token it received in its error body
    for _ in range(2):
        with pytest.raises(UserError) as err:
            llm.complete(ask("another question"))
        texts += [str(err.value), "".join(traceback.format_exception(err.value))]
    assert "rejected" in texts[-2] and "kept failing" in texts[-4]
    out, errs = capfd.readouterr()
    texts += [caplog.text, out, errs]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert rows(tmp_path / "c.sqlite") == 1
    assert not [t for t in texts if key in t or "LEAKTEST" in t]


def _tiny_local_model(folder, seq2seq, chat_template=None):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, \
        T5ForConditionalGeneration

    words = "[PAD] [UNK] [EOS] system user assistant : < > what is the zebra where do they live africa a photo of"
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words.split())}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    ids = dict(vocab_size=len(words.split()), pad_token_id=0, eos_token_id=2)
    if seq2seq:
        config = T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, **ids)
        T5ForConditionalGeneration(config).save_pretrained(folder)
    else:
        GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=128, bos_token_id=2, **ids)) \
            .save_pretrained(folder)


@pytest.mark.parametrize("seq2seq", [False, True], ids=["causal", "seq2seq"])
def test_local_backend_answers_greedily_from_a_folder(tmp_path, seq2seq):
    _tiny_local_model(tmp_path / "lm", seq2seq)
    answers = [make_llm(f"local:{tmp_path / 'lm'}", cache_path=tmp_path / f"c{i}.sqlite").complete(
        QUESTION, temperature=0, max_tokens=4) for i in range(2)]
    assert isinstance(answers[0], str) and answers[0] == answers[1]  # greedy: the same answer, fresh caches


def test_local_backend_uses_the_chat_template_when_the_tokenizer_has_one(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    _tiny_local_model(tmp_path / "lm", seq2seq=False, chat_template=template)
    llm = make_llm(f"local:{tmp_path / 'lm'}", cache_path=tmp_path / "c.sqlite")
    llm.complete(ask("where do they live"), max_tokens=2)
    assert llm.stats["prompt_tokens"] == len("< user > where do they live < assistant >".split())
    plain = make_llm(f"local:{tmp_path / 'lm'}", endpoint="completions", cache_path=tmp_path / "c2.sqlite")
    plain.complete(ask("where do they live"), max_tokens=2)
    assert plain.stats["prompt_tokens"] == len("user : where do they live assistant :".split())


def test_local_backend_missing_folder_is_a_user_error(tmp_path):
    llm = make_llm(f"local:{tmp_path / 'nothing-here'}", cache_path=tmp_path / "c.sqlite")
    with pytest.raises(UserError, match="could not be loaded"):
        llm.complete(QUESTION)


def test_credentials_and_unknown_params_are_refused_before_sending(server, tmp_path):
    llm = compatible(server, tmp_path)
    with pytest.raises(UserError, match=r"\$OPENAI_API_KEY"):
        llm.complete(QUESTION, api_key="sk-given-as-a-param")
    with pytest.raises(UserError, match="not accepted.*temprature"):
        llm.complete(QUESTION, temprature=0)
    assert server.requests == []
