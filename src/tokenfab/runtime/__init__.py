"""The runtime: discovery, request plane and event plane behind one interface (`Runtime`).

Backends: `Runtime.local()` (in-process, asyncio; the default). A NATS backend supplies its own
`Bus` and `Discovery` and reuses everything else.
"""

from tokenfab.runtime.core import (
    Endpoint,
    InstanceUnavailable,
    Registration,
    RemoteError,
    RequestContext,
    ResponseStream,
    Runtime,
    Subscription,
)
from tokenfab.runtime.wire import DiscoveryEvent, InstanceInfo

__all__ = [
    "DiscoveryEvent",
    "Endpoint",
    "InstanceInfo",
    "InstanceUnavailable",
    "Registration",
    "RemoteError",
    "RequestContext",
    "ResponseStream",
    "Runtime",
    "Subscription",
]
