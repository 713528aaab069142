"""One layer for OpenAI-compatible endpoints (GPT-4o, a vLLM server, ``fire_core.serve``), used
by the FIRE-100K annotator and by the dialogue engine's remote roles::

    ep = client.Endpoint("http://127.0.0.1:8000/v1", "teacher", key_env="FIRE_TEACHER_API_KEY")
    tally = client.Tally()
    outcomes = client.run_async(client.chat_many(ep, [messages, ...], {"max_tokens": 48}, tally))
    outcomes[0].value, outcomes[0].failure      # the reply text, or None and the failure class

Each endpoint names the environment variable its key comes from, so a key is only ever sent to
the endpoint it belongs to. Every request is retried up to ``max_retries`` times: a 429 waits as
long as its Retry-After says, 5xx replies, timeouts, broken connections and malformed bodies back
off exponentially, and a reply the caller's ``check`` rejects (cut off, unparsable) is asked for
again. A 4xx other than 429 is not retried. ``Tally.retried`` counts failed attempts that were tried again, by class;
``Tally.failed`` counts failed *requests* (after their retries, by the class of the last
attempt), and it is ``failed`` that a run's ``max_failure_rate`` is checked against.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# What can go wrong with one attempt. The first four are the endpoint's fault; the last two
# are replies that arrived but cannot be used.
FAILURE_CLASSES = ("rate_limited", "transient", "malformed_body", "bad_request", "truncated", "unparsable")
RETRY_CAP_S = 30.0  # the longest single wait between attempts
# the first back-off; it doubles with every attempt. Only timing depends on it, never a result:
# the tests' fault-injecting server runs set FIRE_RETRY_BACKOFF_S lower to finish sooner.
BACKOFF_S = float(os.environ.get("FIRE_RETRY_BACKOFF_S", "0.5"))


class AnnotatorError(RuntimeError):
    """A run that cannot go on (too many failed requests of one class, no API key)."""


class Unusable(Exception):
    """Raised by a ``check``: the reply arrived but cannot be used (it is asked for again)."""

    def __init__(self, failure: str, raw: str, error: str = ""):
        super().__init__(error or failure)
        self.failure, self.raw, self.error = failure, raw, error


@dataclass
class Endpoint:
    base_url: str
    model: str
    key_env: str  # the environment variable holding this endpoint's key
    timeout_s: float = 60.0
    max_retries: int = 4
    concurrency: int = 8
    requests_per_minute: int | None = None

    def api_key(self, who: str) -> str:
        key = os.environ.get(self.key_env)
        if not key:
            raise AnnotatorError(f"{who} calls {self.base_url} and reads its key from the {self.key_env} "
                                 "environment variable, which is not set (keys never go in configs, parameters "
                                 "or notebooks)")
        return key


@dataclass
class Outcome:
    value: Any = None  # the reply text, or what ``check`` made of it
    failure: str | None = None  # None on success, else the class of the last failed attempt
    raw: str = ""  # the last reply text or error, for the reject log
    error: str = ""


@dataclass
class Tally:
    requests: int = 0
    failed: Counter = field(default_factory=Counter)  # failed requests, by class
    retried: Counter = field(default_factory=Counter)  # failed attempts, by class
    attempts: list[dict[str, Any]] | None = None  # if a list: every failed attempt (index, class, raw text)


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class RateLimiter:
    """At most ``rpm`` request starts per minute (evenly spaced)."""

    def __init__(self, rpm: int):
        self.interval = 60.0 / rpm
        self.next = 0.0
        self.lock: asyncio.Lock | None = None

    async def wait(self) -> None:
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def new_client(ep: Endpoint, who: str):
    """The async OpenAI client of an endpoint, its key read from the endpoint's own variable."""
    import openai

    return openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key(who), timeout=ep.timeout_s,
                              max_retries=0)  # our retries: Retry-After honoured, longer back-off


