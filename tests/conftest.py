import logging
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("transformers").setLevel(logging.ERROR)


def pytest_configure(config):
    from runtime.platforms import current_platform

    current_platform.configure_process()


@pytest.fixture(scope="session")
def smollm2_path():
    from models.default import DefaultModelMissing, default_model_path

    try:
        return default_model_path()
    except DefaultModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """Our SmolLM2 in fp32 on CPU (loaded once per session: GGUF dequantisation takes seconds)."""
    from models.loader import load_model

    return load_model(smollm2_path, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer()
