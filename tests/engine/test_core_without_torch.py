"""The engine core (and the twin built on it) must run where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys

_BLOCK_TORCH = """
import importlib.abc
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test (imported: {name})")
        return None


sys.meta_path.insert(0, NoTorch())
"""


def _run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_blocks_torch() -> None:
    done = _run_without_torch("import torch")
    assert done.returncode != 0 and "torch is blocked" in done.stderr


def test_engine_core_imports_and_steps_without_torch() -> None:
    code = """
import tokenfab.engine.core.batch, tokenfab.engine.core.detokenizer, tokenfab.engine.core.runner
import tokenfab.twin.sim, tokenfab.twin.report, tokenfab.twin.fast_decode
from tokenfab.clock import ManualClock
from tokenfab.engine.core.batch import SampledToken, StepResult
from tokenfab.engine.core.scheduler import SchedulerConfig
from tokenfab.engine.core.step import EngineCore
from tokenfab.protocol import GenerateRequest, SamplingParams


class CountingRunner:
    block_size, num_blocks = 4, 64

    def validate(self, params): pass
    def add(self, seq): pass
    def drop(self, seq): pass

    def execute(self, sched):
        return StepResult(
            tokens=[SampledToken(s.seq, 7) for s in sched.scheduled if s.sample], seconds=0.01
        )


core = EngineCore(
    CountingRunner(), vocab_size=100, eos_token_ids=[0], max_model_len=256,
    scheduler_config=SchedulerConfig(max_num_batched_tokens=16), clock=ManualClock(),
)
core.add_request(GenerateRequest(
    request_id="r", prompt_token_ids=list(range(1, 30)), sampling=SamplingParams(max_tokens=3)
))
outs = []
for _ in range(20):
    outs += core.step()
    if not core.has_unfinished():
        break
assert [t for o in outs for t in o.token_ids] == [7, 7, 7], outs
assert outs[-1].finish_reason == "length"
assert core.kv.num_used_blocks == 0
assert "torch" not in sys.modules
print("ok")
"""
    done = _run_without_torch(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
