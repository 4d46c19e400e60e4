"""PNG plots of Pareto frontiers: throughput per GPU and per MW against tokens/s per user.

matplotlib is imported inside the functions (headless Agg backend) so the CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenfab.factory.errorbars import bundled_error_bars
from tokenfab.factory.search import SearchResult

MODE_STYLE = {"agg": ("tab:blue", "o"), "disagg": ("tab:orange", "s")}


@dataclass(frozen=True)
class Curve:
    """One labelled frontier: x = tokens/s/user, y = tokens/s per MW (or per GPU)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    marker: str = "o"
    linestyle: str = "-"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(result: SearchResult, front, yf) -> tuple[list[float], list[float]]:
    """Polygon of a frontier's error band: every point moved to where its measurement would
    sit at the fast end of the error bars, then back along the slow end. A point moves
    along both axes, since tokens/s per user is 1 / TPOT and throughput follows TTFT and
    TPOT together."""
    bars = bundled_error_bars()
    q = result.query
    fast, slow = [], []
    for c in front:
        p = c.prediction
        _, (pl, ph) = bars.interval(c.mode, q.backend, p.ttft_ms, p.tpot_ms)
        lo, hi = bars.throughput_factors(c.mode, q.backend, p.ttft_ms, p.tpot_ms, q.osl)
        x = c.tokens_per_s_per_user
        fast.append((x * p.tpot_ms / pl, yf(c) * hi))
        slow.append((x * p.tpot_ms / ph, yf(c) * lo))
    pts = fast + slow[::-1]
    return [x for x, _ in pts], [y for _, y in pts]


def plot_search(result: SearchResult, path: Path) -> Path:
    """Two panels (tokens/s/GPU and tokens/s/MW vs tokens/s/user), agg and disagg frontiers
    with their 80% error bands shaded, every evaluated point faintly behind them, the best
    point under the limits starred."""
    plt = _pyplot()
    q = result.query
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    panels = (
        ("tokens/s per GPU", lambda c: c.tokens_per_s_per_gpu),
        ("tokens/s per MW (all-in IT power)", lambda c: c.tokens_per_s_per_mw),
    )
    for ax, (ylabel, yf) in zip(axes, panels, strict=True):
        for mode, front in result.frontier_by_mode.items():
            color, marker = MODE_STYLE.get(mode, ("gray", "o"))
            pts = [c for c in result.candidates if c.mode == mode]
            ax.scatter(
                [c.tokens_per_s_per_user for c in pts],
                [yf(c) for c in pts],
                s=6,
                alpha=0.15,
                color=color,
                linewidths=0,
            )
            if front and bundled_error_bars().known:
                bx, by = _band(result, front, yf)
                ax.fill(bx, by, color=color, alpha=0.12, linewidth=0, label=f"{mode} 80% band")
            if front:
                ax.plot(
                    [c.tokens_per_s_per_user for c in front],
                    [yf(c) for c in front],
                    marker=marker,
                    markersize=4,
                    color=color,
                    label=f"{mode} frontier ({len(pts)} evaluated)",
                    drawstyle="steps-pre",
                )
        if result.best is not None:
            b = result.best
            ax.scatter(
                [b.tokens_per_s_per_user],
                [yf(b)],
                marker="*",
                s=220,
                color="crimson",
                zorder=5,
                label=f"best within limits: {b.describe()}",
            )
        if q.tpot_ms:
            ax.axvline(1000.0 / q.tpot_ms, color="gray", linestyle="--", linewidth=1)
            ax.annotate(
                f"TPOT {q.tpot_ms:g} ms",
                (1000.0 / q.tpot_ms, ax.get_ylim()[1]),
                fontsize=8,
                color="gray",
                ha="left",
                va="top",
            )
        ax.set_xlabel("tokens/s per user (interactivity)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"{q.model.name} on {q.gpus} x {q.system.name}, {q.precision}, "
        f"ISL {q.isl} / OSL {q.osl} (tokenfab factory model)",
        fontsize=11,
    )
    return _save(fig, plt, path)


def plot_curves(
    curves: Sequence[Curve],
    path: Path,
    title: str,
    ylabel: str,
    hlines: Sequence[tuple[float, str]] = (),
) -> Path:
    """Several frontiers on one axes (e.g. Hopper vs GB200 NVL72 for the keynote), with
    optional labelled horizontal reference lines (e.g. figures claimed on stage)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.6), constrained_layout=True)
    for y, label in hlines:
        ax.axhline(y, color="gray", linestyle=":", linewidth=1)
        ax.annotate(
            label,
            (0.99, y),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            color="dimgray",
            ha="right",
            va="bottom",
        )
    for c in curves:
        if not len(c.x):
            continue
        ax.plot(
            c.x,
            c.y,
            label=c.label,
            color=c.color,
            marker=c.marker,
            markersize=3,
            linestyle=c.linestyle,
            drawstyle="steps-pre",
        )
    ax.set_xlabel("tokens/s per user (interactivity)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
