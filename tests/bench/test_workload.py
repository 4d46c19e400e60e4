"""Trace parsing and request synthesis: sharing structure, scaling, reproducibility."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tokenfab.bench.traces import BUNDLED, TraceRow, load_trace, resolve_trace
from tokenfab.bench.workload import (
    TraceSynthesis,
    block_tokens_for,
    poisson_arrivals,
    synthetic_requests,
    trace_requests,
)

POOL = list(range(300, 5000))


def _rows(*rows: tuple[float, int, int, tuple[int, ...]]) -> list[TraceRow]:
    return [TraceRow(t, i, o, h) for t, i, o, h in rows]


def test_equal_hash_ids_give_equal_blocks_and_different_ids_differ() -> None:
    rows = _rows((0.0, 1024, 10, (7, 8)), (1.0, 1536, 10, (7, 8, 9)), (2.0, 512, 10, (3,)))
    a, b, c = trace_requests(rows, POOL, TraceSynthesis(block_tokens=16))
    assert len(a.prompt) == 32 and len(b.prompt) == 48 and len(c.prompt) == 16
    assert a.prompt == b.prompt[:32]  # shared prefix (ids 7, 8) -> identical tokens
    assert b.prompt[32:] != c.prompt  # id 9 vs id 3
    assert a.prompt[:16] != c.prompt


def test_block_content_is_a_function_of_seed_and_id() -> None:
    assert block_tokens_for(5, POOL, 16, seed=0) == block_tokens_for(5, POOL, 16, seed=0)
    assert block_tokens_for(5, POOL, 16, seed=0) != block_tokens_for(5, POOL, 16, seed=1)
    assert all(t in set(POOL) for t in block_tokens_for(5, POOL, 16, seed=0))


def test_lengths_and_times_scale() -> None:
    rows = _rows((10.0, 1000, 300, (1, 2)), (12.0, 512, 20, (1,)))
    synth = TraceSynthesis(block_tokens=16, output_scale=0.5, time_scale=0.25, max_output_len=100)
    a, b = trace_requests(rows, POOL, synth)
    assert len(a.prompt) == round(1000 * 16 / 512)  # 31: a partial last block
    assert a.max_tokens == 100  # 150 capped
    assert b.max_tokens == 10
    assert (a.arrival, b.arrival) == (0.0, pytest.approx(0.5))


def test_max_input_len_truncates_keeping_the_prefix() -> None:
    rows = _rows((0.0, 4096, 5, tuple(range(8))))
    (full,) = trace_requests(rows, POOL, TraceSynthesis())
    (cut,) = trace_requests(rows, POOL, TraceSynthesis(max_input_len=40))
    assert len(full.prompt) == 128 and cut.prompt == full.prompt[:40]


def test_rows_without_hash_ids_get_unique_prompts_scaled() -> None:
    rows = _rows((0.0, 100, 5, ()), (0.5, 100, 5, ()))
    a, b = trace_requests(rows, POOL, TraceSynthesis(input_scale=0.5))
    assert len(a.prompt) == len(b.prompt) == 50 and a.prompt != b.prompt


def test_synthetic_is_reproducible_and_fixed_length() -> None:
    first = [s.prompt for s in itertools.islice(synthetic_requests(POOL, 20, 7, seed=3), 5)]
    again = [s.prompt for s in itertools.islice(synthetic_requests(POOL, 20, 7, seed=3), 5)]
    assert first == again and all(len(p) == 20 for p in first)
    assert len({tuple(p) for p in first}) == 5


def test_poisson_arrivals_increase_with_the_right_mean_gap() -> None:
    gen = poisson_arrivals(synthetic_requests(POOL, 4, 4), rate=10.0, seed=1)
    specs = [next(gen) for _ in range(2000)]
    times = [s.arrival for s in specs]
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / (len(times) - 1) == pytest.approx(0.1, rel=0.1)


def test_bundled_traces_parse() -> None:
    for name in BUNDLED:
        rows = load_trace(resolve_trace(name))
        assert len(rows) == 1000
        assert all(r.input_len > 0 and r.output_len >= 0 for r in rows)
        assert [r.timestamp_s for r in rows] == sorted(r.timestamp_s for r in rows)
    moon = load_trace(resolve_trace("mooncake"))
    assert all(len(r.hash_ids) == -(-r.input_len // 512) for r in moon)


def test_azure_csv_timestamps_are_relative_seconds(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    a, b = trace_requests(load_trace(p), POOL, TraceSynthesis())
    assert b.arrival == pytest.approx(4.314579, abs=1e-5)
    assert (len(a.prompt), a.max_tokens) == (374, 44)


def test_bad_trace_rows_fail_with_the_line_number(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1}) + "\n{}\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_trace(p)
    with pytest.raises(ValueError, match="neither a file nor a bundled trace"):
        resolve_trace(str(tmp_path / "missing.jsonl"))
