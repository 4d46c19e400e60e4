"""Read rows of a measured-serving CSV (the format of `data/measured_serving.csv`) into cases
the serving model can predict.

How the columns map (studied on the bundled file):
- a worker is `tp * pp * attention_dp` GPUs; MoE layers spread over the same GPUs as
  `moe_tp x moe_ep` (missing/0 values are derived from the others);
- aggregated: `batch_size` is per attention-DP rank, so a worker's concurrency is
  `batch_size * attention_dp` (the run may use several identical replicas);
- disaggregated: `decode_batch_size` is per attention-DP rank of one decode worker,
  `prefill_batch_size` prompts per prefill pass per attention-DP rank, `*_num_workers` the
  pool sizes;
  concurrency = decode workers x decode batch x attention_dp. Rows without worker counts
  give the run's concurrency only (`silicon_concurrency=` in `silicon_data_source`); their
  pools are left at 0 workers and sized as a deployer would (`serving.size_disagg_pools`).
- physically inconsistent layout columns get the reading the physics supports (a rule, not
  a row list): a `tp_size` that does not divide the attention heads (wide GB200 rows, TP 12-72
  with MoE-TP equal to it) is the GPU count of an attention-DP + EP worker; a `tp_size` or
  `attention_dp_size` beyond the NVLink domain that equals `moe_tp x moe_ep` is that product
  (the ids say e.g. tp8_ep8): a worker of `ep` GPUs. The concurrency then comes from
  `silicon_concurrency=`.
- precision: `gemm_quant_mode`/`moe_quant_mode` (nvfp4, fp8, fp8_block, int4_wo) refine
  `precision`; an empty precision means the checkpoint's bf16 weights. The KV-cache dtype
  is not in the file: each backend's default is assumed (`_kv_precision`).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tokenfab.factory.catalog import System, get_system
from tokenfab.factory.modelspec import ModelSpec, load_model_spec
from tokenfab.factory.perf import Layout
from tokenfab.factory.serving import AggDeployment, DisaggDeployment

_CONC = re.compile(r"silicon_concurrency=(\d+)")
_QUANT = {"nvfp4": "fp4", "fp4": "fp4", "mxfp4": "fp4", "w4a4": "fp4"}
_QUANT.update({"fp8": "fp8", "fp8_block": "fp8", "fp8_static": "fp8", "w8a8": "fp8"})
_QUANT.update({"int8": "fp8", "int8_wo": "fp8", "w8a16": "fp8", "sq": "fp8"})  # 1-byte weights
_QUANT.update({"int4_wo": "int4", "int4": "int4", "w4a16": "int4", "w4a8": "int4"})
_QUANT.update({"awq": "int4", "gptq": "int4", "int4_awq": "int4", "w4a8_awq": "int4"})
_QUANT.update({"bf16": "bf16", "fp16": "bf16", "float16": "bf16", "bfloat16": "bf16"})


def _quant(name: str, default: str) -> str:
    """Map a quant-mode string to a modeled precision; unknown names keep `default`, and an
    unknown default falls back to bf16 (the checkpoint dtype)."""
    q = _QUANT.get(name.strip().lower()) if name else None
    if q is None:
        q = _QUANT.get(default, default)
    return q if q in ("bf16", "fp8", "fp4", "int4") else "bf16"


@dataclass(frozen=True)
class Case:
    """One measured row, resolved."""

    row_id: str
    model: ModelSpec
    system: System
    backend: str
    deployment: AggDeployment | DisaggDeployment
    ttft_ms: float | None
    tpot_ms: float | None
    pools_known: bool = True  # False: disaggregated pool sizes were inferred
    version: str = ""  # backend version (measurements of one deployment share it)


def _int(v: str | None, default: int = 0) -> int:
    try:
        return int(float(v)) if v not in (None, "") else default
    except ValueError:
        return default


def _float(v: str | None) -> float | None:
    try:
        x = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return x if x is not None and 0 < x < math.inf else None


def _precisions(row: dict) -> tuple[str, str | None]:
    base = _quant(row.get("precision") or "", "bf16")
    gemm = _quant(row.get("gemm_quant_mode") or "", base)
    moe = _quant(row.get("moe_quant_mode") or "", gemm)
    if gemm == "int4":  # weight-only int4 applies to the experts; attention stays bf16
        gemm = "bf16"
    return gemm, (moe if moe != gemm else None)


def _kv_precision(backend: str, gemm: str, moe: str | None) -> str:
    """TensorRT-LLM quantizes the KV cache with fp8/fp4 checkpoints; vLLM and SGLang keep
    the default 'auto' KV dtype (bf16) unless told otherwise."""
    quantized = gemm in ("fp8", "fp4") or moe in ("fp8", "fp4")
    return "fp8" if backend == "trtllm" and quantized else "bf16"


def _wide_worker(model: ModelSpec, tp: int, dp: int, mtp: int, ep: int) -> bool:
    """A `tp_size` that cannot be a tensor-parallel degree (it does not divide the attention
    heads) with MoE-TP equal to it and no EP or attention DP is physically inconsistent: such
    rows (wide GB200 deployments) give the worker's GPU count. The layout that runs a model
    on that many GPUs is attention data-parallel with experts spread by EP (wide-EP)."""
    return (
        tp > 1
        and dp == 1
        and model.num_experts > 0
        and model.num_heads % tp != 0
        and mtp in (0, tp)
        and ep in (0, 1)
    )


def _tp_times_ep(system: System, tp: int, dp: int, mtp: int, ep: int) -> bool:
    """A tensor-parallel group larger than the NVLink domain is not deployed by these
    engines; when such a `tp_size` equals `moe_tp x moe_ep` it is the product of the
    worker's TP and EP (the row's id names e.g. tp8_ep8 for tp_size 64, moe 8 x 8)."""
    return tp > system.scaleup_size and dp == 1 and ep > 1 and mtp > 1 and mtp * ep == tp


def _dp_times_ep(system: System, tp: int, dp: int, mtp: int, ep: int) -> bool:
    """The same mislabel in the attention-DP column: DP beyond the NVLink domain equal to
    `moe_tp x moe_ep` (ids name e.g. tp8_ep8 for attention_dp 64, moe 8 x 8) is a worker of
    `ep` GPUs, attention data-parallel, experts by EP."""
    return dp > system.scaleup_size and tp == 1 and ep > 1 and mtp > 1 and mtp * ep == dp


def _layout(
    row: dict, prefix: str, gemm: str, moe: str | None, model: ModelSpec, system: System
) -> Layout:
    tp = max(_int(row.get(prefix + "tp_size"), 1), 1)
    pp = max(_int(row.get(prefix + "pp_size"), 1), 1)
    dp = max(_int(row.get(prefix + "attention_dp_size"), 1), 1)
    ep = _int(row.get(prefix + "moe_ep_size"), 0)
    mtp = _int(row.get(prefix + "moe_tp_size"), 0)
    if _wide_worker(model, tp, dp, mtp, ep):
        tp, dp, mtp, ep = 1, tp, 1, tp
    elif _tp_times_ep(system, tp, dp, mtp, ep):
        tp, mtp = tp // ep, 1
    elif _dp_times_ep(system, tp, dp, mtp, ep):
        dp, mtp = dp // mtp, 1
    g = tp * dp
    if ep <= 0 and mtp <= 0:
        ep, mtp = 1, g
    elif ep <= 0:
        ep = max(g // mtp, 1)
    elif mtp <= 0:
        mtp = max(g // ep, 1)
    if mtp * ep > g:  # inconsistent row: keep EP, fit TP into the group
        mtp = max(g // ep, 1)
        ep = min(ep, g)
    kv = _kv_precision((row.get("backend") or "").strip().lower(), gemm, moe)
    return Layout(
        tp=tp,
        pp=pp,
        ep=ep,
        attn_dp=dp,
        moe_tp=mtp,
        precision=gemm,
        moe_precision=moe,
        kv_precision=kv,
    )


def concurrency_of(row: dict) -> int | None:
    m = _CONC.search(row.get("silicon_data_source") or "")
    return int(m.group(1)) if m else None


def case_from_row(row: dict) -> Case:
    """Resolve a row; raises ValueError/KeyError with the reason when it cannot be computed."""
    model = load_model_spec(row["model_path"])
    system = get_system(row["system"])
    isl, osl = _int(row.get("isl")), _int(row.get("osl"))
    if isl <= 0 or osl <= 0:
        raise ValueError("isl/osl missing")
    gemm, moe = _precisions(row)
    mode = (row.get("mode") or "agg").strip().lower()
    conc = concurrency_of(row)
    known = True
    if mode == "agg":
        lay = _layout(row, "", gemm, moe, model, system)
        b = _int(row.get("batch_size"), 0)
        dp_col = max(_int(row.get("attention_dp_size"), 1), 1)
        c = b * lay.attn_dp if b > 0 else (conc or 1)
        if lay.attn_dp != dp_col:  # reinterpreted layout: the batch column counts per dp_col
            c = conc or max(b * dp_col, 1)
        dep: AggDeployment | DisaggDeployment = AggDeployment(lay, max(c, 1), isl, osl)
    else:
        pl = _layout(row, "prefill_", gemm, moe, model, system)
        dl = _layout(row, "decode_", gemm, moe, model, system)
        bd = _int(row.get("decode_batch_size"), 0)
        dw = _int(row.get("decode_num_workers"), 0)
        pw = _int(row.get("prefill_num_workers"), 0)
        pb = max(_int(row.get("prefill_batch_size"), 1), 1) * pl.attn_dp
        if bd > 0 and dw > 0 and pw > 0:
            c = conc or bd * dl.attn_dp * dw
            dep = DisaggDeployment(pl, pw, pb, dl, dw, bd * dl.attn_dp, isl, osl, concurrency=c)
        else:
            known = False
            c = conc or (bd * dl.attn_dp * max(dw, 1) if bd else 1)
            # pools sized at prediction time (serving.size_disagg_pools)
            dep = DisaggDeployment(pl, 0, pb, dl, 0, 0, isl, osl, concurrency=c)
    return Case(
        row_id=row.get("id", ""),
        model=model,
        system=system,
        backend=(row.get("backend") or "").strip().lower(),
        deployment=dep,
        ttft_ms=_float(row.get("silicon_ttft_ms")),
        tpot_ms=_float(row.get("silicon_tpot_ms")),
        pools_known=known,
        version=(row.get("backend_version") or "").strip(),
    )


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_cases(path: Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """All computable rows as cases, and (row id, reason) for the rows that are not."""
    cases, skipped = [], []
    for i, row in enumerate(read_rows(path)):
        try:
            cases.append(case_from_row(row))
        except (KeyError, ValueError) as e:
            skipped.append((row.get("id") or f"row {i + 1}", str(e).strip("'\"")))
    return cases, skipped


# ---- de-duplication -----------------------------------------------------------------------

# parts of `silicon_data_source` that identify the measurement itself, not the export that
# carried it (database dumps and daily CSV files each give a row their own id and config id)
_MEASURED = re.compile(r"measured=([^;]+)")


def measurement_key(row: dict) -> tuple:
    """What makes two rows the same measurement: every configuration column, the run's
    concurrency and measurement day, and the measured TTFT/TPOT to the last digit. The id
    and the rest of `silicon_data_source` (export batch, config id) are left out: the same
    run exported twice differs only there."""
    src = row.get("silicon_data_source") or ""
    date = _MEASURED.search(src)
    cols = tuple(sorted((k, v) for k, v in row.items() if k not in ("id", "silicon_data_source")))
    # exports write the date as a day or as a timestamp: the day is what they share
    return (cols, concurrency_of(row), date.group(1).strip()[:10] if date else "")


def dedupe_rows(rows: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rows with each measurement once (the first occurrence kept), and (dropped id, kept id)
    for every duplicate."""
    first: dict[tuple, str] = {}
    kept, dropped = [], []
    for row in rows:
        k = measurement_key(row)
        if k in first:
            dropped.append((row.get("id", ""), first[k]))
            continue
        first[k] = row.get("id", "")
        kept.append(row)
    return kept, dropped


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenfab.factory.measured dedupe FILE`: rewrite FILE without duplicate
    measurements, printing each dropped id next to the id kept."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "dedupe":
        raise SystemExit("usage: python -m tokenfab.factory.measured dedupe FILE")
    path = Path(args[1])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fieldnames, rows = reader.fieldnames or [], list(reader)
    kept, dropped = dedupe_rows(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, lineterminator="\r\n")
        w.writeheader()
        w.writerows(kept)
    for d, k in dropped:
        print(f"dropped {d} (same measurement as {k})")
    print(f"{path}: {len(rows)} rows -> {len(kept)}")


if __name__ == "__main__":
    main()
