"""LLMEngine / AsyncEngine on a tiny model: streaming, validation, abort, isolation of
failures, stop conditions, seeds, logprobs, KV events, detokenization."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenfab.config import EngineConfig
from tokenfab.engine.core.batch import StepBatch
from tokenfab.engine.core.detokenizer import IncrementalDetokenizer, decode_fn
from tokenfab.engine.engine import AsyncEngine, LLMEngine
from tokenfab.engine.errors import InvalidRequestError, QueueFullError
from tokenfab.engine.model.loader import load_model
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import BlockStored, GenerateOutput, GenerateRequest, KVEvent, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_llama: Path) -> Any:
    return load_model(tiny_llama, dtype="float32")


def cfg(**kw: Any) -> EngineConfig:
    return EngineConfig(dtype="float32", num_kv_blocks=kw.pop("num_kv_blocks", 128), **kw)


def req(rid: str, ids: list[int], params: SamplingParams = GREEDY) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=ids, sampling=params)


def run_sync(engine: LLMEngine, reqs: list[GenerateRequest]) -> dict[str, list[GenerateOutput]]:
    for r in reqs:
        engine.add_request(r)
    outs: dict[str, list[GenerateOutput]] = {r.request_id: [] for r in reqs}
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs[o.request_id].append(o)
    return outs


def tokens(outs: list[GenerateOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


PROMPTS = [list(range(10, 10 + n)) for n in (3, 20, 41)]


# ---------------------------------------------------------------- detokenizer


def test_detokenizer_reassembles_multibyte_text_without_replacement_chars(loaded: Any) -> None:
    tok = loaded.tokenizer
    text = "héllo wörld 日本語 😀 done"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(decode_fn(tok, True), [], [])
    deltas = []
    for t in ids:
        d.add(t)
        deltas.append(d.take(False))
    deltas.append(d.take(True))
    assert "".join(deltas) == text
    assert not any("\ufffd" in x for x in deltas)
    assert sum(1 for x in deltas if x) < len(ids)  # some tokens were partial characters


def test_stop_string_is_cut_and_never_leaks(loaded: Any) -> None:
    tok = loaded.tokenizer
    ids = tok.encode("abc wörld xyz wörld tail")
    for include in (False, True):
        d = IncrementalDetokenizer(decode_fn(tok, True), [], ["wörld"], include)
        emitted, hit = "", None
        for t in ids:
            hit = d.add(t)
            emitted += d.take(hit is not None)
            assert "wö" not in emitted or include  # no partial stop string ever left out
            if hit:
                break
        assert hit == "wörld"
        assert emitted == ("abc wörld" if include else "abc ")


# ---------------------------------------------------------------- sync engine


def test_validation_errors_carry_numbers_and_change_nothing(loaded: Any) -> None:
    engine = LLMEngine(cfg(max_model_len=64), loaded=loaded)
    with pytest.raises(
        InvalidRequestError,
        match=r"prompt has 60 tokens; max_model_len is 64 \(max_tokens 16 would need 76\)",
    ):
        engine.add_request(req("a", list(range(60)), SamplingParams()))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(req("b", []))
    with pytest.raises(InvalidRequestError, match=r"token id 100000 at position 1 .* \(size 512\)"):
        engine.add_request(req("c", [5, 100000]))
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids \[600\]"):
        engine.add_request(req("s", [5], SamplingParams(stop_token_ids=[600])))
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.add_request(req("d", [5], SamplingParams(top_p=0.0)))
    assert not engine.has_unfinished()
    # Up to the context: max_tokens None stops at max_model_len with "length".
    outs = run_sync(
        engine, [req("e", list(range(60)), SamplingParams(max_tokens=None, temperature=0))]
    )
    assert len(tokens(outs["e"])) == 4 and outs["e"][-1].finish_reason == "length"


def test_queue_cap(loaded: Any) -> None:
    engine = LLMEngine(cfg(max_waiting=2), loaded=loaded)
    engine.add_request(req("a", [5]))
    engine.add_request(req("b", [6]))
    with pytest.raises(QueueFullError):
        engine.add_request(req("c", [7]))


class PoisonRunner:
    """The real runner, except that any step containing POISON raises (fault injection)."""

    POISON = 499

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.block_size, self.num_blocks = inner.block_size, inner.num_blocks

    def execute(self, batch: StepBatch) -> torch.Tensor:
        if any(self.POISON in c.token_ids for c in batch.chunks):
            raise RuntimeError("poisoned")
        return self.inner.execute(batch)


def test_a_failing_request_fails_alone(loaded: Any) -> None:
    reference = run_sync(
        LLMEngine(cfg(), loaded=loaded), [req(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    )
    engine = LLMEngine(cfg(), loaded=loaded)
    engine.runner.model_runner = PoisonRunner(engine.runner.model_runner)
    reqs = [req(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    reqs.insert(1, req("bad", [7, 8, PoisonRunner.POISON, 9]))
    outs = run_sync(engine, reqs)
    assert outs["bad"][-1].finish_reason == "error" and "poisoned" in (outs["bad"][-1].error or "")
    for i in range(len(PROMPTS)):
        assert tokens(outs[f"r{i}"]) == tokens(reference[f"r{i}"])
    assert engine.kv.num_used_blocks == 0


def test_stop_token_min_tokens_and_stop_strings(loaded: Any) -> None:
    engine = LLMEngine(cfg(), loaded=loaded)
    base = run_sync(
        engine, [req("base", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0))]
    )["base"]
    base_ids = tokens(base)
    stop_id = next(t for i, t in enumerate(base_ids) if i >= 2 and t not in base_ids[:i])
    k = base_ids.index(stop_id)
    p = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id])
    out = run_sync(engine, [req("s", PROMPTS[1], p)])["s"]
    assert tokens(out) == base_ids[: k + 1]
    assert out[-1].finish_reason == "stop" and out[-1].stop_reason == stop_id
    p = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id], min_tokens=k + 1)
    out = run_sync(engine, [req("m", PROMPTS[1], p)])["m"]
    assert stop_id not in tokens(out)[: k + 1] and len(tokens(out)) > k + 1

    text = "".join(o.text for o in base)
    stop = text[3:6]
    assert stop and stop not in text[:5]
    p = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
    out = run_sync(engine, [req("t", PROMPTS[1], p)])["t"]
    assert "".join(o.text for o in out) == text[: text.index(stop)]
    assert out[-1].stop_reason == stop


def test_seeds_and_logprobs(loaded: Any) -> None:
    engine = LLMEngine(cfg(), loaded=loaded)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, logprobs=3, ignore_eos=True)
    alone = tokens(run_sync(engine, [req("a", PROMPTS[0], seeded)])["a"])
    crowd = run_sync(
        engine,
        [
            req("x", PROMPTS[1], SamplingParams(max_tokens=8, temperature=1.0)),
            req("b", PROMPTS[0], seeded),
        ],
    )
    assert tokens(crowd["b"]) == alone
    other = SamplingParams(max_tokens=8, temperature=1.0, seed=8, ignore_eos=True)
    assert tokens(run_sync(engine, [req("c", PROMPTS[0], other)])["c"]) != alone
    lps = [lp for o in crowd["b"] for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == alone
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in lps)


def test_kv_events_match_the_shared_block_hashes(loaded: Any) -> None:
    events: list[KVEvent] = []
    engine = LLMEngine(cfg(), loaded=loaded, event_sink=events.extend)
    prompt = list(range(100, 150))
    run_sync(engine, [req("a", prompt)])
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    # The router predicts these from the prompt alone with tokenfab.kv.hashing.
    assert stored[:3] == block_hashes(prompt, 16)
    ids = [e.event_id for e in events]
    assert ids == sorted(set(ids))


# ---------------------------------------------------------------- async engine


async def collect(engine: AsyncEngine, r: GenerateRequest) -> list[GenerateOutput]:
    return [o async for o in engine.generate(r)]


async def test_async_streams_match_sync_and_errors_do_not_disturb(loaded: Any) -> None:
    reference = run_sync(
        LLMEngine(cfg(), loaded=loaded), [req(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    )
    engine = AsyncEngine(cfg(max_model_len=128), loaded=loaded)
    await engine.start()
    try:
        assert engine.max_model_len == 128 and engine.tokenizer is not None
        good = [
            asyncio.create_task(collect(engine, req(f"r{i}", p))) for i, p in enumerate(PROMPTS)
        ]
        with pytest.raises(InvalidRequestError, match="prompt has 200 tokens"):
            await collect(engine, req("long", list(range(200))))
        with pytest.raises(InvalidRequestError, match="already in use"):
            await asyncio.gather(collect(engine, req("dup", [5])), collect(engine, req("dup", [5])))
        results = await asyncio.gather(*good)
        for i, outs in enumerate(results):
            assert tokens(outs) == tokens(reference[f"r{i}"])
            assert outs[-1].finish_reason == "length" and outs[-1].num_prompt_tokens == len(
                PROMPTS[i]
            )
            assert all(o.finish_reason is None for o in outs[:-1])
        stats = engine.stats()
        assert stats.generation_tokens >= 36 and stats.kv_blocks_total == 128
    finally:
        await engine.shutdown()


async def test_closing_the_stream_aborts_and_frees_blocks(loaded: Any) -> None:
    engine = AsyncEngine(cfg(), loaded=loaded)
    await engine.start()
    try:
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        gen = engine.generate(req("a", PROMPTS[2], long))
        async for _ in gen:
            break
        await gen.aclose()
        task = asyncio.create_task(collect(engine, req("b", PROMPTS[1], long)))
        await asyncio.sleep(0)
        await engine.abort("b")
        outs = await asyncio.wait_for(task, 60)
        assert outs[-1].finish_reason == "abort" and len(tokens(outs)) < 500
        for _ in range(200):
            s = engine.stats()
            if s.kv_blocks_used == 0 and s.running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().kv_blocks_used == 0 and engine.stats().waiting == 0
    finally:
        await engine.shutdown()


async def test_queue_full_raises_before_first_output(loaded: Any) -> None:
    engine = AsyncEngine(cfg(max_waiting=0), loaded=loaded)
    await engine.start()
    try:
        with pytest.raises(QueueFullError):
            await collect(engine, req("a", [5]))
    finally:
        await engine.shutdown()


def test_max_model_len_beyond_the_models_context_is_refused(loaded: Any) -> None:
    limit = loaded.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context length {limit}"):
        LLMEngine(cfg(max_model_len=limit + 1), loaded=loaded)
    assert LLMEngine(cfg(max_model_len=limit), loaded=loaded).max_model_len <= limit
