"""Requests the engine must accept whole or refuse whole, finish even when the scheduler gives up on them,
and context lengths it must refuse at start-up (reproductions from the reliability issue)."""
import pytest

from models.loader import load_model
from models.testing import write_tiny_checkpoint
from runtime import LLM, SamplingParams

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_checkpoint("LlamaForCausalLM", str(tmp_path_factory.mktemp("guards") / "llama"))
    return load_model(path, dtype="float32", device="cpu")


def test_seeds_at_the_edge_of_64_bits_give_every_completion(tiny):
    llm = LLM.from_loaded(tiny, num_kv_blocks=32, **ENGINE)
    # Completion i samples with seed + i: at 2**64 - 1 the second one wraps to 0 instead of failing
    # after the first was already scheduled (which left it running, unabortable).
    params = SamplingParams(n=2, seed=2**64 - 1, max_tokens=5, temperature=1.0, ignore_eos=True)
    outputs = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs
    assert [len(o.token_ids) for o in outputs] == [5, 5]
    with pytest.raises(ValueError, match=r"seed must be None or an int in \[-2\*\*63, 2\*\*64\)"):
        SamplingParams(seed=2**64)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_a_request_the_scheduler_gives_up_on_finishes_when_nothing_else_runs(tiny):
    llm = LLM.from_loaded(tiny, num_kv_blocks=32, **ENGINE)
    llm.engine.scheduler.config.max_model_len = 8  # the scheduler now refuses what the engine accepted
    out = llm.generate([list(range(3, 23))], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert "max_model_len=8" in out.outputs[0].stop_reason
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv_cache.num_used_blocks == 0


def test_a_context_beyond_the_model_or_the_kv_cache_is_refused_at_start_up(tiny):
    with pytest.raises(ValueError, match="max_model_len=100000 is beyond this model's maximum context"):
        LLM.from_loaded(tiny, max_model_len=100000, num_kv_blocks=32, **ENGINE)
    with pytest.raises(ValueError, match=r"max_model_len=512 does not fit the KV cache: 8 blocks of 16 hold 128 "
                                         r"tokens; lower max_model_len to at most 128"):
        LLM.from_loaded(tiny, max_model_len=512, num_kv_blocks=8, **ENGINE)
    # Without an explicit max_model_len the default is lowered to what the cache holds.
    llm = LLM.from_loaded(tiny, num_kv_blocks=8, **ENGINE)
    assert llm.engine.max_model_len == 128
    with pytest.raises(ValueError, match="at most 127"):
        llm.generate([list(range(3, 203))], SamplingParams(max_tokens=1), use_tqdm=False)


def test_the_detokenizer_names_the_stop_string_that_matched():
    from runtime.engine.detokenizer import IncrementalDetokenizer

    class Chars:  # a tokenizer whose token i is chr(i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    detok = IncrementalDetokenizer(Chars(), ["lo w", "xyz"], include_stop_str=False, skip_special_tokens=True)
    fed = 0
    for c in "hello world":  # the engine stops feeding at the first hit
        fed += 1
        if detok.add_token(ord(c))[1]:
            break
    assert fed == 7 and detok.text == "hel" and detok.matched_stop == "lo w"
