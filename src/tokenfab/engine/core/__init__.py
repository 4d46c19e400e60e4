"""The engine without a model: sequences, the paged KV cache's bookkeeping, the scheduler, the
batch types and the step loop. Pure Python: no torch and no wall-clock reads (time comes from
an injected Clock), so the twin runs this very code under a virtual clock with a `SimRunner`
in place of the model (`tests/engine/test_core_without_torch.py` keeps it so)."""
