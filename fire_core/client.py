"""One layer for OpenAI-compatible endpoints (GPT-4o, vLLM, fire_core.serve): errors, images as data URLs, rate limits, running async work."""

from __future__ import annotations


class AnnotatorError(RuntimeError):
    """A generation run that cannot go on (too many failures of one class, no API key)."""


def image_data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class RateLimiter:
    """At most ``rpm`` request starts per minute (evenly spaced)."""

    def __init__(self, rpm: int):
        self.interval = 60.0 / rpm
        self.next = 0.0
        self.lock = None

    async def wait(self) -> None:
        import asyncio
        import time

        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


def run_async(coro):
    """Run a coroutine to completion, also inside Jupyter (whose kernel already runs a loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
