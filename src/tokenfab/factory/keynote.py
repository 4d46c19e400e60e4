"""The GTC 2025 keynote comparison, replayed on the factory model.

On stage (GTC 2025 keynote, 18 March 2025) NVIDIA argued with a Pareto plot of tokens/s per
megawatt against tokens/s per user for a reasoning model: Hopper about 2M vs GB200 NVL72 about
9.2M tokens/s per MW at the same interactivity, "25x in one generation at the same power", and
40x for reasoning with Dynamo (disaggregated serving). Here the same question is asked of a
model anyone can inspect: DeepSeek-R1 (the open reasoning model of the time), 1k prompt tokens
and 8k reasoning tokens (the keynote's own figure for a reasoning answer, "~8,000 tokens"),
Hopper in FP8 (its fastest format) vs GB200 NVL72 in FP8 and FP4.

Hopper is one 8-GPU H200 NVLink node (R1 in FP8 needs ~690 GB, which fits in 8 x 141 GB but
not in 8 x 80 GB), eight H200 nodes (64 GPUs: room for disaggregation and expert parallelism
over the scale-out network) and two H100 nodes (16 GPUs). A claim is judged against the best
Hopper at each interactivity, the conservative reading; the H100-only ratio is printed too.

The verdicts come from the numbers, never hard-coded: absolute figures are "supported" within
a factor 1.5 (the model's own error is well below that, the stage figures are rounded and their
power accounting unknown); ratio claims are "supported" when the model's ratio reaches 80% of
the claim at an interactivity where Hopper still delivers at least 10% of its own peak, and
"only at the edge" when it gets there only where Hopper has almost nothing left (near its
maximum interactivity any ratio can be reached, which says little).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenfab.factory.catalog import get_system
from tokenfab.factory.modelspec import load_model_spec
from tokenfab.factory.pareto import pareto_indices, value_at
from tokenfab.factory.search import Candidate, PlanQuery, run_search

MODEL = "deepseek-ai/DeepSeek-R1"
SOURCE = (
    "NVIDIA GTC 2025 keynote (J. Huang, 18 Mar 2025, session S72484): tokens/s per MW vs "
    "tokens/s per user for a reasoning model; '25x in one generation at the same power', "
    "40x with Dynamo; notes at https://reprises.in2p3.fr/12-5-1-19411.html and "
    "https://johnfurrier.substack.com/p/gtc-notes-from-nvidias-jensen-huang"
)
KEYNOTE_NOTE = (
    "Per-MW figures use all-in IT power per GPU (systems.toml, no PUE); the stage figures' "
    "power accounting was not stated, which only shifts absolute values, not ratios."
)
BACKEND = "trtllm"  # NVIDIA's stage figures are TensorRT-LLM (with Dynamo for disaggregation)
ABS_FACTOR = 1.5
RATIO_SHARE = 0.8
EDGE_SHARE = 0.1
HOPPER_MW_CLAIM = 2.0e6
GB200_MW_CLAIM = 9.2e6


@dataclass(frozen=True)
class Fleet:
    key: str
    label: str
    system: str
    gpus: int
    precision: str
    hopper: bool


FLEETS = (
    Fleet("h100", "H100 SXM x16 (2 nodes), FP8", "h100_sxm", 16, "fp8", True),
    Fleet("h200", "H200 SXM x8 (1 NVLink-8 node), FP8", "h200_sxm", 8, "fp8", True),
    Fleet("h200x64", "H200 SXM x64 (8 nodes, scale-out EP), FP8", "h200_sxm", 64, "fp8", True),
    Fleet("gb200_fp8", "GB200 NVL72, FP8", "gb200", 72, "fp8", False),
    Fleet("gb200_fp4", "GB200 NVL72, FP4", "gb200", 72, "fp4", False),
)
FLEETS_BY_KEY = {f.key: f for f in FLEETS}


@dataclass
class Frontier:
    """tokens/s/user (x) against tokens/s per MW (y), by increasing x."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def of(cls, cands: list[Candidate]) -> Frontier:
        if not cands:
            return cls(np.empty(0), np.empty(0))
        x = np.array([c.tokens_per_s_per_user for c in cands])
        y = np.array([c.tokens_per_s_per_mw for c in cands])
        idx = pareto_indices(x, y)
        return cls(x[idx], y[idx])

    def at(self, x_min: float) -> float:
        return value_at(self.x, self.y, x_min)

    @property
    def peak(self) -> float:
        return float(self.y.max()) if self.y.size else 0.0

    @property
    def x_max(self) -> float:
        return float(self.x.max()) if self.x.size else 0.0

    @property
    def x_at_peak(self) -> float:
        return float(self.x[int(np.argmax(self.y))]) if self.y.size else 0.0


