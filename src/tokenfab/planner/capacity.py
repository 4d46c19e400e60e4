"""How much one worker of each role serves: the planner sizes pools by it.

- On CPU (or any deployment that runs), capacity is measured: `learn` folds in the token
  rates workers actually delivered while they were saturated (a queue was waiting), as a
  running maximum-biased average, starting from given or profiled figures.
- On GPUs, `factory_capacity` asks the factory model (`tokenfab.factory`) for the best layout
  of each role within the latency targets, so a deployment can be planned before it exists;
  it also says which parallelism each pool should use.

The planner core only sees `Capacity` values; the factory is imported inside the function.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Capacity:
    """Tokens per second one worker of a role sustains within the latency targets."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    source: str = "given"
    """given | measured | factory: where the figures come from (logged with decisions)."""
    prefill_layout: str = ""
    decode_layout: str = ""

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.decode_tokens_per_s <= 0:
            raise ValueError(
                "worker capacity must be > 0 tokens/s "
                f"(prefill {self.prefill_tokens_per_s}, decode {self.decode_tokens_per_s})"
            )


LEARN_RATE = 0.3
"""Weight of a new saturated measurement (the rest: what was known)."""


def learn(
    cap: Capacity,
    *,
    prefill_tokens_per_s: float | None = None,
    decode_tokens_per_s: float | None = None,
) -> Capacity:
    """Fold per-worker rates measured while that pool was saturated into the capacity.
    A pool that was not saturated says nothing about its limit: pass None."""
    pre, dec = cap.prefill_tokens_per_s, cap.decode_tokens_per_s
    if prefill_tokens_per_s is not None and prefill_tokens_per_s > 0:
        pre = (1 - LEARN_RATE) * pre + LEARN_RATE * prefill_tokens_per_s
    if decode_tokens_per_s is not None and decode_tokens_per_s > 0:
        dec = (1 - LEARN_RATE) * dec + LEARN_RATE * decode_tokens_per_s
    return replace(cap, prefill_tokens_per_s=pre, decode_tokens_per_s=dec, source="measured")


@dataclass(frozen=True)
class RoleLayout:
    """The factory model's pick for one pool."""

    layout: str
    gpus: int
    tokens_per_s: float
    """Prompt tokens/s (prefill) or output tokens/s (decode) of one worker."""
    latency_ms: float
    """TTFT of one prompt (prefill) or the decode step time at that batch (decode)."""
    batch: int


def _best_prefill(q, layouts, cal) -> RoleLayout | None:
    from tokenfab.factory.perf import prefill_time
    from tokenfab.factory.search import layout_str

    best = None
    for lay in layouts:
        for b in (1, 2, 4, 8, 16):
            t = prefill_time(q.model, q.system, lay, b, q.isl, cal)
            # a batch of b prompts makes the last one wait the whole pass
            if q.ttft_ms is not None and t * 1e3 > q.ttft_ms:
                break
            rate = b * q.isl / t
            if best is None or rate > best.tokens_per_s:
                best = RoleLayout(layout_str(lay), lay.num_gpus, rate, t * 1e3, b)
    return best


def _best_decode(q, layouts, cal) -> RoleLayout | None:
    from tokenfab.factory.perf import decode_step_time, kv_capacity_tokens
    from tokenfab.factory.search import layout_str

    ctx = q.isl + q.osl // 2
    best = None
    for lay in layouts:
        max_b = max(1, kv_capacity_tokens(q.model, q.system, lay, ctx=ctx) // (q.isl + q.osl))
        b = 1
        while b <= min(max_b, 4096):
            t = decode_step_time(q.model, q.system, lay, b, ctx, cal)
            if q.tpot_ms is not None and t * 1e3 > q.tpot_ms:
                break
            if best is None or b / t > best.tokens_per_s:
                best = RoleLayout(layout_str(lay), lay.num_gpus, b / t, t * 1e3, b)
            b *= 2
    return best


def factory_capacity(
    model: str,
    system: str,
    gpus_per_worker: int,
    isl: int,
    osl: int,
    ttft_ms: float,
    itl_ms: float,
    precision: str = "fp8",
) -> tuple[Capacity, RoleLayout, RoleLayout]:
    """Per-worker capacity of `gpus_per_worker`-GPU workers of `model` on `system`, from the
    factory model: for prefill the layout and batch with the most prompt tokens/s whose pass
    fits the TTFT target, for decode the layout and batch with the most output tokens/s whose
    step fits the ITL target. Raises ValueError (one line) when nothing fits."""
    from tokenfab.factory.catalog import get_system
    from tokenfab.factory.modelspec import load_model_spec
    from tokenfab.factory.params import bundled_calibration
    from tokenfab.factory.search import PlanQuery, enumerate_layouts

    q = PlanQuery(
        model=load_model_spec(model),
        system=get_system(system),
        gpus=gpus_per_worker,
        isl=isl,
        osl=osl,
        ttft_ms=ttft_ms,
        tpot_ms=itl_ms,
        precision=precision,
    )
    q.check()
    layouts = [
        lay
        for lay in enumerate_layouts(q.model, q.system, gpus_per_worker, precision)
        if lay.num_gpus == gpus_per_worker and lay.check() is None
    ]
    cal = bundled_calibration(None)
    pre = _best_prefill(q, layouts, cal)
    dec = _best_decode(q, layouts, cal)
    if pre is None or dec is None:
        role = "prefill" if pre is None else "decode"
        raise ValueError(
            f"no {gpus_per_worker}-GPU {role} layout of {model} on {system} meets "
            f"TTFT {ttft_ms} ms / ITL {itl_ms} ms at {isl}/{osl} tokens"
        )
    cap = Capacity(
        prefill_tokens_per_s=pre.tokens_per_s,
        decode_tokens_per_s=dec.tokens_per_s,
        source="factory",
        prefill_layout=pre.layout,
        decode_layout=dec.layout,
    )
    return cap, pre, dec
