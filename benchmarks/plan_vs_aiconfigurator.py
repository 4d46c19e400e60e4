"""tokenfab plan vs NVIDIA AIConfigurator: the same deployment questions, side by side.

For each question (model, system, GPUs, ISL/OSL, TTFT/TPOT limits) both tools search
aggregated and disaggregated layouts; the script prints each tool's best layout within the
limits, its throughput (output tokens/s per GPU over all GPUs asked), its interactivity, and
the wall time of the whole command, then the time ratio.

AIConfigurator (PyPI `aiconfigurator`, 0.12.0) runs in its own virtualenv under
benchmarks/.venvs/aiconfigurator (gitignored), created on first use. Its dependencies were
checked before installing (`pip download --no-deps` + metadata): neither it nor
`aiconfigurator-core` requires torch; a constraints file pins torch==2.13.0 anyway so nothing
can pull a CUDA build. Both tools get the same config.json (tokenfab's bundled copy), since
this machine cannot reach Hugging Face.

Usage: .venv/bin/python benchmarks/plan_vs_aiconfigurator.py [--only r1|llama70b] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".venvs" / "aiconfigurator"
AIC_VERSION = "0.12.0"
TOKENFAB = [str(ROOT / ".venv" / "bin" / "tokenfab")]
MODEL_CONFIGS = ROOT / "src" / "tokenfab" / "factory" / "data" / "model_configs"


@dataclass(frozen=True)
class Question:
    key: str
    model: str  # HF id (tokenfab's bundled config)
    aic_system: str
    tf_system: str
    gpus: int
    isl: int
    osl: int
    ttft_ms: float
    tpot_ms: float
    precision: str  # what the checkpoint ships in (AIConfigurator infers the same)


QUESTIONS = (
    Question("r1", "deepseek-ai/DeepSeek-R1", "gb200", "gb200", 72, 1024, 1024, 2000, 30, "fp8"),
    Question(
        "llama70b", "meta-llama/Llama-3.1-70B", "h200_sxm", "h200", 8, 1024, 1024, 2000, 30, "bf16"
    ),
)


@dataclass
class Answer:
    tool: str
    question: str
    mode: str
    layout: str
    tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float
    ttft_ms: float
    tpot_ms: float
    wall_s: float
    cpu_s: float  # user + system CPU of the command: fairer than wall time on a shared machine
    search_s: float | None = None
    row: dict | None = None  # AIConfigurator's best row, to re-predict it with tokenfab


def tokenfab_on_aic_layout(q: Question, row: dict) -> dict | None:
    """tokenfab's prediction of AIConfigurator's aggregated pick: separates "which layout
    did the search find" from "how fast does each performance model think it is"."""
    if "parallel" not in row:
        return None  # disaggregated pick: not re-predicted here
    from tokenfab.factory.catalog import get_system
    from tokenfab.factory.modelspec import load_model_spec
    from tokenfab.factory.perf import Layout
    from tokenfab.factory.serving import AggDeployment, predict

    tp, pp, dp = int(row["tp"]), int(row["pp"]), int(row["dp"])
    lay = Layout(
        tp=tp, pp=pp, attn_dp=dp, ep=int(row["moe_ep"]), moe_tp=int(row["moe_tp"]),
        precision=q.precision,
    )  # fmt: skip
    dep = AggDeployment(lay, int(row["bs"]) * dp, q.isl, q.osl)
    from tokenfab.factory.params import bundled_calibration

    cal = bundled_calibration("trtllm")
    p = predict(load_model_spec(q.model), get_system(q.tf_system), dep, cal)
    replicas = q.gpus // lay.num_gpus
    return {
        "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu * lay.num_gpus * replicas / q.gpus,
        "tokens_per_s_per_user": p.tokens_per_s_per_user,
        "ttft_ms": p.ttft_ms,
        "tpot_ms": p.tpot_ms,
        "fits": p.fits,
    }


def timed_run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; (result, wall seconds, child CPU seconds)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return res, wall, cpu


def ensure_aiconfigurator() -> Path:
    """The aiconfigurator CLI in its own virtualenv (created and installed once)."""
    exe = VENV / "bin" / "aiconfigurator"
    if exe.exists():
        return exe
    print(f"setting up aiconfigurator=={AIC_VERSION} in {VENV} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = str(VENV / "bin" / "pip")
    with tempfile.TemporaryDirectory() as tmp:
        # look at the dependencies before installing anything
        subprocess.run(
            [pip, "download", "-q", "--no-deps", "-d", tmp, f"aiconfigurator=={AIC_VERSION}",
             f"aiconfigurator-core=={AIC_VERSION}"],
            check=True,
        )  # fmt: skip
        for whl in Path(tmp).glob("*.whl"):
            meta = subprocess.run(
                ["unzip", "-p", str(whl), "*.dist-info/METADATA"], capture_output=True, text=True
            ).stdout
            torch = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: torch")]
            if torch:
                print(f"{whl.name} requires {torch}; pinned to 2.13.0 below", file=sys.stderr)
        cons = Path(tmp) / "constraints.txt"
        cons.write_text("torch==2.13.0\n")
        subprocess.run(
            [pip, "install", "-q", "-c", str(cons), f"aiconfigurator=={AIC_VERSION}"], check=True
        )
    return exe


def model_dir(hf_id: str, root: Path) -> Path:
    """A folder holding the model's config.json, as AIConfigurator wants it offline."""
    d = root / hf_id.split("/")[-1]
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODEL_CONFIGS / (hf_id.replace("/", "--") + "_config.json"), d / "config.json")
    return d


