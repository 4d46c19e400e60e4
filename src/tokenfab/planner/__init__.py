"""The planner: moves workers between the prefill and decode pools as traffic shifts.

`core.tick` is the whole decision (pure: observations, state and time in; state and
decisions out); `observe`, `forecast` and `capacity` feed it; `service` is the process that
gathers inputs on the runtime and applies the decisions.
"""

from tokenfab.planner.capacity import Capacity, factory_capacity, learn
from tokenfab.planner.core import (
    Decision,
    Inputs,
    PlannerConfig,
    PlannerState,
    initial_state,
    tick,
)
from tokenfab.planner.forecast import DEFAULT_FORECASTER, Ewma, Holt
from tokenfab.planner.observe import Observation, WorkerView, reduce_reports

__all__ = [
    "DEFAULT_FORECASTER",
    "Capacity",
    "Decision",
    "Ewma",
    "Holt",
    "Inputs",
    "Observation",
    "PlannerConfig",
    "PlannerState",
    "WorkerView",
    "factory_capacity",
    "initial_state",
    "learn",
    "reduce_reports",
    "tick",
]
