"""Disaggregated serving, the worker's side: a prefill worker computes a prompt and its first
token and holds the prompt's blocks (`prefill`); a decode worker asks it to, pulls the blocks it
lacks over the KV data plane, imports them and decodes (`decode_remote`).

The engine stays pure: it only holds, reads, reserves and adopts blocks (engine.py, kv_io.py);
sockets, timeouts and the choice of where to prefill live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from tokenfab.kv.hashing import block_hashes, request_extra_keys
from tokenfab.kv.transfer import KVTransferClient, TransferError
from tokenfab.protocol import GenerateOutput, GenerateRequest, PrefillRequest, PrefillResponse
from tokenfab.runtime import RemoteError, Runtime

if TYPE_CHECKING:
    from tokenfab.engine.engine import AsyncEngine

log = logging.getLogger(__name__)


class EngineBlockSource:
    """The blocks an engine holds for other workers, served by the data plane. Holds end when
    pulled with release, or at their deadline (`reap`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        io = engine.engine.block_io
        self.block_bytes = io.block_bytes
        self._holds: dict[str, tuple[list[int], list[int], float]] = {}
        """hold id -> (hashes, block ids, monotonic deadline)."""

    async def hold(self, hold_id: str, hashes: list[int], hold_s: float) -> list[int]:
        def take(e: object) -> tuple[list[int], list[int]]:
            from tokenfab.engine.engine import LLMEngine

            assert isinstance(e, LLMEngine)
            held = e.hold_prefix(hold_id, hashes)
            return held, e.held_blocks(hold_id)

        held, ids = await self.engine.run_on_engine(take)
        self._holds[hold_id] = (held, ids, time.monotonic() + hold_s)
        return held

    async def read_blocks(self, hold_id: str, hashes: list[int]) -> memoryview:
        entry = self._holds.get(hold_id)
        if entry is None:
            raise TransferError(f"no blocks held under {hold_id!r}")
        held, ids, _ = entry
        where = {h: i for h, i in zip(held, ids, strict=True)}
        missing = [h for h in hashes if h not in where]
        if missing:
            raise TransferError(f"{len(missing)} of the blocks are not held under {hold_id!r}")
        # Held blocks are never rewritten, so they are read off the engine thread.
        io = self.engine.engine.block_io
        return await asyncio.to_thread(io.read, [where[h] for h in hashes])

    async def release(self, hold_id: str) -> None:
        if self._holds.pop(hold_id, None) is not None:
            with contextlib.suppress(Exception):  # a dead engine holds nothing
                await self.engine.run_on_engine(lambda e: e.release_hold(hold_id))

    async def reap(self, interval_s: float = 0.5) -> None:
        """Release holds past their deadline (the decode worker died or never came)."""
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for hold_id in [h for h, (_, _, d) in self._holds.items() if d < now]:
                log.warning("hold %s timed out; releasing its blocks", hold_id)
                await self.release(hold_id)


async def prefill(
    engine: AsyncEngine, source: EngineBlockSource, data_address: str, req: PrefillRequest
) -> PrefillResponse:
    """Compute the prompt and first token; hold the prompt's full blocks for the puller."""
    r = req.request
    sp = r.sampling
    first_only = msgspec.structs.replace(sp, max_tokens=1, min_tokens=min(sp.min_tokens, 1))
    outs: list[GenerateOutput] = []
    async with contextlib.aclosing(
        engine.generate(msgspec.structs.replace(r, sampling=first_only, remote_prefill=None))
    ) as stream:
        async for out in stream:
            outs.append(out)
    first = outs[0]
    for extra in outs[1:]:
        first.token_ids += extra.token_ids
        first.text += extra.text
        first.finish_reason = extra.finish_reason
        first.stop_reason = extra.stop_reason
        first.error = extra.error
    # The original request ends here too if it stopped, failed, or asked for one token.
    if first.finish_reason == "length" and sp.max_tokens != 1:
        first.finish_reason = None
    block_size = engine.engine.config.block_size
    keys = request_extra_keys(r.lora_name, r.cache_salt)
    hashes = block_hashes(r.prompt_token_ids, block_size, keys)
    held = (
        []
        if first.finish_reason is not None
        else await source.hold(r.request_id, hashes, req.hold_s)
    )
    return PrefillResponse(
        output=first,
        hold_id=r.request_id,
        block_hashes=held,
        data_address=data_address,
        block_bytes=source.block_bytes,
    )


async def decode_remote(
    engine: AsyncEngine, runtime: Runtime, client: KVTransferClient, request: GenerateRequest
) -> AsyncIterator[GenerateOutput]:
    """Serve a request whose prompt another worker computes: stream its first token, pull the
    blocks missing here, import them and decode the rest. Falls back to computing locally
    whatever could not be pulled (the prefill worker died, the pull failed)."""
    rp = request.remote_prefill
    assert rp is not None
    block_size = engine.engine.config.block_size
    keys = request_extra_keys(request.lora_name, request.cache_salt)
    prompt = request.prompt_token_ids
    hashes = block_hashes(prompt, block_size, keys)
    have = await engine.run_on_engine(lambda e: e.cached_prefix_length(hashes))
    local = msgspec.structs.replace(request, remote_prefill=None)
    if len(prompt) - have * block_size < rp.min_uncached_tokens:
        async for out in engine.generate(local):  # short uncached part: prefill here
            yield out
        return
    try:
        stream = await runtime.call(
            rp.worker_id,
            "prefill",
            PrefillRequest(request=local, hold_s=rp.hold_s),
            PrefillResponse,
        )
        async with stream:
            resp = await anext(stream)
    except RemoteError as e:
        if e.code != "unavailable":
            raise
        log.warning("request %s: prefill worker lost (%s); prefilling here", request.request_id, e)
        async for out in engine.generate(local):
            yield out
        return
    first = resp.output
    yield first
    if first.finish_reason is not None:
        return
    # Pull only the blocks not cached here (the chain is contiguous: skip our prefix).
    want = resp.block_hashes[have:]
    if resp.block_hashes:  # an empty pull still releases the hold
        try:
            data = await client.pull(
                resp.data_address, resp.hold_id, want, resp.block_bytes, release=True
            )
            parent = resp.block_hashes[have - 1] if have else None
            tokens = prompt[have * block_size : (have + len(want)) * block_size]
            if want:
                await engine.run_on_engine(
                    lambda e: e.import_blocks(want, data, parent, tokens, request.lora_name)
                )
        except TransferError as e:
            log.warning("request %s: KV pull failed (%s); computing locally", request.request_id, e)
    sp = request.sampling
    cont = msgspec.structs.replace(
        local,
        prompt_token_ids=prompt + first.token_ids,
        sampling=msgspec.structs.replace(
            sp,
            max_tokens=None if sp.max_tokens is None else sp.max_tokens - len(first.token_ids),
            min_tokens=max(0, sp.min_tokens - len(first.token_ids)),
            prompt_logprobs=None,
        ),
    )
    async with contextlib.aclosing(engine.generate(cont)) as outs:
        async for out in outs:
            # Counts describe the client's prompt, not the continuation's.
            out.num_prompt_tokens = first.num_prompt_tokens
            out.num_cached_tokens = first.num_cached_tokens
            yield out
