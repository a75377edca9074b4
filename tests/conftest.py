import logging
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No default compile cache in tests (a hit would change what they count); tests of the cache name a directory.
os.environ["GRAPHMODE_CACHE_ROOT"] = ""
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _restore_our_log_levels():
    """A command-line main run in-process (``bench.main([... "--log-level", "ERROR"])``) sets our packages'
    logger levels (runtime/logger.py); later tests' caplog must still see their INFO lines."""
    from runtime.logger import PACKAGES

    levels = {name: logging.getLogger(name).level for name in PACKAGES}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def pytest_configure(config):
    from runtime.platforms import current_platform

    current_platform.configure_process()


def _memoize_by_file(fn, copy_result):
    """``fn(path, ...)`` computed once per (file, size, mtime, other args); each caller gets
    ``copy_result`` of the stored result, so no test sees what another one changed."""
    import functools

    results = {}

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, args,
               tuple(sorted((k, v) for k, v in kwargs.items() if k != "model_to_load")))
        if key not in results:
            results[key] = fn(path, *args, **kwargs)
        return copy_result(results[key])

    return wrapper


def _copy_gguf_checkpoint(result):
    import copy

    # The tensors are shared (the loader only reads them); everything else is copied.
    return {k: (dict(v) if k == "tensors" else copy.deepcopy(v)) for k, v in result.items()}


@pytest.fixture(scope="session", autouse=True)
def _read_each_gguf_once():
    """Parsing and dequantising SmolLM2's GGUF takes ~20 s of the 2-core CI machine per model load
    (config, weights, tokenizer), and the suite loads it in many tests of one process: transformers'
    GGUF readers are memoized per file for the session. Where a transformers release names them
    differently, nothing is patched and the tests only run slower."""
    import copy
    import importlib

    patch = pytest.MonkeyPatch()
    for module_name, name, copy_result in (
            ("transformers.modeling_gguf_pytorch_utils", "load_gguf_checkpoint", _copy_gguf_checkpoint),
            ("transformers.integrations.gguf", "get_gguf_tokenizer", copy.deepcopy)):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            patch.setattr(module, name, _memoize_by_file(getattr(module, name), copy_result))
    yield
    patch.undo()


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
