"""`tokenfab bench` against a real `tokenfab serve` stack on a tiny model, loopback only."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenfab.bench.cli import app
from tokenfab.config import EngineConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server_url(tiny_llama: Path) -> Iterator[str]:
    from tokenfab.serve.server import ServerThread

    cfg = EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_num_batched_tokens=256)
    with ServerThread(cfg) as url:
        yield url


def _bench(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_fixed_concurrency_run_reports_exact_token_counts(
    server_url: str, tiny_llama: Path, tmp_path: Path
) -> None:
    code, out, err = _bench(
        "--url", server_url, "--tokenizer", str(tiny_llama), "-c", "4", "-n", "8",
        "--input-len", "24", "--output-len", "6", "--ttft", "60000", "--json", "--quiet",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert (summary["completed"], summary["failed"]) == (8, 0)
    assert summary["output_token_throughput"] > 0
    assert summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
    # ITLs are gaps between text chunks: at most one per token after the first (servers may
    # merge tokens into one chunk or hold back partial UTF-8).
    assert 0 < summary["itl_ms"]["count"] <= 8 * 5
    per_request = json.loads((tmp_path / "results.json").read_text())["requests"]
    assert [r["output_tokens"] for r in per_request] == [6] * 8
    assert {(tmp_path / n).stat().st_size > 0 for n in ("latency_cdf.png", "timeline.png")} == {
        True
    }


def test_trace_replay_with_shared_prefixes(server_url: str, tiny_llama: Path) -> None:
    code, out, err = _bench(
        "--url", server_url, "--tokenizer", str(tiny_llama), "--trace", "mooncake", "-n", "6",
        "--block-tokens", "4", "--time-scale", "0", "-c", "3", "--max-output-len", "3",
        "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"]["mode"] == "trace"
    assert doc["summary"]["completed"] == 6
    assert doc["summary"]["output_token_throughput"] > 0


def test_table_output_for_people(server_url: str) -> None:
    code, out, _ = _bench(
        "--url", server_url, "-n", "2", "--input-len", "8", "--output-len", "3", "--quiet"
    )
    assert code == 0
    assert "TTFT" in out and "output token throughput" in out


def test_unreachable_server_is_a_one_line_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    code, _, err = _bench("--url", f"http://127.0.0.1:{port}", "-n", "1", "--quiet")
    assert code == 2
    assert "cannot reach the server" in err and len(err.strip().splitlines()) == 1


def test_poisson_rate_run_stops_sending_at_the_duration(server_url: str) -> None:
    code, out, err = _bench(
        "--url", server_url, "--rate", "20", "--duration", "1.0", "--input-len", "8",
        "--output-len", "2", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"]["mode"] == "rate"
    assert 1 <= doc["summary"]["requests"] <= 60  # ~20 expected; bounded by the duration
    assert doc["summary"]["failed"] == 0


def test_a_lone_end_of_sequence_token_is_a_completed_request(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A request whose only token is end-of-sequence streams no text, just the finish marker
    (usage: 1 completion token); the load generator must count it as completed, its TTFT at
    that marker, not as a failure."""
    import shutil

    from tokenfab import LLM, SamplingParams
    from tokenfab.serve.server import ServerThread

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    prompt = [100 + i for i in range(16)]
    first = LLM(str(model)).generate(
        [prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False
    )
    gen_cfg = model / "generation_config.json"
    cfg = json.loads(gen_cfg.read_text())
    cfg["eos_token_id"] = [first[0].token_ids[0]]  # the model's first greedy token ends it
    gen_cfg.write_text(json.dumps(cfg))

    import asyncio

    import httpx

    from tokenfab.bench.client import ClientConfig, send_streaming
    from tokenfab.bench.workload import RequestSpec

    async def once(url: str):  # type: ignore[no-untyped-def]
        cc = ClientConfig(base_url=url, model="model", ignore_eos=False)
        async with httpx.AsyncClient(timeout=60) as client:
            return await send_streaming(client, cc, RequestSpec(0, prompt, 8), 0.0)

    engine = EngineConfig(model=str(model), num_kv_blocks=64)
    with ServerThread(engine) as url:
        res = asyncio.run(once(url))
    assert res.ok, res.error
    assert res.output_tokens == 1 and res.ttft is not None and res.ttft <= res.e2e
