"""Small C libraries compiled with the system compiler at first use and loaded with ctypes.

A library is built into <user cache dir>/tokenfab/native/<key>/<name>.so, the key covering the
source, the flags and (for -march=native builds) the CPU's feature flags, so a cache copied to
another machine is rebuilt rather than trusted. Builds write to a temporary file and rename it,
so concurrent builders never load a partial library. Callers keep a pure-Python path for
machines without a compiler: `load_library` returns None there.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(source: str, flags: list[str], out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / (out.stem + ".c")
        src.write_text(source)
        lib = Path(tmp) / out.name
        subprocess.run(
            [cc, *flags, str(src), "-o", str(lib), "-lm"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(lib, out)  # atomic: concurrent builders never see a partial file


def load_library(name: str, source: str, flags: list[str]) -> ctypes.CDLL | None:
    """Build (once per source, flags and CPU) and load a shared library, or None where it
    cannot be built or loaded, or when TOKENFAB_NO_NATIVE=1."""
    if os.environ.get("TOKENFAB_NO_NATIVE") == "1":
        return None
    from platformdirs import user_cache_dir

    machine = cpu_flags() if any(f.startswith("-march=native") for f in flags) else ""
    key = hashlib.sha256(
        (source + " ".join(flags) + machine + platform.machine()).encode()
    ).hexdigest()[:16]
    base = os.environ.get("TOKENFAB_CACHE_DIR") or user_cache_dir("tokenfab")
    path = Path(base) / "native" / key / f"{name}.so"
    with _lock:
        try:
            if not path.is_file():
                _build(source, flags, path)
            return ctypes.CDLL(str(path))
        except (OSError, RuntimeError, subprocess.SubprocessError):
            return None
