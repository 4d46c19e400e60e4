"""Wiring of a deployment: starts the runtime, workers, router and frontend in one process or
many (`tokenfab serve`, `worker`, `frontend`, `router`), and supervises engine processes."""
