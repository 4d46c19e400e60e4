"""The model side of the engine: the model, attention, CPU and Triton kernels, CUDA graphs,
the loader and `ModelRunner` (a `StepBatch` in, logits out). Everything here needs torch."""