def run_tokenfab(q: Question) -> Answer:
    cmd = [
        *TOKENFAB, "plan", "--model", q.model, "--system", q.tf_system, "--gpus", str(q.gpus),
        "--isl", str(q.isl), "--osl", str(q.osl), "--ttft", str(q.ttft_ms),
        "--tpot", str(q.tpot_ms), "--precision", q.precision, "--backend", "trtllm", "--json",
    ]  # fmt: skip
    res, wall, cpu = timed_run(cmd)
    if res.returncode != 0:
        raise RuntimeError(f"tokenfab plan failed on {q.key}: {res.stderr.strip()}")
    d = json.loads(res.stdout)
    b = d["best"]
    return Answer(
        "tokenfab",
        q.key,
        b["mode"],
        b["describe"],
        b["tokens_per_s_per_gpu"],
        b["tokens_per_s_per_user"],
        b["ttft_ms"],
        b["tpot_ms"],
        wall,
        cpu,
        d["search"]["seconds"],
    )


def _aic_layout(row: dict, mode: str) -> str:
    if mode == "agg":
        n = int(float(row["num_total_gpus"]))
        return f"{row['parallel']} bs{row['bs']} ({n} GPUs/worker)"
    return (
        f"{row['(p)workers']}P[{row['(p)parallel']} bs{row['(p)bs']}] + "
        f"{row['(d)workers']}D[{row['(d)parallel']} bs{row['(d)bs']}]"
    )


def run_aiconfigurator(q: Question, exe: Path, work: Path) -> Answer:
    save = work / f"aic_{q.key}"
    cmd = [
        str(exe), "cli", "default", "--model", str(model_dir(q.model, work / "models")),
        "--system", q.aic_system, "--total-gpus", str(q.gpus), "--isl", str(q.isl),
        "--osl", str(q.osl), "--ttft", str(q.ttft_ms), "--tpot", str(q.tpot_ms),
        "--no-color", "--save-dir", str(save),
    ]  # fmt: skip
    res, wall, cpu = timed_run(cmd)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"aiconfigurator failed on {q.key}: {' | '.join(tail)}")
    best: tuple[float, str, dict] | None = None
    for mode in ("agg", "disagg"):
        for f in save.rglob(f"{mode}/best_config_topn.csv"):
            rows = list(csv.DictReader(f.open()))
            for row in rows[:1]:  # ranked by tokens/s/gpu within the SLA
                v = float(row["tokens/s/gpu_cluster"])
                if best is None or v > best[0]:
                    best = (v, mode, row)
    if best is None:
        raise RuntimeError(f"aiconfigurator found no configuration for {q.key}")
    v, mode, row = best
    return Answer(
        "aiconfigurator",
        q.key,
        mode,
        _aic_layout(row, mode),
        v,
        float(row["tokens/s/user"]),
        float(row["ttft"]),
        float(row["tpot"]),
        wall,
        cpu,
        row=row,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=[q.key for q in QUESTIONS], default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    exe = ensure_aiconfigurator()
    answers: list[Answer] = []
    with tempfile.TemporaryDirectory() as tmp:
        for q in QUESTIONS:
            if args.only and q.key != args.only:
                continue
            tf = run_tokenfab(q)
            aic = run_aiconfigurator(q, exe, Path(tmp))
            answers += [tf, aic]
            if not args.json:
                print(
                    f"\n== {q.model} on {q.gpus} x {q.aic_system}, ISL {q.isl} / OSL {q.osl}, "
                    f"TTFT <= {q.ttft_ms:g} ms, TPOT <= {q.tpot_ms:g} ms, {q.precision}"
                )
                for a in (tf, aic):
                    extra = f" (search {a.search_s:.2f} s)" if a.search_s is not None else ""
                    print(
                        f"  {a.tool:<15} {a.tokens_per_s_per_gpu:>8.0f} tok/s/GPU "
                        f"{a.tokens_per_s_per_user:>6.1f} tok/s/user  TTFT {a.ttft_ms:>7.0f} ms "
                        f"TPOT {a.tpot_ms:>5.1f} ms  wall {a.wall_s:>6.2f} s  "
                        f"CPU {a.cpu_s:>6.2f} s{extra}\n"
                        f"  {'':<15} best: {a.mode} {a.layout}"
                    )
                again = tokenfab_on_aic_layout(q, aic.row or {})
                if again is not None:
                    print(
                        f"  tokenfab's model on aiconfigurator's pick: "
                        f"{again['tokens_per_s_per_gpu']:.0f} tok/s/GPU, "
                        f"{again['tokens_per_s_per_user']:.1f} tok/s/user, TTFT "
                        f"{again['ttft_ms']:.0f} ms, TPOT {again['tpot_ms']:.1f} ms"
                        f"{'' if again['fits'] else ' (does not fit)'}"
                    )
                print(
                    f"  time ratio aiconfigurator / tokenfab: wall {aic.wall_s / tf.wall_s:.1f}x, "
                    f"CPU {aic.cpu_s / tf.cpu_s:.1f}x; "
                    f"throughput ratio tokenfab / aiconfigurator: "
                    f"{tf.tokens_per_s_per_gpu / aic.tokens_per_s_per_gpu:.2f}"
                )
    if args.json:
        print(json.dumps({"answers": [{**asdict(a), "row": None} for a in answers]}))


if __name__ == "__main__":
    main()
