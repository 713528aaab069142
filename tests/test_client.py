"""fire_core.client: one retry layer for every OpenAI-compatible endpoint, over real HTTP on a
loopback server (stdlib http.server, scripted replies): failed requests are counted once after
their retries, retried attempts separately; keys come from each endpoint's own variable."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fire_core import client, config, dialogue


class _Script:
    """Replies per request (by the user text): a list of HTTP statuses to send before a 200."""

    def __init__(self, failures_before_success: dict[str, list[int]], finish_reason: str = "stop"):
        self.todo = {k: list(v) for k, v in failures_before_success.items()}
        self.finish_reason = finish_reason
        self.seen_keys: list[str] = []
        self.lock = threading.Lock()


def _serve(script: _Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"]
            with script.lock:
                script.seen_keys.append(self.headers.get("Authorization", ""))
                todo = script.todo.setdefault(text, [])
                status = todo.pop(0) if todo else 200
            if status != 200:
                payload = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
            else:
                payload = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": script.finish_reason,
                                 "message": {"role": "assistant", "content": f"echo {text}"}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client, "BACKOFF_S", 0.001)


def _ask(url, texts, max_retries, tally, check=None, key_env="FIRE_TEST_KEY"):
    ep = client.Endpoint(url, "m", key_env, timeout_s=10, max_retries=max_retries, concurrency=2)
    msgs = [[{"role": "user", "content": t}] for t in texts]
    return client.run_async(client.chat_many(ep, msgs, {"max_tokens": 8}, tally, check))


def test_failed_requests_are_counted_once_after_their_retries(monkeypatch, fast_backoff):
    monkeypatch.setenv("FIRE_TEST_KEY", "k-test")
    script = _Script({"a": [500, 500, 500], "b": [500], "c": [429, 503], "d": [400]})
    server, url = _serve(script)
    try:
        tally = client.Tally(attempts=[])
        out = _ask(url, ["a", "b", "c", "d", "e"], max_retries=2, tally=tally)
    finally:
        server.shutdown()
    assert [o.value for o in out] == [None, "echo b", "echo c", None, "echo e"]
    assert [o.failure for o in out] == ["transient", None, None, "bad_request", None]
    assert tally.requests == 5
    assert tally.failed == {"transient": 1, "bad_request": 1}  # two failed requests, not five failed attempts
    assert tally.retried == {"transient": 2 + 1 + 1, "rate_limited": 1}  # a: 2 retries, b: 1, c: 429 then 503
    assert len(tally.attempts) == 3 + 1 + 2 + 1  # every failed attempt is logged with what it left
    assert script.todo["a"] == []  # a was tried 1 + max_retries = 3 times


def test_a_reply_the_caller_cannot_use_is_asked_for_again(monkeypatch, fast_backoff):
    monkeypatch.setenv("FIRE_TEST_KEY", "k-test")
    server, url = _serve(_Script({}))
    calls = []

    def check(k, text):
        calls.append(k)
        if len(calls) == 1:
            raise client.Unusable("unparsable", text, "no JSON")
        return text.upper()

    try:
        tally = client.Tally(attempts=[])
        [out] = _ask(url, ["x"], max_retries=3, tally=tally, check=check)
    finally:
        server.shutdown()
    assert out.value == "ECHO X" and out.failure is None
    assert tally.retried == {"unparsable": 1} and not tally.failed
    assert tally.attempts == [{"index": 0, "class": "unparsable", "raw": "echo x", "error": "no JSON"}]


def test_a_cut_off_reply_counts_as_truncated_when_the_caller_checks_replies(monkeypatch, fast_backoff):
    monkeypatch.setenv("FIRE_TEST_KEY", "k-test")
    server, url = _serve(_Script({}, finish_reason="length"))
    try:
        checked = client.Tally()
        [out] = _ask(url, ["x"], max_retries=1, tally=checked, check=lambda k, t: t)
        plain = client.Tally()
        [text] = _ask(url, ["x"], max_retries=1, tally=plain)  # a student's answer may end at max_tokens
    finally:
        server.shutdown()
    assert out.failure == "truncated" and checked.failed == {"truncated": 1} and checked.retried == {"truncated": 1}
    assert text.value == "echo x" and not plain.failed


def test_each_endpoint_sends_only_its_own_key(monkeypatch, fast_backoff):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key")
    monkeypatch.delenv("FIRE_TEACHER_API_KEY", raising=False)
    cfg = config.load("06_fire_bench", ["scale=smoke", "dialogue.teacher=openai",
                                        "dialogue.teacher_endpoint=http://127.0.0.1:9/v1", "dialogue.teacher_model=t"])
    _, teacher = dialogue.roles_from_config(cfg.dialogue)
    assert teacher.key_env == "FIRE_TEACHER_API_KEY"
    with pytest.raises(client.AnnotatorError, match="FIRE_TEACHER_API_KEY"):  # never falls back to OPENAI_API_KEY
        client.Endpoint(teacher.base_url, teacher.name, teacher.key_env).api_key("the teacher")
    script = _Script({})
    server, url = _serve(script)
    monkeypatch.setenv("FIRE_TEACHER_API_KEY", "local-teacher-key")
    try:
        _ask(url, ["x"], max_retries=0, tally=client.Tally(), key_env="FIRE_TEACHER_API_KEY")
    finally:
        server.shutdown()
    assert script.seen_keys == ["Bearer local-teacher-key"]


@pytest.mark.parametrize("override", ["annotator.api_key_env=sk-live-123", "dialogue.student_api_key_env=",
                                      "bench.extra_student_api_key_env=my key"])
def test_a_key_env_must_name_a_variable(override):
    with pytest.raises(config.ConfigError, match="must name an environment variable"):
        config.load("06_fire_bench", ["scale=smoke", override])


def test_rate_limiter_spaces_request_starts_evenly():
    """6,000 requests per minute: 11 concurrent starts are spread at least 10 ms apart (no timing
    upper bound: the machine may be slow)."""
    import asyncio
    import time

    limiter = client.RateLimiter(6000)
    starts: list[float] = []

    async def one() -> None:
        await limiter.wait()
        starts.append(time.monotonic())

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(11)))

    asyncio.run(main())
    times = sorted(starts)
    assert times[-1] - times[0] >= 10 * 0.01 - 1e-3
    assert all(b - a >= 0.01 - 2e-3 for a, b in zip(times, times[1:], strict=False))
