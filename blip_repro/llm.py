"""Language models for the caption + LLM OK-VQA pipeline (protocols.md §6), behind one small interface.

    llm = make_llm("openai:gpt-3.5-turbo", cache_path="outputs/llm_cache.sqlite")
    llm.complete([{"role": "user", "content": "Context: a photo of a zebra. Question: where is it from?"}],
                 temperature=0, max_tokens=10)

Backends (spec "backend:model"):
  openai:<model>                         the OpenAI API; the key comes from $OPENAI_API_KEY only
  openai-compatible:<model>@<base_url>   any server speaking the OpenAI API (vLLM, llama.cpp); or pass base_url=
  local:<folder-or-hub-id>               a transformers causal or seq2seq LM run in-process (greedy at temperature 0)

Every answer is cached in SQLite, keyed by the request (backend, model, endpoint, messages, params) and nothing
else: no key, no server address. The cache file is the artifact of a run: copy it next to a notebook and the same
requests replay offline to the same answers, so the same numbers (`replay_only=True` proves it: a miss is an error).
Several processes may share one file (WAL mode); keep it on a local disk, SQLite locking is unreliable over NFS.
The API key is never stored, logged or put into an error message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from blip_repro.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("openai", "openai-compatible", "local")
ENDPOINTS = ("chat", "completions")
DEFAULT_CACHE = "outputs/llm_cache.sqlite"
# USD per 1M (input, output) tokens, as of 2024 list prices (openai.com/pricing); other models: cost None.
PRICES_PER_MTOK = {"gpt-3.5-turbo": (0.50, 1.50), "gpt-3.5-turbo-0125": (0.50, 1.50)}
LOCAL_PARAMS = ("temperature", "max_tokens", "stop", "top_p", "seed")
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}")


def render_plain(messages: list[dict]) -> str:
    """Chat messages as one prompt ("role: content" lines, ending with "assistant:" for the model to continue)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def request_key(request: dict) -> str:
    """sha256 of the canonical JSON of a request: equal requests, equal keys, on every machine."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _redact(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        text = text.replace(key, "***")
    return _KEY_LIKE.sub("sk-***", text)


def _display_url(url: str) -> str:
    """A base URL without user:password@ (credentials some servers take in the URL)."""
    parts = urlsplit(str(url).rstrip("/"))
    if not parts.hostname:
        return str(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


class ResponseCache:
    """SQLite file of answers. INSERT OR IGNORE: the first answer stored for a request is the one replayed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn, self._pid = None, None

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # a connection must not cross a fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
                         "response TEXT NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, "
                         "created TEXT NOT NULL)")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._connection().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, request: dict, response: str, usage: dict) -> None:
        row = (key, json.dumps(request, sort_keys=True, ensure_ascii=False), response,
               usage.get("prompt_tokens"), usage.get("completion_tokens"),
               datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self._lock:
            self._connection().execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]


class LLM:
    """`complete(messages, **params) -> str`; params as in the OpenAI API (temperature, max_tokens, stop, ...).

    `stats` counts this object's work: requests sent (retries not included), cache hits, tokens and estimated cost
    of the requests sent (cache hits cost nothing), and retries."""

    def __init__(self, backend: str, model: str, endpoint: str, cache: ResponseCache, call, *,
                 replay_only: bool = False):
        self.backend, self.model, self.endpoint = backend, model, endpoint
        self.cache, self.replay_only, self._call = cache, replay_only, call
        price = PRICES_PER_MTOK.get(model) if backend == "openai" else None
        self._price = price
        self.stats = {"requests": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "estimated_cost_usd": 0.0 if price else None, "retries": 0}

    def __repr__(self) -> str:
        return f"LLM('{self.backend}:{self.model}', endpoint='{self.endpoint}', cache='{self.cache.path}')"

    def complete(self, messages: list[dict], **params) -> str:
        _check_messages(messages)
        if {"api_key", "extra_headers", "timeout"} & set(params):
            # credentials come from the environment only, and params are stored in the cache
            raise UserError("complete() takes sampling params only: the key is read from $OPENAI_API_KEY, "
                            "the timeout is a make_llm() argument")
        params = {k: v for k, v in params.items() if v is not None}
        request = {"backend": self.backend, "model": self.model, "endpoint": self.endpoint,
                   "messages": messages, "params": params}
        key = request_key(request)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            return cached
        if self.replay_only:
            raise UserError(f"replay_only: no answer in {self.cache.path} for request {key[:12]} "
                            f"({self.backend}:{self.model}); copy the cache file of the original run here, "
                            f"or run with replay_only=False where the LLM is reachable")
        text, usage = self._call(messages, params)
        self._count(usage)
        if not (text or "").strip():
            return ""  # the pipeline falls back to BLIP-2's own answer; not cached, so a re-run asks again
        self.cache.put(key, request, text, usage)
        return text

    def _count(self, usage: dict) -> None:
        self.stats["requests"] += 1
        self.stats["retries"] += usage.get("retries", 0)
        for name in ("prompt_tokens", "completion_tokens"):
            self.stats[name] += usage.get(name) or 0
        if self._price:
            self.stats["estimated_cost_usd"] = (self.stats["prompt_tokens"] * self._price[0]
                                                + self.stats["completion_tokens"] * self._price[1]) / 1e6


