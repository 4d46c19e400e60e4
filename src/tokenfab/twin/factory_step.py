"""Step times of a GPU worker from the factory model (`tokenfab.factory.perf`).

`FactoryStepTime` is a `LinearStepTime` (same interface: `seconds(batch)` and the four
coefficients) whose `seconds` asks the factory's roofline model for the exact batch the
scheduler built: every chunk's tokens through the GEMMs, its attention over the context it
reads, the prefill overheads when the step carries prompt tokens. The coefficients are a
linear fit of that model at typical points (finite differences, see `_fit`): what the models
that need a closed form use (the fleet model's step times, fast-decode runs).

The factory is imported here only: the twin's core and the engine core stay free of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenfab.engine.core.batch import StepBatch
from tokenfab.factory.catalog import System, get_system
from tokenfab.factory.modelspec import ModelSpec, load_model_spec
from tokenfab.factory.params import bundled_calibration, bundled_raw
from tokenfab.factory.perf import (
    BYTES,
    Calibration,
    Layout,
    StepWork,
    _core_flops_per_key,
    _keys_full,
    decode_step_time,
    kv_capacity_tokens,
    prefill_time,
    step_time,
)
from tokenfab.twin.step_time import LinearStepTime

FIT_CONTEXT = 2048
"""Context (tokens per sequence) at which the per-context-token coefficient is fitted."""
FIT_BATCH = 64
"""Decode batch at which the per-sequence coefficient is fitted."""
FIT_PREFILL = 2048
"""Prompt tokens at which the per-prefill-token coefficient is fitted (one step's budget)."""


@dataclass(frozen=True, slots=True)
class FactoryStepTime(LinearStepTime):
    """One worker of `layout` (tp x pp x attn_dp GPUs) on `system` serving `model`."""

    model: ModelSpec | None = field(default=None, compare=False)
    system: System | None = field(default=None, compare=False)
    layout: Layout = field(default_factory=Layout)
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        # LinearStepTime's check walks every field; here only the coefficients are numbers.
        for name in ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @classmethod
    def build(
        cls,
        model: str,
        system: str,
        tp: int = 1,
        precision: str = "fp8",
        backend: str | None = None,
    ) -> FactoryStepTime:
        """By names as the factory knows them; ValueError (one line) for an unknown GPU or
        model, or a layout the factory rejects."""
        try:
            spec = load_model_spec(model)
            gpu = get_system(system)
        except KeyError as e:
            raise ValueError(str(e.args[0]) if e.args else str(e)) from None
        layout = Layout(tp=tp, precision=precision)
        why = layout.check()
        if why is not None:
            raise ValueError(f"layout tp={tp} {precision}: {why}")
        known = sorted(bundled_raw().get("backends", {}))
        if backend is not None and backend not in known:
            raise ValueError(f"unknown backend {backend!r}; calibrated: {', '.join(known)}")
        cal = bundled_calibration(backend)
        base, per_pre, per_seq, per_ctx = _fit(spec, gpu, layout, cal)
        return cls(
            base_s=base,
            per_prefill_token_s=per_pre,
            per_decode_seq_s=per_seq,
            per_context_token_s=per_ctx,
            model=spec,
            system=gpu,
            layout=layout,
            calibration=cal,
        )

    @property
    def num_gpus(self) -> int:
        return self.layout.num_gpus

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks one worker holds (the factory's free HBM after weights); 0: the weights
        do not fit."""
        assert self.model is not None and self.system is not None
        return kv_capacity_tokens(self.model, self.system, self.layout) // block_size

    def kv_bytes_per_token(self) -> float:
        """KV bytes one prompt token stores over all layers (what a disaggregated handoff
        moves), at the layout's KV precision."""
        assert self.model is not None
        return self.model.kv_bytes_per_token(BYTES[self.layout.kv_dtype])

    def link_bytes_per_s(self) -> float:
        """The KV handoff link of one worker (bytes/s): the system's scale-out NIC per GPU,
        over the GPUs a prompt's KV is split across (the factory's `kv_transfer_time`: GQA
        KV over up to the KV-head count of TP ranks, MLA latents whole on each rank)."""
        assert self.model is not None and self.system is not None
        m = self.model
        lanes = 1 if m.attention == "mla" else min(self.layout.tp, m.num_kv_heads)
        return self.system.scaleout_gbps * 1e9 * lanes * self.layout.pp

    def seconds(self, batch: StepBatch) -> float:
        m = self.model
        assert m is not None and self.system is not None
        per_key_bytes = m.kv_elems_per_token_layer() * BYTES[self.layout.kv_dtype]
        # Keys a query attends: its context, unless sliding windows or sparse top-k cap it.
        plain = not m.sparse_topk and not (m.n_sliding_attn and m.sliding_window)
        tokens = seqs = 0
        dec_keys = pre_keys = read_keys = 0.0
        prefill = False
        for c in batch.chunks:
            n, s = len(c.token_ids), c.start_pos
            tokens += n
            seqs += c.sample
            ks = s if plain else _keys_full(m, s)
            read_keys += ks  # the cached context is read once per chunk
            if n == 1:
                dec_keys += ks
            else:
                prefill = True
                # causal: the chunk's queries see the cached context plus half the chunk
                pre_keys += n * (s + n / 2.0 if plain else _keys_full(m, s + n / 2.0))
        flops = _core_flops_per_key(m, True) * dec_keys + _core_flops_per_key(m, False) * pre_keys
        kv_bytes = read_keys * per_key_bytes
        if tokens == 0:
            return 0.0
        work = StepWork(
            tokens=tokens,
            seqs=max(seqs, 1),
            attn_flops=flops,
            kv_bytes=kv_bytes,
            prefill=prefill,
        )
        return step_time(m, self.system, self.layout, work, self.calibration)


def _fit(
    m: ModelSpec, system: System, lay: Layout, cal: Calibration
) -> tuple[float, float, float, float]:
    """(base, per prefill token, per decoding sequence, per context token) seconds: decode
    steps at 1 and FIT_BATCH sequences without context give base and per-sequence; adding
    FIT_CONTEXT tokens of context to every sequence gives per-context-token; one prefill of
    FIT_PREFILL tokens, less the base, per token (its fixed prefill overheads spread over a
    step's budget)."""

    def dec(b: int, ctx: int) -> float:
        return decode_step_time(m, system, lay, b, ctx, cal)

    d1, db = dec(1, 0), dec(FIT_BATCH, 0)
    per_seq = max(0.0, (db - d1) / (FIT_BATCH - 1))
    base = max(0.0, d1 - per_seq)
    per_ctx = max(0.0, (dec(FIT_BATCH, FIT_CONTEXT) - db) / (FIT_BATCH * FIT_CONTEXT))
    pre = prefill_time(m, system, lay, 1, FIT_PREFILL, cal)
    per_pre = max(0.0, (pre - base) / FIT_PREFILL)
    assert all(math.isfinite(x) for x in (base, per_pre, per_seq, per_ctx))
    return base, per_pre, per_seq, per_ctx
