"""The server under test, as the runner describes it in the environment."""

from __future__ import annotations

import os
from functools import cache


def url() -> str:
    return os.environ["TOKENFAB_PEER_URL"]


def model() -> str:
    return os.environ["TOKENFAB_PEER_MODEL"]


@cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.environ["TOKENFAB_PEER_TOKENIZER"])