@dataclass
class Claim:
    key: str
    text: str
    verdict: str  # "supported" | "not supported" | "only at the edge" | "supported only ..."
    why: str
    figures: dict = field(default_factory=dict)


@dataclass
class KeynoteReport:
    isl: int
    osl: int
    fleets: dict[str, Fleet]
    frontiers: dict[str, dict[str, Frontier]]  # fleet -> {"all", "agg", "disagg"}
    grid: list[float]
    table: dict[str, list[float]]  # fleet -> tokens/s per MW at each grid interactivity
    claims: list[Claim]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "model": MODEL,
            "isl": self.isl,
            "osl": self.osl,
            "source": SOURCE,
            "fleets": {
                k: {
                    "label": f.label,
                    "system": f.system,
                    "gpus": f.gpus,
                    "precision": f.precision,
                    "peak_tokens_per_s_per_mw": self.frontiers[k]["all"].peak,
                    "max_tokens_per_s_per_user": self.frontiers[k]["all"].x_max,
                    "frontier": {
                        m: {
                            "tokens_per_s_per_user": fr.x.tolist(),
                            "tokens_per_s_per_mw": fr.y.tolist(),
                        }
                        for m, fr in self.frontiers[k].items()
                    },
                }
                for k, f in self.fleets.items()
            },
            "interactivity_grid": self.grid,
            "tokens_per_s_per_mw_at_grid": self.table,
            "claims": [
                {"claim": c.key, "text": c.text, "verdict": c.verdict, "why": c.why, **c.figures}
                for c in self.claims
            ],
            "seconds": round(self.seconds, 3),
        }


def _ratio_claim(
    key: str,
    text: str,
    claim: float,
    num: Frontier,
    den: Frontier,
    num_label: str,
    den_label: str,
) -> Claim:
    """Judge 'num is `claim` x den at the same interactivity' over den's own range."""
    xs = np.unique(np.concatenate([den.x, num.x]))
    xs = xs[(xs <= den.x_max) & (xs > 0)]
    rows = [(x, num.at(x), den.at(x)) for x in xs]
    rows = [(x, a, b) for x, a, b in rows if b > 0]
    if not rows:
        return Claim(key, text, "not supported", f"{den_label} has no operating point", {})
    ratios = np.array([a / b for _, a, b in rows])
    solid = np.array([b >= EDGE_SHARE * den.peak for _, _, b in rows])
    r_peak = num.at(den.x_at_peak) / den.at(den.x_at_peak)
    r_solid = float(ratios[solid].max()) if solid.any() else 0.0
    i_all = int(np.argmax(ratios))
    x_solid = (
        float(np.array([r[0] for r in rows])[solid][int(np.argmax(ratios[solid]))])
        if solid.any()
        else 0.0
    )
    figs = {
        "ratio_at_hopper_peak": round(float(r_peak), 2),
        "hopper_peak_at_tokens_per_s_per_user": round(den.x_at_peak, 1),
        "max_ratio_where_hopper_above_10pct_of_peak": round(r_solid, 2),
        "at_tokens_per_s_per_user": round(x_solid, 1),
        "max_ratio_anywhere": round(float(ratios[i_all]), 2),
        "max_ratio_at_tokens_per_s_per_user": round(float(rows[i_all][0]), 1),
        "hopper_max_tokens_per_s_per_user": round(den.x_max, 1),
    }
    share = rows[i_all][2] / den.peak
    base = (
        f"{num_label} / {den_label}: {r_peak:.1f}x at {den_label}'s most efficient point "
        f"({den.x_at_peak:.0f} tok/s/user); up to {r_solid:.1f}x where {den_label} still "
        f"delivers >=10% of its peak (at {x_solid:.0f} tok/s/user); at most "
        f"{ratios[i_all]:.0f}x (at {rows[i_all][0]:.0f} tok/s/user, where {den_label} is down "
        f"to {share:.0%} of its peak); {den_label} reaches at most {den.x_max:.0f} tok/s/user, "
        f"{num_label} {num.x_max:.0f}."
    )
    if r_solid >= RATIO_SHARE * claim:
        verdict = "supported"
    elif ratios[i_all] >= RATIO_SHARE * claim:
        verdict = "only at the edge"
    else:
        verdict = "not supported"
    return Claim(key, text, verdict, base, figs)


