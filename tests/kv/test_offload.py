"""Offload to and onboarding from the tiers below G1 inside a real engine (tiny model):
greedy output equals the no-offload output, blocks come back instead of being recomputed,
a corrupt block is recomputed, a G3 directory survives a restart, and KV events carry tiers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tokenfab.config import EngineConfig
from tokenfab.engine.engine import LLMEngine
from tokenfab.engine.model.loader import load_model
from tokenfab.protocol import BlockStored, GenerateRequest, KVEvent, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BS = 16


@pytest.fixture(scope="module")
def loaded(tiny_llama: Path) -> Any:
    return load_model(tiny_llama, dtype="float32")


def prompts() -> list[list[int]]:
    """Two long shared prefixes, asked in turns, so a small G1 keeps evicting each."""
    a = [(i * 37) % 500 + 3 for i in range(160)]
    b = [(i * 53) % 500 + 5 for i in range(160)]
    return [p + [7 + k, 9 + k] for k in range(3) for p in (a, b)]


def engine(loaded: Any, events: list[KVEvent] | None = None, **kw: Any) -> LLMEngine:
    # 14 blocks of 16: one 170-token request (11 blocks) at a time, no room to keep the other.
    cfg = EngineConfig(dtype="float32", num_kv_blocks=14, block_size=BS, **kw)
    sink = events.extend if events is not None else None
    return LLMEngine(cfg, loaded=loaded, event_sink=sink)


def run_each(eng: LLMEngine, ps: list[list[int]]) -> list[list[int]]:
    """Requests one after another; the token ids each generated."""
    outs = []
    for i, p in enumerate(ps):
        eng.add_request(GenerateRequest(request_id=f"r{i}", prompt_token_ids=p, sampling=GREEDY))
        toks: list[int] = []
        for _ in range(1000):
            if not eng.has_unfinished():
                break
            for o in eng.step():
                toks.extend(o.token_ids)
        outs.append(toks)
    return outs


def host_name(tag: str) -> str:
    return f"test-offload-{os.getpid()}-{tag}"


def test_greedy_output_with_offload_equals_without(loaded: Any, tmp_path: Path) -> None:
    ps = prompts()
    plain = engine(loaded)
    expected = run_each(plain, ps)
    g1_hits = plain.kv.prefix_hits  # LRU keeps only each prefix's first blocks in G1

    events: list[KVEvent] = []
    tiered = engine(loaded, events, kv_host_gb=0.001, kv_disk_dir=str(tmp_path / "g3"))
    assert run_each(tiered, ps) == expected
    off = tiered.offload
    assert off is not None
    assert off.stats.offloaded_blocks > 0
    # Requests 3..6 find the rest of their 10-block prefix below G1 instead of computing it.
    assert off.stats.onboarded_blocks * BS + tiered.kv.prefix_hits >= g1_hits + 4 * 5 * BS
    assert off.stats.onboarded_blocks >= 4 * 5
    assert off.stats.onboard_shortfall_blocks == 0
    tiers = {e.tier for e in events if isinstance(e, BlockStored)}
    assert {"device", "host", "disk"} <= tiers
    snap = tiered.kv_snapshot("w")
    assert snap.tier_hashes["disk"]
    tiered.close()


def test_each_tier_alone_round_trips_into_the_engine(
    loaded: Any, tmp_path: Path, jetstream_url: str
) -> None:
    ps = prompts()[:4]
    expected = run_each(engine(loaded), ps)
    for kw in (
        {"kv_host_gb": 0.01},
        {"kv_disk_dir": str(tmp_path / "only-disk")},
        {"kv_remote_url": jetstream_url, "kv_remote_bucket": f"engine{os.getpid()}"},
    ):
        eng = engine(loaded, **kw)
        assert run_each(eng, ps) == expected, kw
        assert eng.offload is not None and eng.offload.stats.onboarded_blocks >= 2 * 5, kw
        eng.close()


def test_corrupt_block_is_recomputed_not_served(loaded: Any, tmp_path: Path) -> None:
    ps = prompts()
    expected = run_each(engine(loaded), ps)
    g3 = tmp_path / "g3"
    eng = engine(loaded, kv_disk_dir=str(g3))
    run_each(eng, ps[:2])  # prompt A's blocks are evicted to disk by prompt B
    assert eng.offload is not None
    eng.offload.store.flush()
    extents = sorted(g3.glob("*.kve"))
    assert extents
    for path in extents:  # flip one byte in the last block of every extent
        with open(path, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x40]))
    assert run_each(eng, ps[2:]) == expected[2:]
    stats = eng.offload.stats
    assert stats.onboard_shortfall_blocks > 0  # planned, failed the check, recomputed
    assert eng.offload.store.stats.blocks_rejected > 0
    eng.close()


def test_restart_with_the_same_disk_directory_keeps_the_cache(loaded: Any, tmp_path: Path) -> None:
    ps = prompts()
    expected = run_each(engine(loaded), ps[:3])
    g3 = str(tmp_path / "g3")
    first = engine(loaded, kv_disk_dir=g3)
    run_each(first, ps[:2])
    first.close()

    events: list[KVEvent] = []
    second = engine(loaded, events, kv_disk_dir=g3)
    second.kv.flush_events()
    announced = {h for e in events if isinstance(e, BlockStored) and e.tier == "disk"
                 for h in e.block_hashes}  # fmt: skip
    assert announced  # the restarted worker tells routers what its disk holds
    # The first prompt's prefix was on disk before this engine computed anything.
    assert run_each(second, [ps[2]]) == [expected[2]]
    assert second.offload is not None and second.offload.stats.onboarded_blocks >= 5
    second.close()


def test_host_segment_shared_by_two_engines(loaded: Any) -> None:
    ps = prompts()
    expected = run_each(engine(loaded), ps[:3])
    name = host_name("shared")
    a = engine(loaded, kv_host_gb=0.01, kv_host_name=name)
    b = engine(loaded, kv_host_gb=0.01, kv_host_name=name)
    try:
        run_each(a, ps[:2])  # A's first prefix goes into the host segment: evicted in part,
        a.close()  # the rest saved when A stops (the segment outlives it)
        assert run_each(b, [ps[2]]) == [expected[2]]  # B finds it there
        assert b.offload is not None and b.offload.stats.onboarded_blocks >= 5
    finally:
        a.close()
        b.close()
        Path("/dev/shm", f"tokenfab-kv-{name}").unlink(missing_ok=True)


class _SetTiers:
    """A lower tier that is only a set of hashes (the scheduler needs nothing more)."""

    def __init__(self, hashes: set[int]) -> None:
        self.hashes = hashes

    def leading(self, hashes: Any) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.hashes:
            n += 1
        return n


def test_scheduler_plans_onboarding_and_the_cache_records_evictions() -> None:
    from tokenfab.clock import ManualClock
    from tokenfab.engine.core.kv_cache import KVCacheManager
    from tokenfab.engine.core.scheduler import Scheduler, SchedulerConfig
    from tokenfab.engine.core.sequence import Sequence

    seq = Sequence("a", list(range(100)), block_size=BS)  # 6 full blocks
    tiers = _SetTiers(set(seq.block_hashes[:4]))
    kv = KVCacheManager(8, BS, lower_tiers=tiers)
    sched = Scheduler(SchedulerConfig(), kv, ManualClock())
    sched.add(seq)
    out = sched.schedule()
    (ob,) = out.onboard
    assert ob.block_hashes == seq.block_hashes[:4] and ob.first_block == 0
    assert ob.block_ids == kv.block_table("a")[:4]
    assert out.batch.chunks[ob.chunk_index].start_pos == 4 * BS  # only the rest is computed
    sched.update_computed(out)
    sched.finish(seq, "stop")
    # A second request needing every block evicts the first one's cached blocks, recorded
    # with their ids (their K/V are intact until the step runs).
    other = Sequence("b", list(range(1000, 1000 + 8 * BS)), block_size=BS)
    sched.add(other)
    sched.schedule()
    evicted = kv.take_evicted()
    assert {e.block_hash for e in evicted} == set(seq.block_hashes)
    assert kv.take_evicted() == []


def test_blocks_evicted_by_an_import_reach_the_tiers_intact(loaded: Any) -> None:
    """Disaggregated import reserves free blocks, evicting cached ones: their bytes go to the
    tiers before the imported bytes overwrite them."""
    import numpy as np

    from tokenfab.kv.hashing import block_hashes

    eng = engine(loaded, kv_host_gb=0.01, kv_host_name=host_name("import"))
    assert eng.offload is not None
    prompt = prompts()[0]
    run_each(eng, [prompt])
    hashes = block_hashes(prompt, BS)
    ids = eng.kv.hold(hashes)
    originals = {h: bytes(eng.block_io.read([b])) for h, b in zip(hashes, ids, strict=True)}
    eng.kv.unhold(ids)
    n = eng.kv.num_blocks
    fake = [(1 << 60) + i for i in range(n)]
    data = np.full(n * eng.block_io.block_bytes, 0xAB, dtype=np.uint8)
    assert eng.import_blocks(fake, memoryview(data), None, [1] * (n * BS)) >= len(hashes)
    evicted = [h for h in hashes if eng.kv.cached_prefix_length([h]) == 0]
    assert evicted, "the import evicted none of the prompt's blocks"
    for h in evicted:
        got = eng.offload.store.load([h])
        assert got.num_blocks == 1, h
        assert bytes(got.data[0]) == originals[h]
    eng.close()
