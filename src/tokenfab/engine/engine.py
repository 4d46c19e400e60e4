"""The public engines: `LLMEngine` (the step loop of engine/core with the real model plugged
in) and `AsyncEngine`.

`LLMEngine` is synchronous and single-threaded (used by `LLM` and by `AsyncEngine`'s thread).
`AsyncEngine` runs an LLMEngine in one background thread (torch releases the GIL while it
computes) and hands each step's outputs to asyncio with one `call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from tokenfab.clock import Clock
from tokenfab.config import EngineConfig
from tokenfab.engine.core.detokenizer import decode_fn
from tokenfab.engine.core.kv_cache import EventSink
from tokenfab.engine.core.runner import Runner
from tokenfab.engine.core.scheduler import SchedulerConfig
from tokenfab.engine.core.step import EngineCore
from tokenfab.engine.errors import (
    CorruptLogitsError,
    EngineDeadError,
    EngineError,
    EngineQuarantinedError,
    InvalidRequestError,
    QueueFullError,
)
from tokenfab.engine.kv_io import KVBlockIO
from tokenfab.engine.threads import ThreadTuner, available_cpus, settle_threadsafe
from tokenfab.engine.torch_runner import TorchRunner
from tokenfab.kv.offload import build_offloader
from tokenfab.protocol import GenerateOutput, GenerateRequest, KVSnapshot, LoadReport

log = logging.getLogger(__name__)
T = TypeVar("T")


class LLMEngine(EngineCore):
    """`EngineCore` with the real model: loads it (or takes `loaded`), sizes the KV pool from
    the memory budget, and plugs in a `TorchRunner`."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        event_sink: EventSink | None = None,
        clock: Clock | None = None,
        loaded: Any = None,
        runner: Runner | None = None,
    ) -> None:
        from tokenfab.engine.model.loader import load_model
        from tokenfab.engine.model.runner import kv_bytes_per_block

        self.config = config = config or EngineConfig()
        if loaded is None:
            loaded = load_model(config.model, config.dtype, config.device)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = mc = loaded.config
        self.model_name: str = loaded.name

        bs = config.block_size
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        else:
            per_block = kv_bytes_per_block(mc, bs)
            num_blocks = max(1, int(config.kv_cache_memory_gb * (1 << 30)) // per_block)
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            # Positions past the model's trained context have no rotary table (and no meaning).
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context length "
                f"{mc.max_position_embeddings}"
            )
        context = config.max_model_len or mc.max_position_embeddings
        # A request must fit the pool on its own, or it could never be scheduled.
        max_model_len = min(context, num_blocks * bs)
        if max_model_len < context:
            log.warning(
                "max_model_len lowered from %d to %d: the KV pool holds only %d blocks of %d",
                context, max_model_len, num_blocks, bs,
            )  # fmt: skip
        budget = config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            budget = max(budget, max_model_len)  # a whole prompt must fit one step
        if runner is None:
            # Thread count measured per step unless fixed by the user (see threads.py).
            cpus = available_cpus()
            tuner = (
                ThreadTuner(cpus)
                if config.num_threads is None and config.device == "cpu" and cpus > 1
                else None
            )
            runner = TorchRunner(
                loaded,
                num_blocks,
                bs,
                num_threads=config.num_threads,
                seed=config.seed,
                tuner=tuner,
                fault=config.fault,
                fault_after_steps=config.fault_after_steps,
            )
        tokenizer = self.tokenizer
        super().__init__(
            runner,
            vocab_size=mc.vocab_size,
            eos_token_ids=list(mc.eos_token_ids),
            max_model_len=max_model_len,
            scheduler_config=SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=budget,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_waiting=config.max_waiting,
            ),
            enable_prefix_caching=config.enable_prefix_caching,
            event_sink=event_sink,
            clock=clock,
            decode=lambda skip: decode_fn(tokenizer, skip),
            offload=build_offloader(config, runner),  # moves bytes of the runner's KV tensor
        )
        self._holds: dict[str, list[int]] = {}
        """Blocks kept for another worker to pull (hold id -> block ids, see `hold_prefix`)."""
        self._blocks_imported = 0
        self._block_io: KVBlockIO | None = None

    @property
    def num_threads(self) -> int:
        """The intra-op thread count steps currently run with."""
        runner = self.runner
        return runner.num_threads if isinstance(runner, TorchRunner) else 1

    # ------------------------------------------------------------------ moving KV blocks
    # Disaggregated serving moves a prompt's K/V from the worker that computed it to the one
    # that decodes. These methods run on the engine thread (AsyncEngine.run_on_engine); the
    # bytes travel through the worker (tokenfab.kv.transfer), never through the scheduler.

    @property
    def block_io(self) -> KVBlockIO:
        """Reads and writes blocks' bytes in the runner's pool."""
        if self._block_io is None:
            if not isinstance(self.runner, TorchRunner):
                raise EngineError("this engine's runner has no KV pool to move blocks from")
            self._block_io = KVBlockIO(self.runner.model_runner.kv)
        return self._block_io

    def cached_prefix_length(self, block_hashes: list[int]) -> int:
        """Leading blocks of the chain cached here."""
        return self.kv.cached_prefix_length(block_hashes)

    def hold_prefix(self, hold_id: str, block_hashes: list[int]) -> list[int]:
        """Keep the cached leading blocks of this chain until `release_hold(hold_id)`: no
        eviction, no rewrite, so another thread may read them. Returns the held hashes (a
        prefix of the chain; fewer if some were evicted already)."""
        if hold_id in self._holds:
            raise InvalidRequestError(f"hold {hold_id!r} exists already")
        ids = self.kv.hold(block_hashes)
        self._holds[hold_id] = ids
        return block_hashes[: len(ids)]

    def held_blocks(self, hold_id: str) -> list[int]:
        """Block ids of a hold, in chain order ([] if unknown or released)."""
        return list(self._holds.get(hold_id, ()))

    def release_hold(self, hold_id: str) -> int:
        """Let a hold's blocks go (they stay cached until evicted); returns their count."""
        ids = self._holds.pop(hold_id, None)
        if not ids:
            return 0
        self.kv.unhold(ids)
        return len(ids)

    def import_blocks(
        self,
        block_hashes: list[int],
        data: memoryview | bytes,
        parent_hash: int | None,
        token_ids: list[int],
        lora_name: str | None = None,
    ) -> int:
        """Put blocks computed elsewhere into this cache as the chain `block_hashes` (after
        `parent_hash`; `token_ids` are their tokens): a request admitted next finds them as
        its cached prefix. Imports as many leading blocks as there are free ones; returns
        that count."""
        bb = self.block_io.block_bytes
        if len(data) != len(block_hashes) * bb:
            raise ValueError(f"{len(data)} bytes for {len(block_hashes)} blocks of {bb}")
        ids = self.kv.reserve(len(block_hashes))
        if self.offload is not None:
            self.offload.offload_evicted(self.kv)  # reserving evicted them: save before writing
        try:
            self.block_io.write(ids, memoryview(data)[: len(ids) * bb])
        except BaseException:
            self.kv.unhold(ids)
            raise
        self.kv.adopt(ids, block_hashes[: len(ids)], parent_hash, token_ids, lora_name)
        self._blocks_imported += len(ids)
        self._flush_events()
        return len(ids)

    def stats(self) -> LoadReport:
        """EngineCore's report plus the blocks held for and imported from other workers."""
        report = super().stats()
        report.kv_blocks_held = sum(len(ids) for ids in self._holds.values())
        report.kv_blocks_imported = self._blocks_imported
        return report


