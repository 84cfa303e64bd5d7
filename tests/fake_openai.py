"""A loopback fake of the OpenAI HTTP API, for tests that drive the real `openai` client.

    with FakeOpenAI(answer={"what is 2+2?": "four"}) as server:
        server.fail("429", retry_after=0)           # the next request gets a 429, the one after that succeeds
        llm = make_llm("openai-compatible:fake", base_url=server.url, ...)

It listens on 127.0.0.1 only (port chosen by the OS), speaks `/v1/chat/completions` and `/v1/completions` with the
fields the client parses (id, object, created, model, choices, usage), and records every request in `server.requests`
(path, model, JSON body; never the Authorization header). Faults are served first-in first-out, one per request:

    "429"        rate limited, with a Retry-After header (`retry_after` seconds)
    "500"        internal server error
    "delay"      sleep `seconds` and then answer normally (longer than the client timeout = a timeout)
    "malformed"  200 with a truncated JSON body
    "empty"      a well-formed answer whose text is ""
    "401"        authentication error whose body echoes the bearer token it received, as a careless server might,
                 so a test can check the client never repeats it
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "delay", "malformed", "empty", "401")


def _last_user_text(body: dict) -> str:
    if "prompt" in body:
        return str(body["prompt"])
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


class FakeOpenAI:
    """`answer`: a dict mapping the last user message (or, for completions, a substring of the prompt) to the
    answer, or a function of the request body returning the answer; unmatched requests get "echo: <text>".
    `api_key`: if set, requests bearing any other key get a 401."""

    def __init__(self, answer=None, *, api_key: str | None = None):
        self.answer = answer
        self.api_key = api_key
        self.requests: list[dict] = []
        self._faults: deque = deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- programming ------------------------------------------------------------------------------------------
    def fail(self, kind: str, times: int = 1, **options) -> "FakeOpenAI":
        """Queue `times` faults of one kind (see FAULTS); options: retry_after (429), seconds (delay)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; valid: {', '.join(FAULTS)}")
        with self._lock:
            self._faults.extend([(kind, options)] * times)
        return self

    def reply(self, body: dict) -> str:
        if callable(self.answer):
            return str(self.answer(body))
        text = _last_user_text(body)
        for question, answer in (self.answer or {}).items():
            if text == question or ("prompt" in body and question in text):
                return answer
        return f"echo: {text}"

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True  # a handler sleeping in a "delay" fault must not block shutdown
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_fault(self):
        with self._lock:
            return self._faults.popleft() if self._faults else (None, {})


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return self._send(400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
        fake = self.fake
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        with fake._lock:
            fake.requests.append({"path": self.path, "model": body.get("model"), "body": body})
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
        kind, options = fake._next_fault()
        if kind == "401" or (fake.api_key is not None and token != fake.api_key):
            message = f"Incorrect API key provided: {token}."
            return self._send(401, {"error": {"message": message, "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
        if kind == "429":
            retry = {"Retry-After": str(options.get("retry_after", 0))}
            return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, retry)
        if kind == "500":
            return self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
        if kind == "malformed":
            return self._send_raw(200, b'{"id": "chatcmpl-broken", "choices": [{"mess')
        if kind == "delay":
            time.sleep(options.get("seconds", 1.0))
        text = "" if kind == "empty" else fake.reply(body)
        self._send(200, _completion(self.path, body, text, len(fake.requests)))

    def _send(self, status: int, payload: dict, headers: dict | None = None):
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, data: bytes, headers: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) before we answered
            pass


def _completion(path: str, body: dict, text: str, n: int) -> dict:
    """The response shape the openai client parses; token counts are word counts (good enough to add up)."""
    if path == "/v1/completions":
        prompt_tokens = len(str(body.get("prompt", "")).split())
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        obj, prefix = "text_completion", "cmpl"
    else:
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                  "logprobs": None}
        obj, prefix = "chat.completion", "chatcmpl"
    completion_tokens = len(text.split())
    return {"id": f"{prefix}-fake-{n}", "object": obj, "created": int(time.time()), "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