def _abs_claim(
    key: str, text: str, claimed: float, got: float, where: str, gpu_only_factor: float
) -> Claim:
    """Judge an absolute tokens/s-per-MW figure; `gpu_only_factor` = all-in / GPU power, for
    the reading where a megawatt counts GPUs alone (the stage never said which)."""

    def within(v: float) -> bool:
        return claimed / ABS_FACTOR <= v <= claimed * ABS_FACTOR

    alt = got * gpu_only_factor
    why = (
        f"model: {got / 1e6:.2f}M tokens/s per MW {where} vs {claimed / 1e6:.1f}M claimed "
        f"({got / claimed:.2f}x the claim); counting GPU power alone it would be "
        f"{alt / 1e6:.2f}M ({alt / claimed:.2f}x)."
    )
    if within(got):
        verdict = "supported"
    elif within(alt):
        verdict = "supported only counting GPU power alone"
    else:
        verdict = "not supported"
    return Claim(key, text, verdict, why, {"model_value": got, "model_value_gpu_power_only": alt})


def run_keynote(isl: int = 1024, osl: int = 8192) -> KeynoteReport:
    import time

    t0 = time.perf_counter()
    model = load_model_spec(MODEL)
    fronts: dict[str, dict[str, Frontier]] = {}
    for f in FLEETS:
        q = PlanQuery(
            model, get_system(f.system), f.gpus, isl, osl, precision=f.precision, backend=BACKEND
        )
        r = run_search(q)
        fronts[f.key] = {
            "all": Frontier.of(r.candidates),
            "agg": Frontier.of([c for c in r.candidates if c.mode == "agg"]),
            "disagg": Frontier.of([c for c in r.candidates if c.mode == "disagg"]),
        }
    # Hopper envelope: the better of H100 x16 and H200 x8 at each interactivity
    hoppers = [f.key for f in FLEETS if f.hopper]
    hop_cands_x = np.concatenate([fronts[k]["all"].x for k in hoppers])
    hop_cands_y = np.concatenate([fronts[k]["all"].y for k in hoppers])
    idx = pareto_indices(hop_cands_x, hop_cands_y)
    hopper = Frontier(hop_cands_x[idx], hop_cands_y[idx])
    hop_agg_x = np.concatenate([fronts[k]["agg"].x for k in hoppers])
    hop_agg_y = np.concatenate([fronts[k]["agg"].y for k in hoppers])
    idx = pareto_indices(hop_agg_x, hop_agg_y)
    hopper_agg = Frontier(hop_agg_x[idx], hop_agg_y[idx])
    fp4 = fronts["gb200_fp4"]

    grid = [5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0]
    table = {k: [fronts[k]["all"].at(x) for x in grid] for k in fronts}

    x_ref = hopper.x_at_peak
    hop_key = max(hoppers, key=lambda k: fronts[k]["all"].peak)

    def gpu_only(system: str) -> float:
        sysm = get_system(system)
        return sysm.allin_power_w / sysm.gpu_power_w

    claims = [
        _abs_claim(
            "hopper_2m",
            "Hopper delivers about 2M tokens/s per MW",
            HOPPER_MW_CLAIM,
            hopper.peak,
            f"at Hopper's most efficient point ({FLEETS_BY_KEY[hop_key].label}, "
            f"{x_ref:.0f} tok/s/user)",
            gpu_only(FLEETS_BY_KEY[hop_key].system),
        ),
        _abs_claim(
            "gb200_9.2m",
            "GB200 NVL72 delivers about 9.2M tokens/s per MW at the same interactivity",
            GB200_MW_CLAIM,
            fp4["all"].at(x_ref),
            f"for GB200 NVL72 FP4 at >= {x_ref:.0f} tok/s/user",
            gpu_only("gb200"),
        ),
        # "one generation at the same power" is the hardware alone: both aggregated; Dynamo's
        # disaggregated serving is the separate 40x claim below
        _ratio_claim(
            "25x",
            "25x tokens/s per MW in one generation at the same power (GB200 NVL72 vs Hopper, "
            "both aggregated)",
            25.0,
            fp4["agg"] if fp4["agg"].x.size else fp4["all"],
            hopper_agg,
            "GB200 NVL72 FP4 agg",
            "Hopper agg",
        ),
        _ratio_claim(
            "40x",
            "40x for a reasoning model with Dynamo (GB200 NVL72 FP4 with disaggregated serving "
            "available vs Hopper aggregated)",
            40.0,
            fp4["all"],
            hopper_agg,
            "GB200 NVL72 FP4 with Dynamo",
            "Hopper agg",
        ),
    ]
    # the same ratio against H100 alone (the Hopper most fleets ran in 2025), for reference
    fp4_agg = fp4["agg"] if fp4["agg"].x.size else fp4["all"]
    vs_h100 = _ratio_claim("25x_h100", "", 25.0, fp4_agg, fronts["h100"]["agg"], "GB200", "H100")
    claims[2].why += (
        f" Against H100 x16 alone: up to "
        f"{vs_h100.figures['max_ratio_where_hopper_above_10pct_of_peak']:.1f}x where H100 keeps "
        f">=10% of its peak (verdict vs H100 only: {vs_h100.verdict})."
    )
    claims[2].figures["vs_h100"] = {**vs_h100.figures, "verdict": vs_h100.verdict}
    return KeynoteReport(
        isl=isl,
        osl=osl,
        fleets={f.key: f for f in FLEETS},
        frontiers={**fronts, "hopper": {"all": hopper, "agg": hopper_agg}},
        grid=grid,
        table=table,
        claims=claims,
        seconds=time.perf_counter() - t0,
    )