# ---------------------------------------------------------------------- async


_STOP = object()


class AsyncEngine:
    """An LLMEngine stepping in a background thread, with an asyncio API.

    Threading: `generate`, `abort`, `stats` are called on the event loop that called
    `start()`. Requests and aborts reach the engine thread through a queue; outputs come back
    via `loop.call_soon_threadsafe`, once per step. The `event_sink` (KV events) is called on
    the engine thread, once per step with that step's events: hop to the loop with
    `call_soon_threadsafe` if it touches asyncio objects.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        event_sink: EventSink | None = None,
        clock: Clock | None = None,
        loaded: Any = None,
    ) -> None:
        self.config = config or EngineConfig()
        self._event_sink = event_sink
        self._clock = clock
        self._loaded = loaded
        self._engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[GenerateOutput | BaseException]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None
        self._quarantined: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._engine is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        built: asyncio.Future[LLMEngine] = loop.create_future()
        # The engine is built on the thread that will step it: torch work from two long-lived
        # threads gives OpenMP two thread teams, and with more team threads than cores libgomp
        # stops spin-waiting between parallel regions, so every op pays a futex wake-up
        # (measured: a 2-thread decode step 1.8x slower, no faster than 1 thread).
        self._thread = threading.Thread(
            target=self._run, args=(built,), name="tokenfab-engine", daemon=True
        )
        self._thread.start()
        try:
            self._engine = await built
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        finally:
            self._loaded = None

    async def shutdown(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._dead = "the engine was shut down"
        for rid, q in list(self._queues.items()):
            q.put_nowait(GenerateOutput(request_id=rid, finish_reason="abort"))

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError("the engine is not started (await engine.start())")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._dead is None

    @property
    def quarantined(self) -> str | None:
        """Why the engine refuses work after producing corrupt logits (None: it does not)."""
        return self._quarantined

    # ------------------------------------------------------------------ requests

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream the request's outputs (deltas); the last has finish_reason set. Raises
        InvalidRequestError / QueueFullError before the first output. Closing the iterator
        early (break, cancellation, client gone) aborts the request and frees its blocks."""
        engine = self.engine
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._quarantined is not None:
            raise EngineQuarantinedError(self._quarantined)
        engine.validate(req)
        rid = req.request_id
        if rid in self._queues:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        waiting = len(engine.scheduler.waiting) + self._inbox.qsize()
        if waiting >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({waiting} requests); retry later")
        q: asyncio.Queue[GenerateOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        self._inbox.put(("add", req))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> LoadReport:
        return self.engine.stats()

    async def kv_snapshot(self, worker_id: str = "") -> KVSnapshot:
        """The engine's KVSnapshot, taken on the engine thread between steps (the cache is
        consistent with the event ids there)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[KVSnapshot] = loop.create_future()
        self._inbox.put(("snapshot", (worker_id, done)))
        return await done

    async def run_on_engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """`fn(engine)` on the engine thread between steps (KV block moves, holds); its
        exception is raised here."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._inbox.put(("call", (fn, done)))
        return await done

    # ------------------------------------------------------------------ engine thread

    def _run(self, built: asyncio.Future[LLMEngine]) -> None:
        # torch releases the GIL inside ops, so this thread computes while the loop serves.
        loop = self._loop
        assert loop is not None
        try:
            engine = LLMEngine(
                self.config, event_sink=self._event_sink, clock=self._clock, loaded=self._loaded
            )
        except BaseException as e:
            settle_threadsafe(loop, built, e)
            return
        if self.config.warm_up:
            try:
                engine.warm_up()
            except Exception:  # a failed warm-up costs the first request's latency only
                log.exception("engine warm-up failed")
        settle_threadsafe(loop, built, engine)
        try:
            self._loop_forever(engine)
            engine.close()
        except BaseException as e:  # a bug in the loop itself: fail everyone, refuse new work
            log.exception("engine thread died")
            self._dead = f"the engine thread died: {e}"
            dead = [
                GenerateOutput(request_id=rid, finish_reason="error", error=self._dead)
                for rid in list(self._queues)
            ]
            self._post(list(dead))

    def _loop_forever(self, engine: LLMEngine) -> None:
        while True:
            # Block only when idle; otherwise take whatever arrived and step.
            commands = [self._inbox.get()] if not engine.has_unfinished() else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            outputs: list[GenerateOutput | tuple[str, BaseException]] = []
            for cmd in commands:
                if cmd is _STOP:
                    return
                self._handle(engine, cmd, outputs)
            if engine.has_unfinished():
                try:
                    steps_before = engine.stats_steps
                    outputs.extend(engine.step())
                    if engine.stats_steps == steps_before:
                        # Nothing could be scheduled (should not happen: any single request
                        # fits the pool); do not spin.
                        time.sleep(0.005)
                except CorruptLogitsError as e:
                    outputs.extend(self._quarantine(engine, str(e)))
                except Exception as e:  # a bug outside the model: fail all, keep the loop
                    log.exception("engine loop error")
                    outputs.extend(engine.fail_all(f"engine error: {e}"))
            if outputs:
                self._post(outputs)

    def _quarantine(
        self, engine: LLMEngine, why: str
    ) -> list[GenerateOutput | tuple[str, BaseException]]:
        """Corrupt logits: this engine's numbers cannot be trusted, so it takes no more work
        and every request fails with EngineQuarantinedError (the worker turns that into
        `unavailable` and the frontend continues them elsewhere). Their engine state is
        dropped (nothing of them is sent)."""
        log.error("engine quarantined: %s", why)
        self._quarantined = f"quarantined: {why}"
        error = EngineQuarantinedError(self._quarantined)
        # fail_all frees their blocks; its error outputs are replaced by the exception.
        return [(out.request_id, error) for out in engine.fail_all(self._quarantined)]

    def _handle(
        self,
        engine: LLMEngine,
        cmd: tuple[str, Any],
        outputs: list[GenerateOutput | tuple[str, BaseException]],
    ) -> None:
        kind, arg = cmd
        if kind == "add" and self._quarantined is not None:
            outputs.append((arg.request_id, EngineQuarantinedError(self._quarantined)))
        elif kind == "add":
            try:
                engine.add_request(arg)
            except EngineError as e:
                outputs.append((arg.request_id, e))
            except Exception as e:
                log.exception("could not add request %s", arg.request_id)
                outputs.append((arg.request_id, EngineError(f"could not add request: {e}")))
        elif kind == "abort":
            out = engine.abort(arg)
            if out is not None:
                outputs.append(out)
        elif kind == "snapshot":
            worker_id, done = arg
            assert self._loop is not None
            settle_threadsafe(self._loop, done, engine.kv_snapshot(worker_id))
        elif kind == "call":
            fn, done = arg
            assert self._loop is not None
            try:
                result = fn(engine)
            except Exception as e:
                result = e
            settle_threadsafe(self._loop, done, result)

    def _post(self, outputs: list[GenerateOutput | tuple[str, BaseException]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # The loop may close between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[GenerateOutput | tuple[str, BaseException]]) -> None:
        for out in outputs:
            if isinstance(out, tuple):
                rid, item = out[0], out[1]
            else:
                rid, item = out.request_id, out
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(item)
