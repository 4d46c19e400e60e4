"""`tokenfab plan --emit DIR`: settings, serve script and Kubernetes manifests that validate."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tokenfab.cli import app

kv = pytest.importorskip("kubernetes_validate", reason="dev extra: kubernetes-validate")
K8S = "1.30.0"


def _emit(tmp_path, *extra: str) -> tuple[dict, list[dict], str]:
    out = tmp_path / "deploy"
    res = CliRunner().invoke(app, ["plan", *extra, "--emit", str(out), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    s = json.loads((out / "deployment.json").read_text())
    docs = list(yaml.safe_load_all((out / "k8s.yaml").read_text()))
    assert s["describe"] == plan["best"]["describe"]
    # the planner's capacity is the same prediction `plan` printed
    assert s["capacity"]["tokens_per_s_per_gpu"] == plan["best"]["tokens_per_s_per_gpu"]
    return s, docs, (out / "serve.sh").read_text()


def _validate_all(docs: list[dict]) -> None:
    for d in docs:
        kv.validate(d, K8S, strict=True)  # raises on a schema violation


def test_aggregated_emit_validates(tmp_path):
    s, docs, sh = _emit(tmp_path, "-m", "meta-llama/Llama-3.1-70B", "-s", "h200", "-n", "8",
                        "--mode", "agg", "--backend", "vllm")  # fmt: skip
    _validate_all(docs)
    (role,) = s["roles"]
    assert role["role"] == "aggregated" and s["engine_backend"] == "vllm"
    assert role["workers"] * role["gpus_per_worker"] == s["gpus_used"] <= 8
    dep = next(
        d for d in docs if d["kind"] == "Deployment" and "aggregated" in d["metadata"]["name"]
    )
    assert dep["spec"]["replicas"] == role["workers"]
    gpus = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpus["nvidia.com/gpu"] == role["gpus_per_worker"]
    assert "--tensor-parallel-size" in role["engine_command"]
    assert sh.count("tokenfab worker") == 1 and f"--max-num-seqs {role['max_num_seqs']}" in sh
    cap = s["capacity"]
    if "ttft_ms_interval" in cap:
        assert cap["ttft_ms_interval"][0] <= cap["ttft_ms"] <= cap["ttft_ms_interval"][1]


def test_disaggregated_multinode_emit_validates(tmp_path):
    s, docs, _ = _emit(tmp_path, "-m", "deepseek-ai/DeepSeek-R1", "-s", "gb200", "-n", "72",
                       "--mode", "disagg", "--backend", "sglang")  # fmt: skip
    _validate_all(docs)
    assert [r["role"] for r in s["roles"]] == ["prefill", "decode"]
    assert sum(r["workers"] * r["gpus_per_worker"] for r in s["roles"]) == s["gpus_used"]
    for r in s["roles"]:
        assert f"--disaggregation-mode {r['role']}" in " ".join(r["engine_command"])
        if r["nodes_per_worker"] > 1:  # a worker across GB200 trays: StatefulSet of its nodes
            sts = next(d for d in docs if d["kind"] == "StatefulSet" and r["role"] in
                       d["metadata"]["name"])  # fmt: skip
            assert sts["spec"]["replicas"] == r["workers"] * r["nodes_per_worker"]


def test_a_broken_manifest_fails_validation():
    # the validator is not vacuous: a Deployment without its selector is rejected
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": 1, "template": {"spec": {"containers": []}}}}  # fmt: skip
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S, strict=True)


def test_emit_into_a_file_is_one_line_error(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    res = CliRunner().invoke(app, ["plan", "-m", "meta-llama/Llama-3.1-8B-Instruct", "-s",
                                   "h100", "-n", "2", "--emit", str(f)])  # fmt: skip
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert err.startswith("error: cannot write") and "\n" not in err
