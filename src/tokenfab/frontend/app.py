"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, models, health, metrics.

Bodies are read and parsed here (size cap, strict UTF-8, strict JSON types) rather than by
FastAPI's default machinery, so every failure gets the OpenAI error shape and status: 400 for
bad input, 413 for oversized bodies. A client that disconnects, streaming or not, cancels its
engine requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from tokenfab.frontend import beam
from tokenfab.frontend.chat_deltas import ChatDeltas
from tokenfab.frontend.errors import APIError, bad_request, error_body, install_error_handlers
from tokenfab.frontend.fanout import Fanout
from tokenfab.frontend.metrics import FrontendMetrics
from tokenfab.frontend.middleware import AccessMiddleware
from tokenfab.frontend.prompts import Prompts
from tokenfab.frontend.requests import (
    DEFAULT_MAX_TOKENS,
    Limits,
    Prepared,
    check_model,
    prepare_chat,
    prepare_completion,
)
from tokenfab.frontend.responses import (
    ChoiceState,
    chat_completion,
    chat_logprobs,
    chunk,
    completion_logprobs,
    echo_text,
    text_completion,
    usage,
)
from tokenfab.frontend.responses_api import ResponseEvents, ResponsesRequest, response_body, to_chat
from tokenfab.frontend.schemas import ChatCompletionRequest, CompletionRequest
from tokenfab.frontend.workers import WorkerPool
from tokenfab.protocol import GenerateOutput, GenerateRequest
from tokenfab.runtime import RemoteError

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)

_THREAD_PROMPT_CHARS = 20_000
"""Prompts longer than this are templated/tokenized off the event loop."""


@dataclass
class FrontendState:
    pool: WorkerPool
    tokenizer: Any
    model_name: str
    max_model_len: int
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    """Chat completion budget when a request gives none (None: the rest of the context)."""


class ClientDisconnected(Exception):
    pass


def remote_to_api(e: RemoteError, retry_after_s: int = 1) -> APIError:
    if e.code == "invalid_request":
        return bad_request(e.message, _param_in(e.message))
    if e.code in ("queue_full", "unavailable"):
        return APIError(
            503,
            f"The server is overloaded: {e.message}. Retry later.",
            code=e.code,
            headers={"Retry-After": str(retry_after_s)},
        )
    return APIError(500, f"internal error: {e.message}", code=e.code)


