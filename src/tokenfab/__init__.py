"""tokenfab: an operating system for AI factories."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from tokenfab.engine.llm import LLM
    from tokenfab.protocol import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy so that `import tokenfab` (and the CLI's startup) does not pay for torch.
    if name == "LLM":
        from tokenfab.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tokenfab.protocol import SamplingParams

        return SamplingParams
    raise AttributeError(name)
