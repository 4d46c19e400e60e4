"""`tokenfab router`: the KV-aware router as a service of its own on a shared runtime.

It keeps the same view a frontend's embedded router keeps (discovery, KV events, load reports,
snapshots: `frontend.workers.WorkerPool`) and answers `route` calls (RouteRequest ->
RouteResponse) from frontends started with `--external-router`. Routers side by side see the
same events and, given the same seed, make the same choices, so a frontend may ask any of them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

from tokenfab.frontend.workers import WorkerPool
from tokenfab.protocol import ROUTER_COMPONENT, RouteRequest, RouteResponse
from tokenfab.router.router import RouterConfig
from tokenfab.runtime import Registration, RequestContext, Runtime

log = logging.getLogger("tokenfab.router")


class RouterService:
    def __init__(self, runtime: Runtime, config: RouterConfig, router_id: str | None = None):
        self.runtime = runtime
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.pool = WorkerPool(runtime, config)
        self._registration: Registration | None = None

    async def start(self) -> None:
        await self.pool.start()
        self._registration = await self.runtime.register(
            ROUTER_COMPONENT,
            self.router_id,
            lease_ttl=2.5,
            handlers={"route": (RouteRequest, self._route)},
        )

    async def _route(self, req: RouteRequest, ctx: RequestContext) -> AsyncIterator[RouteResponse]:
        d = self.pool.route_hashes(
            req.request_id, req.block_hashes, req.num_prompt_tokens, req.exclude
        )
        yield RouteResponse(
            worker_id=d.worker_id,
            overlap_blocks=d.overlap_blocks,
            predicted_hit_tokens=d.predicted_hit_tokens,
        )

    async def close(self) -> None:
        if self._registration is not None:
            await self._registration.close()
            self._registration = None
        await self.pool.close()


async def run_router(
    runtime_url: str, namespace: str, config: RouterConfig, router_id: str | None = None
) -> None:
    """Serve routing decisions until interrupted."""
    from tokenfab.worker.launch import until_signalled

    runtime = await Runtime.connect(runtime_url, namespace)
    service = RouterService(runtime, config, router_id)
    try:
        await service.start()
        log.info("router %s (%s policy) on %s", service.router_id, config.policy, runtime_url)
        await until_signalled()
    finally:
        await service.close()
        await runtime.close()
