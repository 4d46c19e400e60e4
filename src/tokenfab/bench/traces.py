"""Parse request traces: Mooncake jsonl and Azure LLM inference csv.

Bundled heads of both (see `data/SOURCES.md`) are addressable by short names.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

BUNDLED = {
    "mooncake": "mooncake_conversation_1000.jsonl",
    "azure-conv": "azure_conv_1000.csv",
    "azure-code": "azure_code_1000.csv",
}


@dataclass(frozen=True)
class TraceRow:
    timestamp_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def resolve_trace(name_or_path: str) -> Path:
    """A bundled trace by short name, or a file path."""
    if name_or_path in BUNDLED:
        return Path(str(resources.files("tokenfab.bench") / "data" / BUNDLED[name_or_path]))
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(BUNDLED)
        raise ValueError(f"trace {name_or_path!r} is neither a file nor a bundled trace ({names})")
    return path


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    raise ValueError(f"cannot tell the trace format of {path.name}; pass --trace-format")


def load_trace(path: Path, fmt: str = "auto") -> list[TraceRow]:
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "mooncake":
        return load_mooncake(path)
    if fmt == "azure":
        return load_azure(path)
    raise ValueError(f"unknown trace format {fmt!r} (mooncake, azure)")


def load_mooncake(path: Path) -> list[TraceRow]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rows.append(
                    TraceRow(
                        timestamp_s=float(d["timestamp"]) / 1000.0,
                        input_len=int(d["input_length"]),
                        output_len=int(d["output_length"]),
                        hash_ids=tuple(int(h) for h in d.get("hash_ids", ())),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path.name}:{lineno}: not a Mooncake trace row ({e})") from e
    return rows


def _parse_time(text: str) -> float:
    # Azure timestamps carry 7 fractional digits; datetime takes at most 6.
    head, _, frac = text.strip().partition(".")
    stamp = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return stamp + (float("0." + frac) if frac else 0.0)


def load_azure(path: Path) -> list[TraceRow]:
    rows = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        for lineno, d in enumerate(reader, 2):
            try:
                rows.append(
                    TraceRow(
                        timestamp_s=_parse_time(d["TIMESTAMP"]),
                        input_len=int(d["ContextTokens"]),
                        output_len=int(d["GeneratedTokens"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path.name}:{lineno}: not an Azure trace row ({e})") from e
    rows.sort(key=lambda r: r.timestamp_s)
    return rows