def _param_in(message: str) -> str | None:
    """The request field an engine-side validation message names first, if any."""
    head = message.split(" ", 1)[0].rstrip(":")
    known = ("logit_bias", "stop_token_ids", "prompt", "max_tokens", "min_tokens", "seed")
    return head if head in known else None


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is {int(length)} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(part)
    body = b"".join(chunks)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        unknown = [_field_path(x.get("loc", ())) for x in errors if x["type"] == "extra_forbidden"]
        if unknown:
            raise bad_request(
                f"Unrecognized request argument supplied: {unknown[0]}", unknown[0]
            ) from None
        err = errors[0]
        if err.get("type") == "json_invalid":
            raise bad_request(f"invalid JSON: {err['msg']}") from None
        loc = _field_path(err.get("loc", ()))
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise bad_request(f"{loc or 'body'}: {err['msg']}{more}", loc or None) from None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _field_path(loc: tuple) -> str:
    """The field path of a validation error without pydantic's union-branch tags
    (`prompt.list[int].3` -> `prompt.3`)."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif p.isidentifier() and p.lower() == p and p not in _TYPE_TAGS:
            parts.append(p)
    return ".".join(parts)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Callable[[], Any]) -> Any:
    """Run `work()`; if the client goes away first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientDisconnected
    return task.result()


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def build_app(state: FrontendState) -> FastAPI:
    app = FastAPI(title="tokenfab", version="0.1.0", docs_url=None, redoc_url=None)
    metrics = FrontendMetrics(state.pool.router_metrics)
    prompts = Prompts(state.tokenizer)
    limits = Limits(state.max_model_len, state.default_max_tokens, prompts.vocab_size)
    app.state.tokenfab = state
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, metrics=metrics, api_key=state.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        n = len(state.pool.workers)
        return JSONResponse(
            {"status": "ok" if n else "no_workers", "workers": n}, 200 if n else 503
        )

    def model_card() -> dict:
        return {
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "tokenfab",
            "root": state.model_name,
            "parent": None,
            "max_model_len": state.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model(model_id, state.model_name)
        return model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.workers.reports = {r.worker_id: r for r in await state.pool.stats()}
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def prepare(fn: Callable[..., Prepared], req: Any, size: int) -> Prepared:
        check_model(req.model, state.model_name)
        if size > _THREAD_PROMPT_CHARS:
            prep = await asyncio.to_thread(fn, req, prompts, limits)
        else:
            prep = fn(req, prompts, limits)
        prep.created = int(time.time())
        return prep

    async def run(
        request: Request, prep: Prepared, kind: str, resp_req: ResponsesRequest | None = None
    ) -> Response:
        if prep.beam_width:
            return await _beam_search(request, prep)
        arrival = time.monotonic()
        fanout = Fanout(state.pool, prep.build(), metrics, arrival)
        try:
            firsts = await _unless_disconnected(request, fanout.start)
        except RemoteError as e:
            raise remote_to_api(e, state.retry_after_s) from None
        except ClientDisconnected:
            return Response(status_code=499)
        metrics.prompt_tokens.inc(sum(len(p.token_ids) for p in prep.prompts))  # admitted
        states = [ChoiceState() for _ in prep.engine_requests]
        if prep.stream and resp_req is not None:
            return StreamingResponse(
                _guarded_events(
                    _stream_response(resp_req, prep, fanout, firsts, states), fanout, state
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        if prep.stream:
            stream = _stream_chat if kind == "chat" else _stream_completion
            return StreamingResponse(
                _guarded(stream(prep, fanout, firsts, states), prep, fanout, states, state),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def collect() -> None:
            for i, out in enumerate(firsts):
                states[i].add(out)
            async for i, out in fanout.rest():
                states[i].add(out)

        try:
            await _unless_disconnected(request, collect)
        except RemoteError as e:
            raise remote_to_api(e, state.retry_after_s) from None
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            fanout.cancel()
        if resp_req is not None:
            return JSONResponse(response_body(resp_req, prep, state.model_name, states))
        build = chat_completion if kind == "chat" else text_completion
        return JSONResponse(build(prep, state.model_name, prompts, states))

    async def _run_one_token(requests: list[GenerateRequest]) -> list[GenerateOutput]:
        fanout = Fanout(state.pool, requests, metrics, time.monotonic())
        try:
            got = await fanout.start()
            async for i, out in fanout.rest():
                if out.error is not None or (out.logprobs and not got[i].logprobs):
                    got[i] = out
            return got
        finally:
            fanout.cancel()

    async def _beam_search(request: Request, prep: Prepared) -> Response:
        tokenizer = prompts.tokenizer
        eos = prompts.eos_token_id

        async def search_all() -> list[ChoiceState]:
            states = []
            for p, (prompt, params) in enumerate(zip(prep.prompts, prep.sampling, strict=True)):
                eos_ids = frozenset() if params.ignore_eos or eos is None else frozenset([eos])
                beams = await beam.search(
                    _run_one_token,
                    f"{prep.request_id}-{p}",
                    prompt.token_ids,
                    params,
                    prep.beam_width,
                    eos_ids,
                    prep.cache_salt,
                )
                beams += beams[-1:] * (prep.n - len(beams))  # a vocabulary narrower than n
                states += [_beam_state(b, len(prompt.token_ids), eos_ids) for b in beams]
            return states

        def _beam_state(b: beam.Beam, num_prompt: int, eos_ids: frozenset[int]) -> ChoiceState:
            text_ids = [t for t in b.tokens if t not in eos_ids]
            return ChoiceState(
                text=[tokenizer.decode(text_ids, skip_special_tokens=True)],
                num_tokens=len(b.tokens),
                finish_reason="stop" if b.finished else "length",
                num_prompt_tokens=num_prompt,
                token_ids=list(b.tokens),
            )

        try:
            states = await _unless_disconnected(request, search_all)
        except RemoteError as e:
            raise remote_to_api(e, state.retry_after_s) from None
        except ClientDisconnected:
            return Response(status_code=499)
        metrics.prompt_tokens.inc(sum(len(p.token_ids) for p in prep.prompts))
        return JSONResponse(text_completion(prep, state.model_name, prompts, states))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = await read_json(request, ChatCompletionRequest, state.max_body_bytes)
        size = sum(len(m.text()) for m in req.messages)
        return await run(request, await prepare(prepare_chat, req, size), "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read_json(request, CompletionRequest, state.max_body_bytes)
        size = len(req.prompt) if isinstance(req.prompt, str) else 0
        return await run(request, await prepare(prepare_completion, req, size), "completion")

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        req = await read_json(request, ResponsesRequest, state.max_body_bytes)
        chat_req = to_chat(req)
        size = sum(len(m.text()) for m in chat_req.messages)
        return await run(request, await prepare(prepare_chat, chat_req, size), "chat", req)

    def _stream_response(
        req: ResponsesRequest,
        prep: Prepared,
        fanout: Fanout,
        firsts: list[GenerateOutput],
        states: list[ChoiceState],
    ) -> AsyncIterator[bytes]:
        events = ResponseEvents(req, prep, state.model_name)
        deltas = ChatDeltas(prep)

        def text(out: GenerateOutput) -> list[bytes]:
            states[0].add(out)
            content = deltas.feed(out.text, out.finish_reason is not None).get("content")
            return events.text_delta(content) if content else []

        async def gen() -> AsyncIterator[bytes]:
            for data in events.start():
                yield data
            for out in firsts:
                for data in text(out):
                    yield data
            async for _, out in fanout.rest():
                for data in text(out):
                    yield data
            for data in events.finish(states):
                yield data

        return gen()

    def _stream_chat(
        prep: Prepared, fanout: Fanout, firsts: list[GenerateOutput], states: list[ChoiceState]
    ) -> AsyncIterator[bytes]:
        deltas = [ChatDeltas(prep) for _ in states]

        def delta(i: int, out: GenerateOutput) -> dict | None:
            states[i].add(out)
            d = deltas[i].feed(out.text, out.finish_reason is not None)
            lp = None
            if prep.logprobs is not None and out.logprobs:
                lp = chat_logprobs(prompts, out.logprobs, prep.token_ids_as_text)
            if not d and lp is None and out.finish_reason is None:
                return None
            if not d and (lp is not None or out.finish_reason is not None):
                # A token whose text is held back (a partial stop string or character) still
                # carries its logprobs, and a finish with no text left (EOS, a stop string)
                # still carries its reason; vLLM sends both with empty content, and clients
                # (SGLang's tests among them) read `delta.content` as a string.
                d = {"content": ""}
            reason = deltas[i].finish_reason(out.finish_reason)
            return {
                "index": i,
                "delta": d,
                "logprobs": lp,
                "finish_reason": reason,
                "stop_reason": out.stop_reason,
            }

        def sse(c: dict | list[dict]) -> bytes:
            body = chunk(prep, state.model_name, obj, c if isinstance(c, list) else [c])
            if prep.continuous_usage:
                body["usage"] = usage(prep, states)
            return _sse(body)

        obj = "chat.completion.chunk"

        async def gen() -> AsyncIterator[bytes]:
            role = {"role": "assistant", "content": ""}
            # One chunk per choice, as OpenAI and vLLM send them: clients read `choices[0]`
            # of each chunk, so a shared chunk would hide choice 1's role.
            for i in range(len(firsts)):
                yield sse({"index": i, "delta": role, "logprobs": None, "finish_reason": None})
            for i, out in enumerate(firsts):
                c = delta(i, out)
                if c is not None:
                    yield sse(c)
            async for i, out in fanout.rest():
                c = delta(i, out)
                if c is not None:
                    yield sse(c)

        return gen()

    def _stream_completion(
        prep: Prepared, fanout: Fanout, firsts: list[GenerateOutput], states: list[ChoiceState]
    ) -> AsyncIterator[bytes]:
        def piece(i: int, out: GenerateOutput, first: bool) -> dict | None:
            s = states[i]
            text = out.text
            echo_ids: list[int] = []
            if first and prep.echo:
                text = echo_text(prep, prompts, i // prep.n) + text
                echo_ids = prep.prompts[i // prep.n].token_ids
            lp = None
            if prep.logprobs is not None and (out.logprobs or echo_ids):
                lp = completion_logprobs(
                    prompts,
                    out.logprobs or [],
                    s.text_len,
                    echo_ids,
                    out.prompt_logprobs,
                    prep.token_ids_as_text,
                )
            s.add(out)
            s.text_len += len(text)
            if not text and lp is None and out.finish_reason is None:
                return None
            return {
                "index": i,
                "text": text,
                "logprobs": lp,
                "finish_reason": out.finish_reason,
                "stop_reason": out.stop_reason,
            }

        def sse(c: dict) -> bytes:
            body = chunk(prep, state.model_name, "text_completion", [c])
            if prep.continuous_usage:
                body["usage"] = usage(prep, states)
            return _sse(body)

        async def gen() -> AsyncIterator[bytes]:
            for i, out in enumerate(firsts):
                c = piece(i, out, True)
                if c is not None:
                    yield sse(c)
            async for i, out in fanout.rest():
                c = piece(i, out, False)
                if c is not None:
                    yield sse(c)

        return gen()

    return app


async def _guarded_events(
    body: AsyncIterator[bytes], fanout: Fanout, state: FrontendState
) -> AsyncIterator[bytes]:
    """A Responses API stream: a failure becomes an `error` event; the engine requests are
    cancelled however the stream ends."""
    try:
        async for data in body:
            yield data
    except Exception as e:
        if isinstance(e, RemoteError):
            err = remote_to_api(e, state.retry_after_s)
            message, code = err.message, err.status
        else:
            log.exception("response stream failed")
            message, code = f"internal error ({type(e).__name__})", 500
        body_ = {"type": "error", "code": str(code), "message": message, "param": None}
        yield b"event: error\ndata: " + msgspec.json.encode(body_) + b"\n\n"
    finally:
        fanout.cancel()


async def _guarded(
    body: AsyncIterator[bytes],
    prep: Prepared,
    fanout: Fanout,
    states: list[ChoiceState],
    state: FrontendState,
) -> AsyncIterator[bytes]:
    """Adds the usage chunk and `[DONE]`, turns a mid-stream failure into an SSE error event,
    and cancels the engine requests however the stream ends (including a client disconnect)."""
    try:
        async for data in body:
            yield data
        if prep.include_usage:
            obj = (
                "chat.completion.chunk" if prep.request_id.startswith("chat") else "text_completion"
            )
            final = chunk(prep, state.model_name, obj, [])
            final["usage"] = usage(prep, states)
            yield _sse(final)
        yield _DONE
    except RemoteError as e:
        err = remote_to_api(e, state.retry_after_s)
        yield _sse(error_body(err.status, err.message, _param_in(err.message)))
        yield _DONE
    except Exception as e:  # a bug of ours: tell the client, keep the server up
        log.exception("stream %s failed", prep.request_id)
        yield _sse(error_body(500, f"internal error ({type(e).__name__})"))
        yield _DONE
    finally:
        fanout.cancel()