def _check_messages(messages) -> None:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise UserError("LLM messages must be a non-empty list of {'role': 'system'|'user'|'assistant', "
                        "'content': str} dicts")


class OpenAIBackend:
    """One request through the real `openai` client, retried here (the client's own retries are off) with
    exponential backoff and full jitter, bounded by max_retries and by max_total_wait seconds."""

    def __init__(self, model: str, base_url: str | None, endpoint: str, *, key_required: bool, timeout: float,
                 max_retries: int, max_total_wait: float, backoff_base: float, backoff_max: float):
        import openai

        key = os.environ.get("OPENAI_API_KEY")
        if key_required and not key:
            raise UserError("OPENAI_API_KEY is not set: export it in the environment (it is read from there only), "
                            "or use replay_only=True with a cache file of an earlier run")
        # A callable key keeps the secret out of the client's attributes; it is read when a request is built.
        client = openai.OpenAI(api_key=(lambda: os.environ.get("OPENAI_API_KEY") or "EMPTY"), base_url=base_url,
                               max_retries=0, timeout=timeout)
        self.openai, self.client, self.model, self.endpoint = openai, client, model, endpoint
        self.url = _display_url(str(client.base_url))
        self.timeout, self.max_retries, self.max_total_wait = timeout, max_retries, max_total_wait
        self.backoff_base, self.backoff_max = backoff_base, backoff_max

    def __call__(self, messages: list[dict], params: dict) -> tuple[str, dict]:
        start, failures, last = time.monotonic(), Counter(), ""
        for attempt in range(self.max_retries + 1):
            remaining = self.max_total_wait - (time.monotonic() - start)
            try:
                text, usage = self._once(messages, params, timeout=min(self.timeout, max(remaining, 1.0)))
                return text, {**usage, "retries": attempt}
            except Exception as err:  # noqa: BLE001 - sorted into fatal / retryable right here
                kind, last, wait_hint = self._classify(err)
            failures[kind] += 1
            delay = max(random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt)), wait_hint)
            if attempt == self.max_retries or time.monotonic() - start + delay > self.max_total_wait:
                break
            log.warning("LLM request to %s failed (%s); retry %d/%d in %.2f s",
                        self.url, last, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        tally = ", ".join(f"{kind} x{n}" for kind, n in failures.items())
        raise UserError(f"LLM requests to {self.url} (model {self.model}) kept failing: {tally} in "
                        f"{time.monotonic() - start:.1f} s; last: {last}. Gave up at max_retries={self.max_retries} "
                        f"/ max_total_wait={self.max_total_wait} s: check the server, or raise these limits")

    def _once(self, messages: list[dict], params: dict, timeout: float) -> tuple[str, dict]:
        if self.endpoint == "chat":
            response = self.client.chat.completions.create(model=self.model, messages=messages, timeout=timeout,
                                                           **params)
        else:
            response = self.client.completions.create(model=self.model, prompt=render_plain(messages),
                                                      timeout=timeout, **params)
        try:
            choice = response.choices[0]
            text = choice.message.content if self.endpoint == "chat" else choice.text
            usage = response.usage
        except (AttributeError, IndexError, TypeError, KeyError):
            raise ValueError("response has no choices[0] text") from None
        counts = {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                  "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        return text or "", counts

    def _classify(self, err: Exception) -> tuple[str, str, float]:
        """(kind, detail, seconds the server asked us to wait) of a retryable error; raise UserError otherwise.
        `raise ... from None`: the openai exception holds the request (and its Authorization header)."""
        openai = self.openai
        status = getattr(err, "status_code", None)
        body = getattr(err, "body", None)
        said = _redact(str(body.get("message", "") if isinstance(body, dict) else body or ""))[:200]
        code = body.get("code") if isinstance(body, dict) else None
        if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
            raise UserError(f"OPENAI_API_KEY rejected by {self.url}: {status} {said}") from None
        if isinstance(err, openai.RateLimitError) and code == "insufficient_quota":
            raise UserError(f"LLM quota exhausted at {self.url}: {said}; add credit or use another key") from None
        if isinstance(err, openai.APITimeoutError):
            return "timeout", f"no answer within the {self.timeout} s timeout", 0.0
        if isinstance(err, openai.APIConnectionError):
            return "connection error", f"cannot connect to {self.url}", 0.0
        if isinstance(err, openai.APIStatusError) and (status in (408, 409, 429) or status >= 500):
            wait = _retry_after(err.response.headers)
            return str(status), f"{status} {said}" + (f" (Retry-After {wait:g} s)" if wait else ""), wait
        if isinstance(err, openai.APIStatusError):
            raise UserError(f"LLM request rejected by {self.url}: {status} {said}; check the model name "
                            f"'{self.model}' and the parameters") from None
        if isinstance(err, (ValueError, openai.APIResponseValidationError)):
            return "malformed response", f"malformed response ({_redact(str(err))[:120]})", 0.0
        if isinstance(err, TypeError):  # the client refused an argument before sending anything
            raise UserError(f"LLM params not accepted: {_redact(str(err))[:200]}") from None
        raise err


def _retry_after(headers) -> float:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
    return 0.0


class LocalBackend:
    """A transformers LM in this process, loaded on first use (a replayed run never loads it)."""

    def __init__(self, name: str, endpoint: str):
        self.name, self.endpoint, self.model, self.tokenizer = name, endpoint, None, None

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(self.name)
            self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        except (OSError, ValueError) as err:
            raise UserError(f"local LLM '{self.name}' could not be loaded ({type(err).__name__}): give a folder "
                            f"holding a transformers model and tokenizer, or a hub id (downloaded first when "
                            f"offline)") from None
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = cls.from_pretrained(self.name).to(device).eval()

    def render(self, messages: list[dict]) -> tuple[str, bool]:
        """(prompt, whether the tokenizer's chat template made it: the template then adds the special tokens)."""
        if self.endpoint == "chat" and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
        return render_plain(messages), False

    def __call__(self, messages: list[dict], params: dict) -> tuple[str, dict]:
        import torch

        unknown = sorted(set(params) - set(LOCAL_PARAMS))
        if unknown:
            raise UserError(f"local LLM does not take {unknown}; valid params: {', '.join(LOCAL_PARAMS)}")
        if self.model is None:
            self._load()
        prompt, templated = self.render(messages)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated,
                                return_token_type_ids=False).to(self.model.device)
        temperature = params.get("temperature") or 0.0
        options = {"max_new_tokens": params.get("max_tokens") or 64, "do_sample": temperature > 0,
                   "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                   else self.tokenizer.eos_token_id}
        if temperature > 0:
            options.update(temperature=temperature, top_p=params.get("top_p", 1.0))
            if params.get("seed") is not None:
                torch.manual_seed(params["seed"])
        with torch.no_grad():
            out = self.model.generate(**inputs, **options)[0]
        n_prompt = inputs["input_ids"].shape[1]
        new = out if self.model.config.is_encoder_decoder else out[n_prompt:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        stops = params.get("stop") or []
        for stop in [stops] if isinstance(stops, str) else stops:
            text = text.split(stop)[0]
        return text.strip(), {"prompt_tokens": n_prompt, "completion_tokens": len(new)}


def make_llm(spec: str, *, base_url: str | None = None, endpoint: str = "chat", cache_path=None,
             timeout: float = 30, max_retries: int = 6, max_total_wait: float = 120, backoff_base: float = 1.0,
             backoff_max: float = 30.0, replay_only: bool = False, cache_model: str | None = None) -> LLM:
    """An LLM from "backend:model" (see the module docstring).

    base_url: the server of an openai-compatible spec (or a proxy for openai:). endpoint: "chat" or "completions"
    (the messages rendered to one prompt). cache_path: default outputs/llm_cache.sqlite. timeout: seconds per
    request; retries back off from backoff_base to backoff_max seconds (or what Retry-After asks) and stop after
    max_retries retries or max_total_wait seconds. replay_only: answer from the cache only, a miss is an error.
    cache_model: the model's name in cache keys instead of the spec's (a local folder's path differs between
    machines, the name it was trained under does not)."""
    backend, _, model = str(spec).partition(":")
    if backend not in BACKENDS or not model:
        raise UserError(f"LLM spec {spec!r} is not 'backend:model' with backend one of {', '.join(BACKENDS)} "
                        f"(e.g. openai:gpt-3.5-turbo, openai-compatible:my-model@http://localhost:8000/v1)")
    if endpoint not in ENDPOINTS:
        raise UserError(f"LLM endpoint {endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    if backend == "openai-compatible":
        model, _, url = model.partition("@")
        if url and base_url and url.rstrip("/") != str(base_url).rstrip("/"):
            raise UserError(f"LLM spec names server {_display_url(url)} and base_url= names "
                            f"{_display_url(base_url)}; give one")
        base_url = url or base_url
        if not base_url:
            raise UserError(f"LLM spec {spec!r} needs a server: write openai-compatible:<model>@<base_url> "
                            f"or pass base_url=")
    cache = ResponseCache(cache_path or DEFAULT_CACHE)
    if replay_only and not cache.path.exists():
        raise UserError(f"replay_only=True but the LLM cache {cache.path} does not exist; copy the cache file "
                        f"of the original run there")
    if replay_only:
        call = None
    elif backend == "local":
        call = LocalBackend(model, endpoint)
    else:
        call = OpenAIBackend(model, base_url, endpoint, key_required=backend == "openai", timeout=timeout,
                             max_retries=max_retries, max_total_wait=max_total_wait, backoff_base=backoff_base,
                             backoff_max=backoff_max)
    return LLM(backend, cache_model or model, endpoint, cache, call, replay_only=replay_only)
