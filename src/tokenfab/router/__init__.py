"""The KV-aware router's decision core: which worker holds which cached blocks (`KVIndex`), how
to score workers for a request (`scoring`), and the state machine the frontend drives
(`Router`)."""

from tokenfab.router.index import FIRST_EVENT_ID, KVIndex
from tokenfab.router.router import (
    NoWorkerError,
    Policy,
    RouteDecision,
    Router,
    RouterConfig,
    RouterStats,
)
from tokenfab.router.scoring import ScoreDecision, WorkerLoad, WorkerScore, choose

__all__ = [
    "FIRST_EVENT_ID",
    "KVIndex",
    "NoWorkerError",
    "Policy",
    "RouteDecision",
    "Router",
    "RouterConfig",
    "RouterStats",
    "ScoreDecision",
    "WorkerLoad",
    "WorkerScore",
    "choose",
]
