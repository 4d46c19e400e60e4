"""Show a run: a rich table for people, a JSON document for scripts, PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenfab.bench.metrics import Distribution, RequestResult, Summary


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def summary_table(summary: Summary, title: str = "tokenfab bench") -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("latency (ms)")
    for col in ("mean", "p50", "p90", "p99", "max"):
        t.add_column(col, justify="right")
    rows: list[tuple[str, Distribution]] = [
        ("TTFT", summary.ttft_ms),
        ("ITL", summary.itl_ms),
        ("TPOT", summary.tpot_ms),
        ("E2E", summary.e2e_ms),
    ]
    for name, d in rows:
        t.add_row(name, *(_fmt(v) for v in (d.mean, d.p50, d.p90, d.p99, d.max)))
    return t


def throughput_table(summary: Summary) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(justify="right")
    slo = summary.slo
    limits = ", ".join(
        f"{k} <= {v:g} ms"
        for k, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.itl_ms))
        if v is not None
    )
    rows = [
        ("requests (ok / failed)", f"{summary.completed} / {summary.failed}"),
        ("duration", f"{summary.duration_s:.2f} s"),
        ("request throughput", f"{summary.request_throughput:.3f} req/s"),
        ("output token throughput", f"{summary.output_token_throughput:,.1f} tok/s"),
        ("total token throughput", f"{summary.total_token_throughput:,.1f} tok/s"),
        (
            f"goodput ({limits or 'no SLO given'})",
            f"{summary.goodput:.3f} req/s ({summary.slo_attainment:.0%} of requests)",
        ),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def print_report(summary: Summary, console: Console, title: str = "tokenfab bench") -> None:
    console.print(summary_table(summary, title))
    console.print(throughput_table(summary))
    for msg, n in summary.errors.items():
        console.print(f"[red]{n} x {msg}[/red]")


def to_json(summary: Summary, config: dict, results: Sequence[RequestResult] | None) -> str:
    doc: dict = {"config": config, "summary": summary.to_dict()}
    if results is not None:
        doc["requests"] = [
            {
                "index": r.index,
                "start_s": r.start,
                "ok": r.ok,
                "error": r.error,
                "prompt_len": r.prompt_len,
                "output_tokens": r.output_tokens,
                "ttft_s": r.ttft,
                "e2e_s": r.e2e,
                "tpot_s": r.tpot,
            }
            for r in results
        ]
    return json.dumps(sanitize(doc), indent=2)


def sanitize(obj: object) -> object:
    """NaN (no samples) becomes null so the JSON stays standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sanitize(v) for v in obj]
    return obj


def write_plots(results: Sequence[RequestResult], out_dir: Path, title: str) -> list[Path]:
    """latency_cdf.png (TTFT, ITL, E2E) and timeline.png (per-request TTFT and E2E over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in results if r.ok and r.ttft is not None and r.e2e is not None]
    series = {
        "TTFT": [r.ttft * 1000 for r in done],
        "ITL": [x * 1000 for r in done for x in r.itls],
        "E2E": [r.e2e * 1000 for r in done],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, vals) in zip(axes, series.items(), strict=True):
        vals = sorted(vals)
        if vals:
            ys = [(i + 1) / len(vals) for i in range(len(vals))]
            ax.step(vals, ys, where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    cdf = out_dir / "latency_cdf.png"
    fig.savefig(cdf, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    starts = [r.start for r in done]
    ax.scatter(starts, series["E2E"], s=8, label="E2E", alpha=0.6)
    ax.scatter(starts, series["TTFT"], s=8, label="TTFT", alpha=0.8)
    failed = [r.start for r in results if not r.ok]
    if failed:
        ax.scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
    ax.set_xlabel("request sent at (s after start)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{title}: latency per request over time")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    timeline = out_dir / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    return [cdf, timeline]
