"""`still serve CASCADE.json`: the measured cascade as an OpenAI-compatible chat endpoint.

The student answers every request locally; when its confidence (the signal and threshold the
cascade chose on calibration data) is below the threshold, the request goes to the teacher, a
local model or any OpenAI-compatible endpoint (`distill/endpoint.py`'s client). Each response
says who answered (`still.answered_by`, and the `X-Still-Answered-By` header). A teacher that
fails answers with the student and says so (`on_teacher_error: student`), or the request
fails with 502 (`fail`). A bounded queue: beyond `max_queue` requests waiting or running, a
request is refused at once with 503. Built on FastAPI and uvicorn (what `transformers serve`
uses); the models run one request at a time.

Streaming (`"stream": true`) sends the chosen answer as server-sent chat.completion.chunk
events: whether to defer is known only once the student's whole answer and its confidence are,
so the first chunk comes after that decision, not with the student's first token.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from distill.endpoint import EndpointClient
from eval.scorer import generate_texts, generate_with_signals
from still import models
from still.distill_sections import EndpointSection
from still.errors import StillError

log = logging.getLogger(__name__)
TEACHER_ERRORS = ("student", "fail")


@dataclass
class Decoding:
    """The task's generation settings, in the shape eval/scorer.py reads."""

    max_new_tokens: int
    stop: list[str]
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def read_cascade(path: Path) -> dict:
    """The `serve` section of a cascade.json, checked."""
    path = Path(path)
    if not path.is_file():
        raise StillError(f"cascade file not found: {path}", hint="run `still cascade R.yaml` first")
    try:
        serve = json.loads(path.read_text(encoding="utf-8")).get("serve")
    except (ValueError, AttributeError):
        raise StillError(f"{path}: not a cascade.json written by `still cascade`") from None
    if not serve:
        raise StillError(
            f"{path}: has no serve section (no generate task, or model references missing)",
            hint="measure the cascade on a generate task with `still cascade R.yaml`",
        )
    return serve


class EndpointTeacher:
    def __init__(self, url: str, model: str, timeout_s: float):
        self.name = f"teacher ({url})"
        try:
            spec = EndpointSection(url=url, model=model, timeout_s=timeout_s)
        except ValueError as error:  # pydantic's, e.g. a url without http://
            message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
            raise StillError(f"--teacher-url {url}: {message}") from None
        self.client = EndpointClient(spec)

    def answer(self, messages: list[dict], decoding: Decoding) -> str:
        answers = self.client.complete(
            messages, n=1, temperature=0.0, top_p=1.0, max_tokens=decoding.max_new_tokens, seed=0
        )
        if not answers:
            raise StillError(f"{self.client.url}: the server returned no choices")
        return answers[0].text


class LocalTeacher:
    def __init__(self, ref: str):
        self.name = f"teacher ({ref})"
        self.model, self.tokenizer = models.load_model(ref, dtype="float32")
        self.model.eval()

    def answer(self, messages: list[dict], decoding: Decoding) -> str:
        encoded = encode_chat(self.tokenizer, messages)
        return generate_texts(self.model, self.tokenizer, [encoded], decoding, 1)[0].strip()


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


