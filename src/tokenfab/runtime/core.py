"""`Runtime`: the one interface components talk through.

- discovery: `register` an instance (metadata + lease, kept alive in the background),
  `instances`, `watch`;
- request plane: `serve` an endpoint with an async-generator handler, `call` an instance and
  iterate its typed responses, `cancel` (the handler's task is cancelled on the serving side);
- event plane: `publish` / `subscribe` typed messages by topic.

It is written once over a `Bus` and a `Discovery`; a backend supplies those two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from tokenfab.clock import Clock
from tokenfab.runtime.bus import Bus, BusClosed, BusSubscription, LocalBus
from tokenfab.runtime.discovery import Discovery, LocalDiscovery
from tokenfab.runtime.wire import (
    CancelFrame,
    DiscoveryEvent,
    InstanceInfo,
    RequestFrame,
    StreamFrame,
    cancel_subject,
    check_token,
    event_subject,
    reply_subject,
    rpc_subject,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Req = TypeVar("Req")

_enc = msgspec.msgpack.Encoder()
_dec_request_frame = msgspec.msgpack.Decoder(RequestFrame)
_dec_stream_frame = msgspec.msgpack.Decoder(StreamFrame)
_dec_cancel = msgspec.msgpack.Decoder(CancelFrame)


class RemoteError(Exception):
    """An error the serving side reported; `code` is machine-readable (e.g. "queue_full")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InstanceUnavailable(RemoteError):
    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


@dataclass(frozen=True)
class RequestContext:
    stream_id: str
    instance_id: str
    endpoint: str


Handler = Callable[[Any, RequestContext], AsyncIterator[Any]]


