"""Only what vLLM's OpenAI-server tests import from the `vllm` package (see ../README.md)."""
