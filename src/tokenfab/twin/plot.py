"""`tokenfab twin --plot FILE.png`: pool sizes and latency over virtual time."""

from __future__ import annotations

from pathlib import Path

from tokenfab.twin.pools import PoolSample
from tokenfab.twin.sim import RequestRecord


def plot_run(records: list[RequestRecord], pools: list[PoolSample], path: Path, title: str) -> None:
    """Two panels sharing the virtual time axis: workers per pool (a step line per role; one
    "aggregated" line without pools) and each request's TTFT (at its first token) and mean
    ITL (at its finish)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if pools:
        ts = [p.t for p in pools]
        top.step(ts, [p.prefill for p in pools], where="post", label="prefill")
        top.step(ts, [p.decode for p in pools], where="post", label="decode")
        if any(p.draining for p in pools):
            top.step(ts, [p.draining for p in pools], where="post", label="draining", ls=":")
        top.legend(loc="upper left")
    top.set_ylabel("workers")
    top.set_ylim(bottom=0)
    top.yaxis.get_major_locator().set_params(integer=True)
    top.set_title(title)
    ttft = [
        (r.token_times[0], (r.token_times[0] - r.arrival) * 1e3) for r in records if r.token_times
    ]
    itl = [
        (r.finished, (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) * 1e3)
        for r in records
        if r.finished is not None and len(r.token_times) > 1
    ]
    if ttft:
        bottom.scatter(*zip(*ttft, strict=True), s=4, label="TTFT (ms)")
    if itl:
        bottom.scatter(*zip(*itl, strict=True), s=4, label="mean ITL (ms)")
    bottom.set_yscale("log")
    bottom.set_xlabel("virtual time (s)")
    bottom.set_ylabel("ms")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
