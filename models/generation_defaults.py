"""Default sampling settings a checkpoint recommends (its ``generation_config.json``), as vLLM's
``--generation-config auto`` reads them.

Only the fields a request can also set are taken, and only where the file sets them: a request's own
value always wins, and a field the file leaves out keeps the library default (``SamplingParams``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from models.checkpoint import Checkpoint, CheckpointError

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
# generation_config.json field -> SamplingParams field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# What the embedded SmolLM2 (a GGUF file, which carries no generation config) is meant to sample with:
# the settings of its model card's example.
SMOLLM2_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def read_generation_defaults(source: str, checkpoint: Checkpoint | None,
                             embedded_default: bool = False) -> dict[str, Any]:
    """Sampling defaults as ``SamplingParams`` keyword arguments.

    ``source``: "auto" (the checkpoint's file; the embedded SmolLM2's recommended settings), "vllm"
    (none: the library defaults, as vLLM's value of that name), or a directory holding a
    generation_config.json."""
    if source == "vllm":
        return {}
    if source != "auto":
        path = os.path.join(os.path.expanduser(source), GENERATION_CONFIG_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"generation_config={source!r}: expected 'auto', 'vllm' or a directory "
                                  f"with {GENERATION_CONFIG_FILE}; {path} does not exist")
        return _read(path)
    if embedded_default:
        return dict(SMOLLM2_DEFAULTS)
    if checkpoint is None:
        return {}
    path = os.path.join(checkpoint.directory, GENERATION_CONFIG_FILE)
    return _read(path) if os.path.isfile(path) else {}


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the generation config ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the generation config is not a JSON object")
    defaults = {ours: data[theirs] for theirs, ours in _FIELDS.items() if data.get(theirs) is not None}
    if defaults:
        logger.info("default sampling from %s: %s (a request's own values win)", path,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults
