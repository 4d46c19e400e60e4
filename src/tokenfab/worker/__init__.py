"""Workers: bind an engine to the runtime in a role (aggregated for now)."""

from tokenfab.worker.aggregated import AggregatedWorker, load_report
from tokenfab.worker.kv_events import KVEventForwarder

__all__ = ["AggregatedWorker", "KVEventForwarder", "load_report"]
