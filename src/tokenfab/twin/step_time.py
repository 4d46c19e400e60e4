"""Step-time models: how long one engine step of a given batch takes.

`LinearStepTime` is the shape both sources fit: a fixed cost per step, a cost per prefill
token, per decoding sequence, and per token of context the step's attention reads. A CPU
profile (fitted from real engine steps) or a GPU's roofline numbers fill in the coefficients.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenfab.engine.core.batch import StepBatch


@dataclass(frozen=True, slots=True)
class LinearStepTime:
    base_s: float = 0.004
    per_prefill_token_s: float = 0.0002
    per_decode_seq_s: float = 0.0005
    per_context_token_s: float = 0.0
    """Attention: seconds per cached token a chunk attends to."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def seconds(self, batch: StepBatch) -> float:
        prefill = decode = context = 0
        for c in batch.chunks:
            n = len(c.token_ids)
            if n == 1:
                decode += 1
            else:
                prefill += n
            context += c.start_pos
        return (
            self.base_s
            + prefill * self.per_prefill_token_s
            + decode * self.per_decode_seq_s
            + context * self.per_context_token_s
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LinearStepTime:
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read a step-time profile from {path}: {e}") from None