class Session:
    """One OpenAI-compatible client for a whole run of many calls (the dialogue engine calls a
    role once per step): its event loop runs in a thread of its own, so the client and its
    connection pool live as long as the session, and a call from a notebook (whose kernel runs
    its own loop) works too. ``close()`` ends it::

        s = client.Session(ep, who="the teacher role")
        outcomes = s.run(client.chat_many(ep, messages, {"max_tokens": 48}, tally, client=s.client))
        s.close()
    """

    def __init__(self, ep: Endpoint, who: str = "a role"):
        import threading

        self.ep = ep
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"openai-{ep.model}", daemon=True)
        self.thread.start()
        self.client = new_client(ep, who)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


def run_async(coro):
    """Run a coroutine to completion, also inside Jupyter (whose kernel already runs a loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _note(tally: Tally, k: int, out: Outcome) -> None:
    if tally.attempts is not None:
        tally.attempts.append({"index": k, "class": out.failure, "raw": out.raw, **({"error": out.error} if out.error else {})})


async def _one(client, ep: Endpoint, k: int, messages, create_kw: dict[str, Any], check, tally: Tally, sem,
               limiter: RateLimiter | None) -> Outcome:
    """One request and its retries."""
    import openai

    last = Outcome(failure="transient")
    for attempt in range(ep.max_retries + 1):
        wait = BACKOFF_S * 2 ** attempt
        if limiter is not None:
            await limiter.wait()
        try:
            async with sem:
                resp = await client.chat.completions.create(model=ep.model, messages=messages, **create_kw)
            choice = resp.choices[0]
            text = choice.message.content or ""
            if choice.finish_reason == "length" and check is not None:
                raise Unusable("truncated", text)
            return Outcome(value=check(text) if check is not None else text, raw=text)
        except openai.RateLimitError as exc:
            last = Outcome(failure="rate_limited", raw=str(exc)[:2000])
            ra = exc.response.headers.get("retry-after") if exc.response is not None else None
            wait = float(ra) if ra else wait
        except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as exc:
            last = Outcome(failure="transient", raw=str(exc)[:2000])
        except openai.APIStatusError as exc:
            last = Outcome(failure="transient" if exc.status_code >= 500 else "bad_request", raw=str(exc)[:2000])
            if exc.status_code < 500:
                _note(tally, k, last)
                tally.failed["bad_request"] += 1
                return last  # the request itself is wrong: asking again will not help
        except (openai.APIResponseValidationError, ValueError) as exc:  # a malformed HTTP body
            last = Outcome(failure="malformed_body", raw=str(exc)[:2000])
        except Unusable as exc:
            last = Outcome(failure=exc.failure, raw=exc.raw, error=exc.error)
        _note(tally, k, last)
        if attempt < ep.max_retries:
            tally.retried[last.failure] += 1
            await asyncio.sleep(min(wait, RETRY_CAP_S))
    tally.failed[last.failure] += 1
    return last


async def chat_many(ep: Endpoint, message_lists: Sequence[list[dict[str, Any]]], create_kw: dict[str, Any],
                    tally: Tally, check: Callable[[int, str], Any] | None = None, who: str = "a role",
                    on_done: Callable[[int, Outcome], None] | None = None, client=None) -> list[Outcome]:
    """Chat completions for every message list, ``ep.concurrency`` in flight, each retried as
    the module docstring says. ``check(index, text)`` turns a reply into the outcome's value or
    raises :class:`Unusable`; ``on_done(index, outcome)`` is called as each request finishes.
    ``client``: a :class:`Session`'s client, kept open for the next call; else one is made and
    closed here."""

    own = client is None
    if own:
        client = new_client(ep, who)
    sem = asyncio.Semaphore(ep.concurrency)
    limiter = RateLimiter(ep.requests_per_minute) if ep.requests_per_minute else None
    tally.requests += len(message_lists)

    async def run(k: int, messages) -> Outcome:
        item_check = (lambda text: check(k, text)) if check is not None else None
        out = await _one(client, ep, k, messages, create_kw, item_check, tally, sem, limiter)
        if on_done is not None:
            on_done(k, out)
        return out

    try:
        return list(await asyncio.gather(*(run(k, m) for k, m in enumerate(message_lists))))
    finally:
        if own:
            await client.close()
