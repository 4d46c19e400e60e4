"""KV cache bookkeeping: block tables, prefix sharing, ref counts, LRU eviction, KV events."""

from __future__ import annotations

from tokenfab.engine.core.kv_cache import KVCacheManager
from tokenfab.engine.core.sequence import Sequence
from tokenfab.kv.hashing import block_hashes, request_extra_keys
from tokenfab.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

BS = 4


def make_seq(rid: str, tokens: list[int], extra: tuple[str, ...] = ()) -> Sequence:
    return Sequence(rid, tokens, block_size=BS, extra_keys=extra)


def run_prefill(kv: KVCacheManager, seq: Sequence) -> list[int]:
    """Admit seq like the scheduler does: take its cached prefix, compute the rest."""
    prefix = kv.find_cached_prefix(seq)
    assert kv.allocate(seq, seq.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit(seq)
    return prefix


class Sink:
    def __init__(self) -> None:
        self.events: list[KVEvent] = []

    def __call__(self, events: list[KVEvent]) -> None:
        self.events.extend(events)


def test_sequence_hashes_match_shared_hashing_and_grow_incrementally() -> None:
    toks = list(range(10))
    seq = make_seq("a", toks, extra=request_extra_keys("l", "s"))
    assert seq.block_hashes == block_hashes(toks, BS, ("lora=l", "salt=s"))
    for t in (10, 11, 12):
        seq.append_token(t)
    assert seq.block_hashes == block_hashes(list(range(13)), BS, ("lora=l", "salt=s"))
    assert len(seq.block_hashes) == 3


def test_allocate_covers_positions_and_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_seq("a", list(range(9)))
    assert kv.allocate(a, 9)
    assert len(kv.block_table("a")) == 3
    b = make_seq("b", list(range(100, 109)))
    assert not kv.allocate(b, 9)  # needs 3, only 1 free
    assert kv.block_table("b") == [] and kv.num_free_blocks == 1
    kv.free(a)
    assert kv.num_free_blocks == 4


def test_prefix_sharing_counts_refs_and_never_caches_the_last_prompt_token() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_seq("a", list(range(8)))  # exactly two full blocks
    run_prefill(kv, a)
    b = make_seq("b", list(range(8)))
    prefix = kv.find_cached_prefix(b)
    # Only one block may be reused: the last token must be computed to get logits.
    assert prefix == kv.block_table("a")[:1]
    assert kv.allocate(b, 8, prefix)
    assert kv.ref_count(prefix[0]) == 2
    assert kv.block_table("b")[0] == kv.block_table("a")[0]
    assert kv.block_table("b")[1] != kv.block_table("a")[1]
    kv.free(a)
    assert kv.ref_count(prefix[0]) == 1
    c = make_seq("c", list(range(9)))
    assert len(kv.find_cached_prefix(c)) == 2


def test_extra_keys_isolate_prefixes() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    run_prefill(kv, make_seq("a", list(range(9))))
    salted = make_seq("b", list(range(9)), extra=request_extra_keys(None, "secret"))
    assert kv.find_cached_prefix(salted) == []
    assert len(kv.find_cached_prefix(make_seq("c", list(range(9))))) == 2


def test_freed_cached_blocks_survive_until_evicted_lru() -> None:
    sink = Sink()
    kv = KVCacheManager(num_blocks=3, block_size=BS, event_sink=sink)
    a = make_seq("a", list(range(8)) + [99])  # two full blocks + one partial
    run_prefill(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 3
    # Still a prefix hit after freeing.
    a2 = make_seq("a2", list(range(9)))
    assert len(kv.find_cached_prefix(a2)) == 2
    # A 2-block newcomer reuses the uncached partial block first, then the deepest cached one.
    b = make_seq("b", list(range(200, 207)))
    assert kv.allocate(b, 7)
    assert len(kv.find_cached_prefix(a2)) == 1  # block 2 of "a" evicted, block 1 kept
    kv.flush_events()
    removed = [e for e in sink.events if isinstance(e, BlockRemoved)]
    assert len(removed) == 1 and removed[0].block_hashes == [a.block_hashes[1]]


def test_events_have_monotonic_ids_and_chain_parents() -> None:
    sink = Sink()
    kv = KVCacheManager(num_blocks=3, block_size=BS, event_sink=sink)
    a = make_seq("a", list(range(5)))
    run_prefill(kv, a)
    for t in (5, 6, 7):
        a.append_token(t)
    a.num_computed_tokens = 8
    kv.allocate(a, 8)
    kv.commit(a)
    kv.flush_events()
    stored = [e for e in sink.events if isinstance(e, BlockStored)]
    assert [e.block_hashes for e in stored] == [[a.block_hashes[0]], [a.block_hashes[1]]]
    assert stored[0].parent_hash is None and stored[1].parent_hash == a.block_hashes[0]
    assert stored[1].token_ids == [4, 5, 6, 7] and stored[1].block_size == BS
    kv.free(a)
    assert kv.reset_prefix_cache()
    kv.flush_events()
    assert isinstance(sink.events[-1], AllBlocksCleared)
    ids = [e.event_id for e in sink.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert kv.find_cached_prefix(make_seq("z", list(range(9)))) == []


def test_duplicate_blocks_are_cached_once() -> None:
    sink = Sink()
    kv = KVCacheManager(num_blocks=10, block_size=BS, event_sink=sink)
    # Both computed concurrently (no hit for the second at admission).
    a, b = make_seq("a", list(range(9))), make_seq("b", list(range(9)))
    for s in (a, b):
        assert kv.allocate(s, 9)
    for s in (a, b):
        s.num_computed_tokens = 9
        kv.commit(s)
    kv.flush_events()
    stored = [h for e in sink.events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert stored == a.block_hashes
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10
    assert len(kv.find_cached_prefix(make_seq("c", list(range(9))))) == 2


def test_prefix_caching_off_shares_nothing() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    run_prefill(kv, make_seq("a", list(range(9))))
    assert kv.find_cached_prefix(make_seq("b", list(range(9)))) == []