class ResponseStream(Generic[T]):
    """The caller's end of one call: iterate typed responses; `cancel()` stops the remote side.

    Iteration ends at the stream's end frame and raises `RemoteError` at an error frame.
    """

    def __init__(
        self,
        bus: Bus,
        sub: BusSubscription,
        stream_id: str,
        cancel_to: str,
        decoder: msgspec.msgpack.Decoder,
        instance_id: str = "",
    ) -> None:
        self.stream_id = stream_id
        self.instance_id = instance_id
        """The instance serving this call."""
        self._bus = bus
        self._sub = sub
        self._cancel_to = cancel_to
        self._decoder = decoder
        self._seq = 0
        self._done = False
        self._failure: RemoteError | None = None
        self._on_done: list[Callable[[ResponseStream[T]], None]] = []

    def on_done(self, callback: Callable[[ResponseStream[T]], None]) -> None:
        """Call `callback(stream)` once the stream has ended, failed or been cancelled."""
        if self._done:
            callback(self)
        else:
            self._on_done.append(callback)

    def fail(self, code: str, message: str) -> None:
        """End the stream from the caller's side with an error (e.g. its instance vanished
        from discovery): the iterating task gets `RemoteError(code, message)`."""
        if not self._done:
            self._failure = RemoteError(code, message)
            self._finish()

    def __aiter__(self) -> ResponseStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        try:
            frame = _dec_stream_frame.decode(await self._sub.next())
        except BusClosed:
            if self._failure is not None:
                raise self._failure from None
            if self._done:
                raise StopAsyncIteration from None
            self._finish()
            raise RemoteError("unavailable", "the runtime closed before the stream ended") from None
        if frame.seq != self._seq:
            self._finish()
            raise RemoteError("protocol", f"stream frame {frame.seq} arrived, {self._seq} expected")
        self._seq += 1
        if frame.kind == "data":
            return self._decoder.decode(frame.payload)
        self._finish()
        if frame.kind == "error":
            raise RemoteError(frame.error_code or "internal", frame.error_message or "error")
        raise StopAsyncIteration

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop the call: the serving side cancels its handler. Synchronous on purpose, so it
        is safe in `finally` blocks of tasks that are being cancelled."""
        if not self._done:
            self._bus.publish_soon(
                self._cancel_to, _enc.encode(CancelFrame(stream_id=self.stream_id))
            )
            self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._sub.unsubscribe()
        callbacks, self._on_done = self._on_done, []
        for callback in callbacks:
            callback(self)

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> ResponseStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class Subscription(Generic[T]):
    """Typed messages of one topic (event plane)."""

    def __init__(self, sub: BusSubscription, decoder: msgspec.msgpack.Decoder) -> None:
        self._sub = sub
        self._decoder = decoder

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return self._decoder.decode(await self._sub.next())
        except BusClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self._sub.unsubscribe()


class Endpoint:
    """A served endpoint of one instance: decodes calls, runs the handler per call in its own
    task, streams frames back, and cancels the task when the caller cancels."""

    def __init__(
        self,
        runtime: Runtime,
        instance_id: str,
        name: str,
        request_type: type,
        handler: Handler,
    ) -> None:
        self.instance_id = instance_id
        self.name = name
        self._rt = runtime
        self._decoder = msgspec.msgpack.Decoder(request_type)
        self._handler = handler
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._subs: list[BusSubscription] = []

    async def start(self) -> None:
        ns = self._rt.namespace
        calls = await self._rt.bus.subscribe(rpc_subject(ns, self.instance_id, self.name))
        cancels = await self._rt.bus.subscribe(cancel_subject(ns, self.instance_id))
        self._subs = [calls, cancels]
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._call_loop(calls)),
            loop.create_task(self._cancel_loop(cancels)),
        ]

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def _call_loop(self, sub: BusSubscription) -> None:
        async for data in sub:
            try:
                frame = _dec_request_frame.decode(data)
            except msgspec.DecodeError:
                log.warning("dropping an undecodable call on %s/%s", self.instance_id, self.name)
                continue
            task = asyncio.get_running_loop().create_task(self._run(frame))
            self._tasks[frame.stream_id] = task

    async def _cancel_loop(self, sub: BusSubscription) -> None:
        async for data in sub:
            with contextlib.suppress(msgspec.DecodeError):
                task = self._tasks.get(_dec_cancel.decode(data).stream_id)
                if task is not None:
                    task.cancel()

    async def _run(self, frame: RequestFrame) -> None:
        seq = 0
        bus = self._rt.bus

        def send(
            kind: str, payload: bytes = b"\xc0", code: str | None = None, msg: str | None = None
        ):
            nonlocal seq
            out = StreamFrame(
                stream_id=frame.stream_id,
                seq=seq,
                kind=kind,  # type: ignore[arg-type]
                payload=msgspec.Raw(payload),
                error_code=code,
                error_message=msg,
            )
            seq += 1
            bus.publish_soon(frame.reply_to, _enc.encode(out))

        ctx = RequestContext(frame.stream_id, self.instance_id, self.name)
        try:
            try:
                request = self._decoder.decode(frame.payload)
            except msgspec.DecodeError as e:
                send("error", code="bad_request", msg=f"undecodable request: {e}")
                return
            async with contextlib.aclosing(self._handler(request, ctx)) as responses:
                async for response in responses:
                    send("data", _enc.encode(response))
            send("end")
        except asyncio.CancelledError:
            pass  # the caller cancelled and is no longer listening
        except RemoteError as e:
            send("error", code=e.code, msg=e.message)
        except Exception as e:
            log.exception("handler %s/%s failed", self.instance_id, self.name)
            send("error", code="internal", msg=f"{type(e).__name__}: {e}")
        finally:
            self._tasks.pop(frame.stream_id, None)

    async def close(self) -> None:
        for sub in self._subs:
            sub.unsubscribe()
        tasks = list(self._tasks.values()) + self._loops
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Registration:
    """A registered instance; its lease is kept alive until `close()`."""

    info: InstanceInfo
    lease_id: int
    ttl: float
    _runtime: Runtime
    _keepalive: asyncio.Task[None] | None = None
    _endpoints: list[Endpoint] = field(default_factory=list)

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    async def serve(self, endpoint: str, request_type: type, handler: Handler) -> Endpoint:
        ep = await self._runtime.serve(self.instance_id, endpoint, request_type, handler)
        self._endpoints.append(ep)
        return ep

    async def reannounce(self, metadata: dict[str, Any]) -> None:
        """Announce the instance again with new metadata, as a new incarnation (watchers see
        it `added` anew and re-read it; a worker that changed role does this). Its
        endpoints stay served throughout."""
        self.info = msgspec.structs.replace(
            self.info, metadata=dict(metadata), incarnation=uuid.uuid4().hex
        )
        self.lease_id = await self._runtime.discovery.put(self.info, self.ttl)

    async def _keep_alive(self) -> None:
        disc = self._runtime.discovery
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not await disc.keepalive(self.lease_id):
                log.warning("lease of %s expired; registering again", self.instance_id)
                self.lease_id = await disc.put(self.info, self.ttl)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        await self._runtime.discovery.revoke(self.lease_id)
        for ep in self._endpoints:
            await ep.close()


class Runtime:
    def __init__(self, bus: Bus, discovery: Discovery, namespace: str = "default") -> None:
        self.bus = bus
        self.discovery = discovery
        self.namespace = check_token(namespace, "namespace")

    @classmethod
    def local(
        cls,
        namespace: str = "default",
        clock: Clock | None = None,
        sweep_interval: float | None = 1.0,
    ) -> Runtime:
        """The in-process backend: everything in one asyncio event loop."""
        return cls(LocalBus(), LocalDiscovery(clock, sweep_interval), namespace)

    @classmethod
    async def connect(cls, url: str = "local", namespace: str = "default") -> Runtime:
        """`local` (in-process) or `nats://host:port` (core NATS; discovery by heartbeats)."""
        if url == "local":
            return cls.local(namespace)
        if url.startswith(("nats://", "tls://", "ws://", "wss://")):
            from tokenfab.runtime.bus_discovery import BusDiscovery
            from tokenfab.runtime.nats_bus import NatsBus

            bus = await NatsBus.connect(url)
            return cls(bus, BusDiscovery(bus, namespace), namespace)
        raise ValueError(f"unknown runtime {url!r}: use 'local' or 'nats://host:port'")

    # ------------------------------------------------------------------ discovery

    async def register(
        self,
        component: str,
        instance_id: str | None = None,
        *,
        endpoints: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        lease_ttl: float = 10.0,
        keepalive: bool = True,
        handlers: dict[str, tuple[type, Handler]] | None = None,
    ) -> Registration:
        """Announce an instance. `handlers` (endpoint -> (request type, handler)) are served
        *before* the announcement, so a caller that reacts to it at once finds them."""
        info = InstanceInfo(
            instance_id=check_token(instance_id or f"{component}-{uuid.uuid4().hex[:8]}", "id"),
            component=check_token(component, "component"),
            endpoints=list(dict.fromkeys([*(endpoints or []), *(handlers or {})])),
            metadata=dict(metadata or {}),
            incarnation=uuid.uuid4().hex,
        )
        served = [
            await self.serve(info.instance_id, name, request_type, handler)
            for name, (request_type, handler) in (handlers or {}).items()
        ]
        lease_id = await self.discovery.put(info, lease_ttl)
        reg = Registration(info, lease_id, lease_ttl, self, _endpoints=served)
        if keepalive:
            reg._keepalive = asyncio.get_running_loop().create_task(reg._keep_alive())
        return reg

    async def instances(self, component: str) -> list[InstanceInfo]:
        return await self.discovery.list(component)

    def watch(self, component: str) -> AsyncIterator[DiscoveryEvent]:
        return self.discovery.watch(component)

    # ------------------------------------------------------------------ request plane

    async def serve(
        self, instance_id: str, endpoint: str, request_type: type, handler: Handler
    ) -> Endpoint:
        ep = Endpoint(self, instance_id, check_token(endpoint, "endpoint"), request_type, handler)
        await ep.start()
        return ep

    async def call(
        self, instance_id: str, endpoint: str, request: msgspec.Struct, response_type: type[T]
    ) -> ResponseStream[T]:
        subject = rpc_subject(self.namespace, instance_id, endpoint)
        has = getattr(self.bus, "has_subscribers", None)
        if has is not None and not has(subject):
            raise InstanceUnavailable(f"no instance {instance_id!r} serves {endpoint!r}")
        stream_id = uuid.uuid4().hex
        reply_to = reply_subject(self.namespace, stream_id)
        sub = await self.bus.subscribe(reply_to)  # before the call, so no frame is missed
        frame = RequestFrame(
            stream_id=stream_id, reply_to=reply_to, payload=msgspec.Raw(_enc.encode(request))
        )
        await self.bus.publish(subject, _enc.encode(frame))
        return ResponseStream(
            self.bus,
            sub,
            stream_id,
            cancel_subject(self.namespace, instance_id),
            msgspec.msgpack.Decoder(response_type),
            instance_id,
        )

    # ------------------------------------------------------------------ event plane

    async def publish(self, topic: str, msg: msgspec.Struct) -> None:
        await self.bus.publish(event_subject(self.namespace, topic), _enc.encode(msg))

    def publish_soon(self, topic: str, msg: msgspec.Struct) -> None:
        self.bus.publish_soon(event_subject(self.namespace, topic), _enc.encode(msg))

    async def subscribe(self, topic: str, msg_type: type[T]) -> Subscription[T]:
        sub = await self.bus.subscribe(event_subject(self.namespace, topic))
        return Subscription(sub, msgspec.msgpack.Decoder(msg_type))

    async def close(self) -> None:
        await self.discovery.close()
        await self.bus.close()