def render_text(rep: KeynoteReport) -> str:
    lines = [
        f"GTC 2025 keynote check: {MODEL}, {rep.isl} prompt / {rep.osl} output tokens "
        f"(factory model, {rep.seconds:.1f} s)",
        "",
        "tokens/s per MW (millions) on each frontier at >= the given tokens/s per user:",
    ]
    head = "  " + f"{'fleet':<46}" + "".join(f"{x:>7g}" for x in rep.grid)
    lines.append(head)
    for k, f in rep.fleets.items():
        row = "".join(f"{v / 1e6:>7.2f}" if v > 0 else f"{'-':>7}" for v in rep.table[k])
        lines.append(f"  {f.label:<46}{row}")
    lines += ["", "Claims:"]
    by: dict[str, list[str]] = {}
    for c in rep.claims:
        by.setdefault(c.verdict, []).append(c.key)
    lines.append("  " + "; ".join(f"{v}: {', '.join(ks)}" for v, ks in by.items()) + ".")
    for c in rep.claims:
        lines.append(f"- [{c.verdict.upper()}] {c.text}.")
        lines.append(f"    {c.why}")
    lines += ["", f"Source of the claims: {SOURCE}."]
    return "\n".join(lines)


def plot_keynote(rep: KeynoteReport, path: Path) -> Path:
    from tokenfab.factory.plots import Curve, plot_curves

    colors = {
        "h100": "tab:gray",
        "h200": "tab:brown",
        "h200x64": "tab:red",
        "gb200_fp8": "tab:blue",
        "gb200_fp4": "tab:green",
    }
    curves = []
    for k, f in rep.fleets.items():
        fr = rep.frontiers[k]["all"]
        curves.append(Curve(f.label, fr.x.tolist(), fr.y.tolist(), colors[k]))
    agg = rep.frontiers["gb200_fp4"]["agg"]
    curves.append(
        Curve(
            "GB200 NVL72, FP4, aggregated only (no disagg)",
            agg.x.tolist(),
            agg.y.tolist(),
            "tab:green",
            "",
            "--",
        )
    )
    return plot_curves(
        curves,
        path,
        title=f"{MODEL}, ISL {rep.isl} / OSL {rep.osl}: tokens/s per MW vs tokens/s per user",
        ylabel="tokens/s per MW (all-in IT power)",
        hlines=((HOPPER_MW_CLAIM, "keynote: Hopper ~2M"), (GB200_MW_CLAIM, "keynote: GB200 ~9.2M")),
    )
