import msgspec
import pytest

from tokenfab.clock import ManualClock
from tokenfab.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    GenerateOutput,
    GenerateRequest,
    KVEventBatch,
    SamplingParams,
    decoder,
    encode,
)


def test_request_round_trips_through_msgpack() -> None:
    req = GenerateRequest(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=5, temperature=0.0, stop=["\n"]),
        cache_salt="s",
    )
    assert decoder(GenerateRequest).decode(encode(req)) == req


def test_kv_event_union_round_trips_with_64_bit_hashes() -> None:
    batch = KVEventBatch(
        worker_id="w0",
        events=[
            BlockStored(
                event_id=1, block_hashes=[2**64 - 1], parent_hash=None, token_ids=[1], block_size=16
            ),
            BlockRemoved(event_id=2, block_hashes=[5]),
            AllBlocksCleared(event_id=3),
        ],
    )
    out = decoder(KVEventBatch).decode(encode(batch))
    assert out == batch
    assert [type(e) for e in out.events] == [BlockStored, BlockRemoved, AllBlocksCleared]


def test_pickle_is_never_accepted() -> None:
    import pickle

    with pytest.raises(msgspec.DecodeError):
        decoder(GenerateOutput).decode(pickle.dumps({"request_id": "x"}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("logprobs", 21),
        ("stop", [""]),
    ],
)
def test_invalid_sampling_params_are_rejected_with_the_value(field: str, value: object) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0]):
        params.validate()


def test_default_sampling_params_are_valid() -> None:
    SamplingParams().validate()
    assert SamplingParams(temperature=0).greedy


def test_manual_clock_only_moves_forward() -> None:
    clock = ManualClock()
    clock.advance(1.5)
    assert clock.now() == 1.5
    with pytest.raises(ValueError):
        clock.advance(-1)
