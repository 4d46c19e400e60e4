"""`route_disagg`: the frontend's and the twin's choice of decode and prefill worker."""

from __future__ import annotations

from tokenfab.clock import ManualClock
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import BlockStored, KVEventBatch, LoadReport, WorkerInfo
from tokenfab.router import Router, RouterConfig
from tokenfab.router.disagg import DisaggConfig, route_disagg

BS = 16
DECODERS, PREFILLERS = ["d0", "d1"], ["p0", "p1"]


def router() -> Router:
    r = Router(RouterConfig(), ManualClock())
    for w in DECODERS + PREFILLERS:
        r.add_worker(w, WorkerInfo(model="m", max_model_len=8192, block_size=BS))
    return r


def decide(r: Router, rid: str, prompt: list[int], config: DisaggConfig | None = None):
    return route_disagg(
        r.route,
        r.worker_load,
        r.on_request_finished,
        config or DisaggConfig(),
        rid,
        block_hashes(prompt, BS),
        len(prompt),
        DECODERS,
        PREFILLERS,
    )


def test_long_uncached_prompts_prefill_remotely_on_the_overlapping_prefill_worker() -> None:
    r = router()
    prompt = list(range(1, 1025))
    hashes = block_hashes(prompt, BS)
    r.on_kv_events(
        KVEventBatch(
            worker_id="p1",
            events=[BlockStored(event_id=1, block_hashes=hashes[:40], parent_hash=None,
                                token_ids=prompt[: 40 * BS], block_size=BS)],
        )
    )  # fmt: skip
    dec, pre = decide(r, "a", prompt)
    assert dec.worker_id in DECODERS and dec.request_id == "a"
    assert pre is not None and pre.worker_id == "p1" and pre.request_id == "a#prefill"


def test_short_uncached_part_prefills_on_the_decode_worker() -> None:
    r = router()
    dec, pre = decide(r, "a", list(range(1, 200)))  # < 256 uncached tokens
    assert pre is None and dec.worker_id in DECODERS
    assert r.stats().decisions == {dec.worker_id: 1}  # no prefill worker was routed to


def test_a_backed_up_prefill_pool_sends_the_prompt_to_the_decode_worker() -> None:
    r = router()
    for w in PREFILLERS:
        r.on_load(LoadReport(worker_id=w, queued_prefill_tokens=20_000))
    dec, pre = decide(r, "a", list(range(1, 1025)))
    assert pre is None and dec.worker_id in DECODERS
    # the prefill route it tried was released: its load no longer counts there
    assert [r.worker_load(w).queued_prefill_tokens for w in PREFILLERS] == [20_000, 20_000]
