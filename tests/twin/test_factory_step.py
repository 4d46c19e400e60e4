"""The twin's factory step times are the factory's own predictions, and its CLI's GPU
options: factory step times, disaggregation, planner, report; unknown GPU/model -> error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.factory.perf import decode_step_time, prefill_time
from tokenfab.twin.cli import app
from tokenfab.twin.factory_step import FactoryStepTime

MODEL, GPU = "llama-3.1-8b-instruct", "h100"


def batch(*chunks: tuple[int, int]) -> StepBatch:
    """Chunks of (tokens, start position)."""
    return StepBatch([SeqChunk([1] * n, s, [], True) for n, s in chunks])


def test_step_times_are_the_factory_model_s() -> None:
    st = FactoryStepTime.build(MODEL, GPU, tp=2)
    m, sys_, lay, cal = st.model, st.system, st.layout, st.calibration
    assert lay.tp == 2 and st.num_gpus == 2
    decode = st.seconds(batch(*[(1, 1000)] * 32))
    assert decode == pytest.approx(decode_step_time(m, sys_, lay, 32, 1000, cal), rel=1e-9)
    prefill = st.seconds(batch((1500, 0)))
    assert prefill == pytest.approx(prefill_time(m, sys_, lay, 1, 1500, cal), rel=1e-9)
    # a prefill step costs more than a decode step, longer context more than shorter
    assert prefill > decode > st.seconds(batch(*[(1, 10)] * 32))
    # the linear coefficients (fleet model, fast decode) track the exact model
    linear = st.base_s + 32 * st.per_decode_seq_s + 32 * 1000 * st.per_context_token_s
    assert linear == pytest.approx(decode, rel=0.1)
    # more GPUs per worker: faster steps, more KV room
    one = FactoryStepTime.build(MODEL, GPU, tp=1)
    assert one.seconds(batch(*[(1, 1000)] * 32)) > decode
    assert st.kv_blocks(16) > one.kv_blocks(16) > 0
    assert one.kv_bytes_per_token() == 32 * 2 * 8 * 128  # fp8 KV: layers x K,V x heads x dim


@pytest.mark.parametrize(
    ("model", "tp"), [("openai/gpt-oss-120b", 2), ("deepseek-ai/DeepSeek-V3", 8)]
)
def test_sliding_window_moe_and_mla_models_match_the_factory_too(model: str, tp: int) -> None:
    st = FactoryStepTime.build(model, "h200", tp=tp)
    m, sys_, lay, cal = st.model, st.system, st.layout, st.calibration
    for b, ctx in ((1, 100), (48, 6000)):
        want = decode_step_time(m, sys_, lay, b, ctx, cal)
        assert st.seconds(batch(*[(1, ctx)] * b)) == pytest.approx(want, rel=1e-9)
    want = prefill_time(m, sys_, lay, 1, 3000, cal)
    assert st.seconds(batch((3000, 0))) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--system", "nope", "--model", MODEL], "unknown system 'nope'"),
        (["--system", GPU, "--model", "nope"], "unknown model 'nope'"),
        (["--system", GPU], "--system and --model go together"),
        (["--system", GPU, "--model", MODEL, "--backend", "tgi"], "unknown backend 'tgi'"),
        (["--planner"], "--disagg"),
        (["--disagg", "2x3"], "P:D"),
    ],
)
def test_bad_gpu_options_are_one_line_errors(args: list[str], needle: str) -> None:
    r = CliRunner().invoke(app, [*args, "--requests", "5"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


GPU_RUN = [
    "--system", GPU, "--model", MODEL, "--disagg", "1:2", "--planner", "--planner-interval",
    "2", "--requests", "40", "--rate", "10", "--kv-blocks", "1024", "--input-len", "1024", "--output-len", "32",
    "--json",
]  # fmt: skip


def test_gpu_disaggregated_planned_run_reports_and_is_deterministic(tmp_path) -> None:
    png = tmp_path / "run.png"
    a = CliRunner().invoke(app, [*GPU_RUN, "--plot", str(png)])
    b = CliRunner().invoke(app, GPU_RUN)
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.stdout == b.stdout  # same seed, same output
    doc = json.loads(a.stdout)
    assert doc["finished"] == 40 and doc["remote_prefills"] == 40
    assert doc["gpus"] == 3 and doc["system"] == "h100_sxm"
    # one H100 prefills 1,024 tokens in milliseconds: every request well within the limits
    assert doc["good_share"] == 1.0 and 0 < doc["ttft_p50"] < 0.2
    assert doc["output_tokens_per_s_per_gpu"] == pytest.approx(doc["output_tokens_per_s"] / 3)
    assert doc["usd_per_mtok"] == pytest.approx(
        doc["usd_per_gpu_hour"] / (doc["output_tokens_per_s_per_gpu"] * 3600 / 1e6)
    )
    assert doc["output_tokens_per_s_per_mw"] > doc["output_tokens_per_s_per_gpu"]
    # the KV link defaults to the system's scale-out NIC, the bytes to the model's
    assert doc["link_gbps"] == 50.0 and doc["kv_bytes_per_token"] == 65536
    assert doc["kv_transfer_p50"] == pytest.approx(1024 * 65536 / 50e9, rel=0.05)
    sizes = doc["pool_sizes"]
    assert sizes[0] == {"t": 0.0, "prefill": 1, "decode": 2, "draining": 0} and len(sizes) > 2
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_a_slower_link_delays_decode_not_the_first_token() -> None:
    base = [a for a in GPU_RUN if a != "--planner"]

    def run(gbps: str) -> dict:
        r = CliRunner().invoke(app, [*base, "--link-gbps", gbps])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    fast, slow = run("50"), run("0.5")
    assert slow["kv_transfer_p50"] == pytest.approx(fast["kv_transfer_p50"] * 100, rel=0.05)
    assert slow["latency_p50"] > fast["latency_p50"] + 0.5 * slow["kv_transfer_p50"]
    assert slow["ttft_p50"] == pytest.approx(fast["ttft_p50"], rel=0.2)