class Cascade:
    """The decision, apart from HTTP: the student's answer, its confidence, and the deferral."""

    def __init__(self, serve: dict, student, tokenizer, teacher, on_teacher_error: str):
        if on_teacher_error not in TEACHER_ERRORS:
            raise StillError(
                f"on_teacher_error must be one of {', '.join(TEACHER_ERRORS)}, "
                f"got {on_teacher_error!r}"
            )
        self.serve, self.student, self.tokenizer = serve, student, tokenizer
        self.teacher, self.on_teacher_error = teacher, on_teacher_error
        self.lock = threading.Lock()  # one request on the models at a time

    def answer(self, messages: list[dict], max_tokens: int | None) -> dict:
        decoding = Decoding(
            max_new_tokens=min(max_tokens or 10**9, self.serve["max_new_tokens"]),
            stop=list(self.serve.get("stop") or []),
        )
        with self.lock:
            import torch

            with torch.inference_mode():
                texts, signals = generate_with_signals(
                    self.student,
                    self.tokenizer,
                    [encode_chat(self.tokenizer, messages)],
                    decoding,
                    1,
                )
            student_text = texts[0].strip()
            value = signals[0][self.serve["signal"]] if signals[0] else None
            threshold = self.serve["threshold"]
            confidence = None if value is None else self.serve["direction"] * value
            defer = threshold is None or confidence is None or confidence < threshold
            info = {
                "answered_by": "student",
                "signal": self.serve["signal"],
                "confidence": confidence,
                "threshold": threshold,
                "deferred": defer,
            }
            if not defer:
                return {"text": student_text, "still": info}
            try:
                text = self.teacher.answer(messages, decoding)
            except StillError as error:
                if self.on_teacher_error == "fail":
                    raise
                log.warning("teacher unreachable, answering with the student: %s", error)
                info["teacher_error"] = str(error)
                return {"text": student_text, "still": info}
            return {"text": text, "still": {**info, "answered_by": "teacher"}}


def build_app(cascade: Cascade, *, max_queue: int = 8, model_name: str = "still-cascade"):
    """The FastAPI app: /v1/chat/completions (plain and streaming), /v1/models, /health."""
    app = FastAPI(title="still cascade")
    slots = threading.BoundedSemaphore(max_queue)

    def error(status: int, message: str) -> JSONResponse:
        body = {"error": {"message": message, "type": "still_error", "code": status}}
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
            messages = body["messages"]
            if not isinstance(messages, list) or not messages or not all(map(_message, messages)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return error(
                400, "the body must be JSON with a non-empty 'messages' list of {role, content}"
            )
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            return error(400, f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not slots.acquire(blocking=False):
            return error(503, f"queue full: {max_queue} requests waiting or running")
        try:
            result = await run_in_threadpool(cascade.answer, messages, max_tokens)
        except StillError as failure:
            return error(502, f"teacher failed and on_teacher_error is fail: {failure}")
        finally:
            slots.release()
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        headers = {"X-Still-Answered-By": result["still"]["answered_by"]}
        if body.get("stream"):
            events = _chunks(completion_id, model_name, result)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return JSONResponse(_completion(completion_id, model_name, result), headers=headers)

    return app


def _message(message) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def _completion(completion_id: str, model_name: str, result: dict) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": "stop",
            }
        ],
        "still": _finite(result["still"]),
    }


def _chunks(completion_id: str, model_name: str, result: dict):
    """Server-sent events: role, the answer in word pieces, the finish with who answered."""

    def event(delta: dict, finish=None, **extra) -> str:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant"})
    words = result["text"].split(" ")
    for number, word in enumerate(words):
        yield event({"content": word if number == 0 else " " + word})
    yield event({}, "stop", still=_finite(result["still"]))
    yield "data: [DONE]\n\n"


def _finite(info: dict) -> dict:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in info.items()
    }


def serve(
    cascade_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    teacher_url: str | None = None,
    teacher_model: str | None = None,
    on_teacher_error: str = "student",
    max_queue: int = 8,
    timeout_s: float = 60.0,
) -> int:
    """Load the student (and a local teacher unless `teacher_url`), then serve until stopped."""
    import uvicorn

    settings = read_cascade(cascade_path)
    if max_queue < 1:
        raise StillError(f"--max-queue must be at least 1, got {max_queue}")
    if teacher_url:
        teacher = EndpointTeacher(teacher_url, teacher_model or settings["teacher"], timeout_s)
    else:
        teacher = LocalTeacher(settings["teacher"])
    student, tokenizer = models.load_model(settings["student"], dtype="float32")
    student.eval()
    cascade = Cascade(settings, student, tokenizer, teacher, on_teacher_error)
    print(
        f"still: serving {settings['student']} first, {teacher.name} when "
        f"{settings['signal']} is below {settings['threshold']}, on http://{host}:{port}/v1"
    )
    uvicorn.run(build_app(cascade, max_queue=max_queue), host=host, port=port, log_level="info")
    return 0
