"""The runtime's own wire format: envelopes around the typed messages of `tokenfab.protocol`,
and the subject names they travel on.

Every byte that crosses the runtime is msgpack (msgspec), in the local backend too, so a NATS
backend carries exactly the same frames on exactly the same subjects.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PREFIX = "tf"


class InstanceInfo(msgspec.Struct, kw_only=True):
    """One registered instance of a component (e.g. a worker), as stored in discovery."""

    instance_id: str
    component: str
    endpoints: list[str] = []
    metadata: dict[str, str | int | float | bool | None] = {}
    incarnation: str = ""
    """Unique per registration: an instance that comes back under the same id (a restarted
    process) is a new incarnation, so watchers see it `added` again."""


class DiscoveryEvent(msgspec.Struct, kw_only=True):
    kind: Literal["added", "removed"]
    instance: InstanceInfo


class Announcement(msgspec.Struct, kw_only=True):
    """Bus discovery: an instance is up (sent at registration and as its lease heartbeat) or
    down (sent when it deregisters)."""

    kind: Literal["up", "down"]
    instance: InstanceInfo
    ttl: float


class Probe(msgspec.Struct, kw_only=True):
    """Bus discovery: asks every live instance of a component to announce itself now."""

    component: str


class RequestFrame(msgspec.Struct, kw_only=True):
    """A call: `payload` is the msgpack of the endpoint's request type."""

    stream_id: str
    reply_to: str
    payload: msgspec.Raw


_NIL = b"\xc0"  # msgpack nil: a Raw field must always hold one valid msgpack value


class StreamFrame(msgspec.Struct, kw_only=True):
    """One frame of a response stream. `data` frames carry one response message; the stream
    ends with exactly one `end` or `error` frame."""

    stream_id: str
    seq: int
    kind: Literal["data", "end", "error"]
    payload: msgspec.Raw = msgspec.Raw(_NIL)
    error_code: str | None = None
    error_message: str | None = None


class CancelFrame(msgspec.Struct, kw_only=True):
    stream_id: str


def rpc_subject(namespace: str, instance_id: str, endpoint: str) -> str:
    return f"{PREFIX}.{namespace}.rpc.{instance_id}.{endpoint}"


def cancel_subject(namespace: str, instance_id: str) -> str:
    return f"{PREFIX}.{namespace}.rpc.{instance_id}._cancel"


def reply_subject(namespace: str, stream_id: str) -> str:
    return f"{PREFIX}.{namespace}.reply.{stream_id}"


def discovery_subject(namespace: str, component: str) -> str:
    return f"{PREFIX}.{namespace}.discovery.{component}"


def probe_subject(namespace: str, component: str) -> str:
    return f"{PREFIX}.{namespace}.discovery_probe.{component}"


def event_subject(namespace: str, topic: str) -> str:
    return f"{PREFIX}.{namespace}.events.{topic}"


def check_token(name: str, what: str) -> str:
    """Subject tokens must not contain separators or wildcards (NATS rules)."""
    if not name or any(c in name for c in ". *>\t\r\n"):
        raise ValueError(f"invalid {what} {name!r}: no dots, spaces or wildcards allowed")
    return name
