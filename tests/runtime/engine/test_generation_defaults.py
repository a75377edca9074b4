"""Default sampling comes from the checkpoint's generation_config.json (vLLM's ``--generation-config auto``):
offline, through the server's preprocessing, and for the embedded SmolLM2, which ships none."""
import json
from types import SimpleNamespace

import pytest

from models.checkpoint import CheckpointError
from models.generation_defaults import SMOLLM2_DEFAULTS
from models.testing import write_tiny_checkpoint
from runtime import LLM, SamplingParams

ENGINE = dict(max_num_seqs=2, max_num_batched_tokens=64, num_kv_blocks=16, max_model_len=128)
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.3, "top_k": 7, "top_p": 0.8, "max_new_tokens": 5,
                     "bos_token_id": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("gen") / "llama"))
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump(GENERATION_CONFIG, f)
    return path


def test_the_checkpoint_generation_config_sets_the_defaults(checkpoint):
    llm = LLM(checkpoint, **ENGINE)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.3, 7, 0.8, 5)
    assert params.min_p == SamplingParams().min_p  # what the file leaves out keeps the library default
    # generate() without SamplingParams uses them: max_new_tokens=5 bounds the completion.
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) <= 5


def test_vllm_keeps_the_library_defaults_and_a_directory_is_read(checkpoint, tmp_path):
    assert LLM(checkpoint, generation_config="vllm", **ENGINE).get_default_sampling_params() == SamplingParams()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "repetition_penalty": 1.2}))
    params = LLM(checkpoint, generation_config=str(tmp_path), **ENGINE).get_default_sampling_params()
    assert (params.temperature, params.repetition_penalty, params.top_k) == (0.0, 1.2, 0)


def test_a_bad_generation_config_fails_at_start_up_naming_it(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="expected 'auto', 'vllm' or a directory"):
        LLM(checkpoint, generation_config=str(tmp_path / "nowhere"), **ENGINE)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation config's sampling defaults are invalid: temperature"):
        LLM(checkpoint, generation_config=str(tmp_path), **ENGINE)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the generation config"):
        LLM(checkpoint, generation_config=str(tmp_path), **ENGINE)


def test_the_embedded_smollm2_samples_as_its_model_card_says(smollm2):
    params = LLM.from_loaded(smollm2, **ENGINE).get_default_sampling_params()
    assert (params.temperature, params.top_p) == (SMOLLM2_DEFAULTS["temperature"], SMOLLM2_DEFAULTS["top_p"])


def test_the_server_fills_only_what_a_request_leaves_out():
    from runtime.serve.preprocess import Preprocessor
    from runtime.serve.protocol import CompletionRequest
    from runtime.serve.settings import ServerSettings

    core = SimpleNamespace(max_model_len=64, vocab_size=100, model_class=object,
                           sampling_defaults={"temperature": 0.3, "top_k": 7, "max_tokens": 5})
    pre = Preprocessor(SimpleNamespace(tokenizer=None, core=core), ServerSettings(served_model_names=["m"]))
    try:
        left_out = pre.sampling_params(CompletionRequest(prompt=[1]), 4, None)
        given = pre.sampling_params(CompletionRequest(prompt=[1], temperature=0.9, top_k=None), 4, None)
    finally:
        pre.close()
    assert (left_out.temperature, left_out.top_k, left_out.max_tokens) == (0.3, 7, 4)  # the budget it was given
    assert (given.temperature, given.top_k) == (0.9, 7)  # null is "left out"
    assert pre.default_max_tokens() == 5  # a chat request naming no budget gets max_new_tokens
