"""A local OpenAI-compatible server: the oracle annotator and this repository's trained models.

    python -m fire_core.serve --port 8765                        # serves the model "oracle"
    python -m fire_core.serve --model base=results/default/01_train_base_vlm/model
    python -m fire_core.serve --model student=results/default/04_train_student/model \
        --model teacher=results/default/03_train_teacher/model   # both roles of the dialogue engine
    python -m fire_core.serve --fault-429 0.1 --fault-500 0.1 --fault-timeout 0.05 \\
        --fault-malformed 0.05 --fault-truncated 0.05 --timeout-delay 5 --seed 0

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (text and ``image_url`` content
parts with base64 data URLs). The oracle reads the task JSON that the openai backend embeds in
its prompt (question, ground truth, scene record, first response) and answers with a dialogue
as JSON, exactly the contract a GPT-4o annotator follows. Fault injection answers a share of
requests with 429 + Retry-After, 500, a delay past the client's timeout, a malformed JSON body,
or a truncated reply (finish_reason "length"), drawn from a seeded generator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# at module level: FastAPI resolves the (string) annotations of the handlers from these globals
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fire_core import annotate, models
from fire_core.prompts import TASK_CLOSE, TASK_OPEN


@dataclass
class Faults:
    p429: float = 0.0
    p500: float = 0.0
    ptimeout: float = 0.0
    pmalformed: float = 0.0
    ptruncated: float = 0.0
    timeout_delay: float = 5.0  # seconds a "timeout" request sleeps: set above the client timeout
    retry_after: float = 0.2  # seconds announced in Retry-After
    delay: float = 0.0  # added to every request (to make concurrency matter in benchmarks)
    seed: int = 0
    rng: random.Random = field(default_factory=random.Random)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def draw(self) -> str | None:
        with self.lock:
            u = self.rng.random()
        for name, p in (("429", self.p429), ("500", self.p500), ("timeout", self.ptimeout),
                        ("malformed", self.pmalformed), ("truncated", self.ptruncated)):
            if u < p:
                return name
            u -= p
        return None


def task_from_messages(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    for m in messages:
        content = m.get("content")
        texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or [] if isinstance(p, dict)]
        for t in texts:
            if TASK_OPEN in t:
                body = t.split(TASK_OPEN, 1)[1].split(TASK_CLOSE, 1)[0]
                return json.loads(body)
    return None


def decode_image(url: str):
    from PIL import Image

    m = re.match(r"data:image/[a-z]+;base64,(.*)", url, re.S)
    if not m:
        raise ValueError("only base64 data URLs are accepted")
    return Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert("RGB")


def to_chat(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages -> this repository's chat messages and the images they carry."""
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for p in content or []:
            if p.get("type") == "image_url":
                images.append(decode_image(p["image_url"]["url"]))
                parts.append({"type": "image"})
            elif p.get("type") == "text":
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


def create_app(hf_models: dict[str, str] | None = None, faults: Faults | None = None):

    faults = faults or Faults()
    faults.rng.seed(faults.seed)
    loaded: dict[str, Any] = {}
    names = ["oracle", *(hf_models or {})]
    gen_lock = threading.Lock()  # one generation at a time: torch on 2 cores
    app = FastAPI(title="fire_core OpenAI-compatible server")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "fire_core"} for n in names]}

    def completion(model: str, content: str, finish: str = "stop") -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                             "finish_reason": finish}],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(content.split()), "total_tokens": 0}}

    def run_hf(name: str, body: dict[str, Any]) -> str:
        chat, images = to_chat(body["messages"])
        if len(images) != 1:
            raise ValueError(f"expected exactly one image, got {len(images)}")
        with gen_lock:
            # loading under the lock too: from_pretrained toggles process-global init state, so two
            # threads loading at once (the first requests for two models) can get broken weights
            if name not in loaded:
                loaded[name] = models.load(hf_models[name])
            model, proc = loaded[name]
            return models.generate(model, proc, [chat], images, max_new_tokens=int(body.get("max_tokens") or 64),
                                   do_sample=float(body.get("temperature") or 0) > 0,
                                   temperature=float(body.get("temperature") or 1.0), seed=body.get("seed"))[0]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return JSONResponse({"error": {"message": "body is not JSON", "type": "invalid_request_error"}}, 400)
        name = body.get("model")
        if name not in names:
            return JSONResponse({"error": {"message": f"model '{name}' not found; have {names}",
                                           "type": "invalid_request_error"}}, 404)
        if faults.delay:
            await asyncio.sleep(faults.delay)
        fault = faults.draw()
        if fault == "429":
            return JSONResponse({"error": {"message": "rate limited (injected)", "type": "rate_limit_error"}}, 429,
                                headers={"Retry-After": str(faults.retry_after)})
        if fault == "500":
            return JSONResponse({"error": {"message": "server error (injected)", "type": "server_error"}}, 500)
        if fault == "timeout":
            await asyncio.sleep(faults.timeout_delay)
        if fault == "malformed":
            return Response(content='{"id": "chatcmpl-x", "choices": [{"message": ', media_type="application/json")
        try:
            if name == "oracle":
                task = task_from_messages(body.get("messages", []))
                if task is None:
                    return JSONResponse({"error": {"message": "no task JSON in the prompt",
                                                   "type": "invalid_request_error"}}, 400)
                turns = annotate.oracle_dialogue(task["sample"], task["first_response"], task["threshold"],
                                                 task["max_turns"], task["seed"], task.get("fix_prob", 0.6))
                content = json.dumps({"turns": [{k: t[k] for k in annotate.TURN_KEYS} for t in turns]})
            else:
                content = await asyncio.to_thread(run_hf, name, body)
        except (ValueError, KeyError) as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, 400)
        if fault == "truncated":
            return completion(name, content[: max(1, len(content) // 2)], finish="length")
        return completion(name, content)

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description="OpenAI-compatible server for the oracle and trained models")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                    help="serve a saved model directory under NAME (repeatable)")
    for f in ("429", "500", "timeout", "malformed", "truncated"):
        ap.add_argument(f"--fault-{f}", type=float, default=0.0, help=f"share of requests answered with {f}")
    ap.add_argument("--timeout-delay", type=float, default=5.0)
    ap.add_argument("--retry-after", type=float, default=0.2)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds added to every request")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hf = {}
    for spec in args.model:
        if "=" not in spec:
            ap.error(f"--model wants NAME=PATH, got '{spec}'")
        k, v = spec.split("=", 1)
        hf[k] = v
    faults = Faults(p429=args.fault_429, p500=args.fault_500, ptimeout=args.fault_timeout,
                    pmalformed=args.fault_malformed, ptruncated=args.fault_truncated,
                    timeout_delay=args.timeout_delay, retry_after=args.retry_after, delay=args.delay, seed=args.seed)
    uvicorn.run(create_app(hf, faults), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
