"""Engine tools: GGUF conversion, tiny test models, the step benchmark and the `tokenfab engine`
CLI."""
