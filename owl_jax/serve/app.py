"""The HTTP layer: an OpenAI-compatible chat API over a `Scheduler`, and the chat page.

    POST /v1/chat/completions   chat (streamed as server-sent events with stream=true)
    GET  /v1/models             the one model served
    GET  /health                200 while the engine runs
    GET  /metrics               Prometheus text
    GET  /                      the chat page (owl_jax/serve/static)

Every error is answered with OpenAI's body (`errors.APIError`): 400 for a bad request (never
FastAPI's 422), 404 for another model, 429 when the waiting queue is full, 503 while shutting
down. A client that goes away (a dropped stream, a closed connection while waiting for a
non-streamed answer) has its request cancelled and its slot freed at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from owl_jax.generate.slots import SlotRequest
from owl_jax.serve import media, protocol
from owl_jax.serve.errors import APIError, bad_request
from owl_jax.serve.metrics import Metrics
from owl_jax.serve.scheduler import Closed, QueueFull, Scheduler
from owl_jax.serve.text import AnswerText

STATIC = os.path.join(os.path.dirname(__file__), "static")
MAX_BODY_BYTES = 64 * 2**20
FINISH = {"eos": "stop", "length": "length", "stop": "stop"}


@dataclasses.dataclass
class ServeOptions:
    model_name: str
    max_images: int = 4
    max_tokens_default: int = 256
    allowed_local_media_path: str | None = None


class ChatService:
    """Turns a checked chat request into engine requests, and events back into answers."""

    def __init__(self, pipeline, scheduler: Scheduler, options: ServeOptions):
        self.owl = pipeline           # an `owl_jax.api.OwlPipeline` (family, processor, tokenizer)
        self.scheduler = scheduler
        self.options = options
        self.metrics = Metrics(scheduler.engine.slots)
        self.created = int(time.time())

    # --- request -> engine request ---------------------------------------------------------

    def build(self, chat: protocol.ChatRequest) -> SlotRequest:
        """Runs on a worker thread: images decoded and transformed, the template, the ids."""
        opts = self.options
        if chat.model is not None and chat.model != opts.model_name:
            raise APIError(404, f"the model {chat.model!r} does not exist; this server serves "
                                f"{opts.model_name!r}", "model", "model_not_found")
        if len(chat.images) > opts.max_images:
            raise bad_request(f"At most {opts.max_images} image(s) may be provided in one "
                              f"prompt; this one has {len(chat.images)}.", "messages",
                              "too_many_images")
        images = [media.load(url, param, opts.allowed_local_media_path)
                  for url, param in chat.images]
        # the offline pipeline's processor: the family's image views (Owl3 cuts) and ids
        batch = self.owl.prepare(self.owl.family.build_prompt(chat.turns, len(images)), images)
        ids = np.asarray(batch["input_ids"][0])[np.asarray(batch["attention_mask"][0]) > 0]
        pixels = batch.get("pixel_values")
        req = SlotRequest(ids.tolist(), pixels if pixels is not None and len(pixels) else None,
                          max_new_tokens=chat.max_tokens or opts.max_tokens_default,
                          temperature=chat.temperature, top_p=chat.top_p,
                          seed=0 if chat.seed is None else chat.seed)
        try:
            self.scheduler.engine.check(req)
        except ValueError as e:
            raise bad_request(str(e), "messages", "context_length_exceeded") from None
        return req  # max_tokens past the context is clamped to it (check), as vLLM does

    def submit(self, req: SlotRequest, loop) -> asyncio.Queue:
        events: asyncio.Queue = asyncio.Queue()
        try:
            self.scheduler.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait,
                                                                            ev))
        except QueueFull as e:
            self.metrics.reject("queue_full")
            raise APIError(429, f"the server is busy ({e}); retry later", None,
                           "queue_full") from None
        except Closed as e:
            self.metrics.reject("shutting_down")
            raise APIError(503, str(e), None, "shutting_down") from None
        return events

    async def answer(self, req: SlotRequest, events: asyncio.Queue, stop: list[str],
                     start: float):
        """Yields (text delta, finish_reason or None) until the answer ends."""
        text = AnswerText(self.owl.tokenizer, stop)
        first = True
        while True:
            ev = await events.get()
            if ev.finish_reason == "error":
                raise APIError(500, f"the engine failed: {self.scheduler.error!r}", None,
                               "engine_error")
            if ev.tokens:
                if first:
                    self.metrics.first_token(time.monotonic() - start)
                    first = False
                self.metrics.tokens(len(ev.tokens))
            delta = text.add(ev.tokens, final=ev.finish_reason is not None)
            if text.stopped:
                self.scheduler.cancel(req)
                self.metrics.finish("stop", len(req.ids))
                yield delta, "stop"
                return
            if ev.finish_reason is not None:
                self.metrics.finish(FINISH[ev.finish_reason], len(req.ids))
                yield delta, FINISH[ev.finish_reason]
                return
            if delta:
                yield delta, None

    # --- routes ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        start = time.monotonic()
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chat = protocol.parse(protocol.parse_json(raw))
        req = await run_in_threadpool(self.build, chat)
        events = self.submit(req, asyncio.get_running_loop())
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            return StreamingResponse(self._stream(req, events, chat, cid, created, start),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(request, req, events, chat, cid, created, start)

    def _usage(self, req: SlotRequest) -> dict:
        n = len(req.tokens)
        return {"prompt_tokens": len(req.ids), "completion_tokens": n,
                "total_tokens": len(req.ids) + n}

    async def _complete(self, request, req, events, chat, cid, created, start):
        async def collect():
            parts, reason = [], None
            async for delta, reason in self.answer(req, events, chat.stop, start):
                parts.append(delta)
            return "".join(parts), reason

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left: free the slot
                work.cancel()
                self.scheduler.cancel(req)
                self.metrics.finish("cancelled", len(req.ids))
        if not work.done() or work.cancelled():
            return Response(status_code=499)
        text, reason = work.result()
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created,
            "model": self.options.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": reason}],
            "usage": self._usage(req)})

    async def _stream(self, req, events, chat, cid, created, start):
        def chunk(delta: dict, reason=None, **extra) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.options.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": reason}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for delta, reason in self.answer(req, events, chat.stop, start):
                yield chunk({"content": delta} if delta else {}, reason)
            finished = True
            if chat.include_usage:
                yield ("data: " + json.dumps({
                    "id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.options.model_name, "choices": [],
                    "usage": self._usage(req)}) + "\n\n")
            yield "data: [DONE]\n\n"
        except APIError as e:
            finished = True
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            if not finished:  # the client went away mid-stream: free the slot at once
                self.scheduler.cancel(req)
                self.metrics.finish("cancelled", len(req.ids))

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": self.options.model_name, "object": "model", "created": self.created,
            "owned_by": "owl-jax", "max_model_len": self.scheduler.engine.max_len}]})

    async def health(self, request: Request):
        if not self.scheduler.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request):
        return Response(self.metrics.render(self.scheduler.waiting, self.scheduler.running),
                        media_type="text/plain; version=0.0.4")

    async def page(self, request: Request):
        return FileResponse(os.path.join(STATIC, "index.html"))


async def _api_error(request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _not_found(request, exc):
    status = getattr(exc, "status_code", 404)
    return JSONResponse(APIError(status, f"{request.method} {request.url.path}: "
                                         f"{getattr(exc, 'detail', 'not found')}").body(),
                        status_code=status)


async def _internal(request, exc):
    return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                        status_code=500)


def create_app(pipeline, scheduler: Scheduler, options: ServeOptions) -> Starlette:
    """The ASGI app. The scheduler's thread starts with the app and is closed (requests in
    flight finished) when the app shuts down."""
    service = ChatService(pipeline, scheduler, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not scheduler.alive:
            scheduler.start()
        yield
        await run_in_threadpool(scheduler.close)

    from starlette.exceptions import HTTPException
    from starlette.staticfiles import StaticFiles
    from starlette.routing import Mount
    app = Starlette(
        routes=[Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
                Route("/v1/models", service.models, methods=["GET"]),
                Route("/health", service.health, methods=["GET"]),
                Route("/metrics", service.metrics_text, methods=["GET"]),
                Route("/", service.page, methods=["GET"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static")],
        exception_handlers={APIError: _api_error, HTTPException: _not_found,
                            Exception: _internal},
        lifespan=lifespan)
    app.state.service = service
    return app
